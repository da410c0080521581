"""The Python training API (o2v_jax/api.py): o2v_jax.train from every channel form gives
the model `o2v train` gives, with the CLI's errors; the model is a loaded model with its
history and save(); a run without model_dir leaves nothing; o2v_jax.evaluate says what
`o2v evaluate` says."""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import group_pairs, tiny_hp, write_jsonl

import o2v_jax
from o2v_jax import checkpoint
from o2v_jax.cli import main
from o2v_jax.config import HyperparameterError
from o2v_jax.data import DataError
from o2v_jax.metrics import read_history
from o2v_jax.predictor import Predictor

ROOT = Path(__file__).resolve().parent.parent
HP = tiny_hp(epochs=2)
CHANNELS = {"train": group_pairs(96, 0, max_len=6), "validation": group_pairs(32, 1, max_len=6),
            "test": group_pairs(32, 2, max_len=6)}
QUIET = dict(emit=None, progress=False, plot=False)


def arrays(records):
    """(in0 0-padded int32 (N, 6), in1 as lists, labels int64 (N,))."""
    in0 = np.zeros((len(records), 6), np.int32)
    for i, r in enumerate(records):
        in0[i, :len(r["in0"])] = r["in0"]
    return in0, [r["in1"] for r in records], np.array([r["label"] for r in records])


def quality_lines(text_or_lines):
    lines = text_or_lines.splitlines() if isinstance(text_or_lines, str) else text_or_lines
    return [line for line in lines if line.startswith("#quality_metric")]


def cli(*args) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(map(str, args)))
    return code, out.getvalue()


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """`o2v train` on the three channels as files: (root, paths, hp file, model dir, stdout)."""
    root = tmp_path_factory.mktemp("cli")
    paths = {name: write_jsonl(root / f"{name}.jsonl", records) for name, records in CHANNELS.items()}
    hp_file = root / "hp.json"
    hp_file.write_text(json.dumps({k: str(v) for k, v in HP.items()}))
    code, out = cli("train", "--train", paths["train"], "--validation", paths["validation"],
                    "--test", paths["test"], "--hyperparameters", hp_file,
                    "--model-dir", root / "model", "--no-progress")
    assert code == 0
    return root, paths, hp_file, root / "model", out


def assert_same_params(a: Path, b: Path) -> None:
    _, pa, _ = checkpoint.load_model(a)
    _, pb, _ = checkpoint.load_model(b)
    la, lb = jax.tree.leaves(pa), jax.tree.leaves(pb)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def without_timings(history):
    return [{k: v for k, v in h.items() if k not in ("seconds", "records_per_second")}
            for h in history]


# --------------------------------------------------------------------------- the same model as the CLI

@pytest.mark.parametrize("form", ["paths", "records", "arrays"])
def test_each_channel_form_gives_the_clis_model(tmp_path, cli_run, form):
    _, paths, hp_file, cli_model, out = cli_run
    hyperparameters, channels = {
        "paths": (hp_file, [str(paths[name]) for name in CHANNELS]),
        "records": (HP, list(CHANNELS.values())),
        "arrays": (HP, [arrays(records) for records in CHANNELS.values()]),
    }[form]
    lines: list[str] = []
    model = o2v_jax.train(hyperparameters, *channels, model_dir=tmp_path / "m", seed=0,
                          emit=lines.append, progress=False, plot=False)
    assert_same_params(tmp_path / "m", cli_model)
    assert quality_lines(lines) == quality_lines(out)  # every metric, digit for digit
    _, _, cli_meta = checkpoint.load_model(cli_model)
    assert without_timings(model.history) == without_timings(cli_meta["history"])
    assert model.metadata["test_metrics"] == cli_meta["test_metrics"]


def test_the_cli_run_leaves_metrics_jsonl_as_its_metric_lines_and_curves(cli_run):
    _, _, _, model_dir, out = cli_run
    records = read_history(model_dir / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [0, 1]
    pattern = re.compile(r"#quality_metric: host=algo-1, epoch=(\d+), (\w+) (\w+) <\w+>=(\S+)")
    per_epoch = [m.groups() for m in map(pattern.fullmatch, quality_lines(out)) if m]
    assert len(per_epoch) == 2 * 4
    for epoch, channel, name, value in per_epoch:
        assert records[int(epoch)][f"{channel}_{name}"] == float(value)
    for record, line in zip(records, re.findall(r"train throughput=(\S+) records/second", out)):
        assert f"{record['records_per_second']:.2f}" == line
    finished = json.loads(out.split("Training finished: ")[1].splitlines()[0])
    assert finished["last_epoch"] == {k: v for k, v in records[-1].items() if k != "epoch"}
    pytest.importorskip("matplotlib")
    assert (model_dir / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- the model

def test_the_model_is_a_loaded_model_with_history_and_save(tmp_path, cli_run):
    _, paths, _, cli_model, _ = cli_run
    model = o2v_jax.train(HP, CHANNELS["train"], CHANNELS["validation"], **QUIET)
    assert isinstance(model, Predictor)
    assert model.history == read_history(model.model_dir / "metrics.jsonl")
    assert [h["epoch"] for h in model.history] == [0, 1]
    seqs = [[1, 2, 3], [30, 31], [5]]
    loaded = o2v_jax.load(cli_model)  # the CLI's model: the same parameters
    np.testing.assert_array_equal(model.embed(seqs, encoder="in1"), loaded.embed(seqs, encoder="in1"))
    np.testing.assert_array_equal(model.predict(seqs, seqs), loaded.predict(seqs, seqs))

    saved = model.save(tmp_path / "kept" / "m1")
    assert sorted(p.name for p in saved.iterdir() if not p.name.startswith("params-")) == [
        "hyperparameters.json", "metrics.jsonl", "model.json"]
    again = o2v_jax.load(saved)
    np.testing.assert_array_equal(again.embed(seqs), model.embed(seqs))
    assert again.history == model.history

    with pytest.raises(checkpoint.ModelDirError, match="already holds a model; pass overwrite=True"):
        model.save(saved)
    assert model.save(saved, overwrite=True) == saved and o2v_jax.load(saved).history == model.history
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(checkpoint.ModelDirError, match="not empty and not a model directory"):
        model.save(tmp_path / "notes", overwrite=True)
    assert os.listdir(tmp_path / "notes") == ["todo.txt"]
    assert sorted(os.listdir(tmp_path / "kept")) == ["m1"]  # no temporary siblings left


def test_without_model_dir_nothing_is_left_behind(tmp_path, monkeypatch):
    temp, cwd = tmp_path / "tmp", tmp_path / "cwd"
    temp.mkdir(), cwd.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.chdir(cwd)
    model = o2v_jax.train(HP, CHANNELS["train"], emit=None, progress=False)
    assert model.model_dir.parent == temp and (model.model_dir / "model.json").is_file()
    del model
    gc.collect()
    assert os.listdir(temp) == [] and os.listdir(cwd) == []

    bad = CHANNELS["validation"][:3] + [{"label": 1, "in0": [1], "in1": [99]}]
    with pytest.raises(DataError, match=r"^validation\[3\]"):
        o2v_jax.train(HP, CHANNELS["train"], bad, **QUIET)
    assert os.listdir(temp) == []
    with pytest.raises(ValueError, match="resume=True continues the run in model_dir"):
        o2v_jax.train(HP, CHANNELS["train"], resume=True, **QUIET)


EXIT_CHILD = """
import sys, o2v_jax
sys.path.insert(0, sys.argv[1])
from conftest import group_pairs, tiny_hp
model = o2v_jax.train(tiny_hp(epochs=1), group_pairs(32, 0, max_len=4), emit=None, progress=False)
assert model.model_dir.is_dir() and model.history
print(model.model_dir)
"""


def test_a_model_kept_until_exit_is_removed_at_exit(tmp_path):
    temp, cwd = tmp_path / "tmp", tmp_path / "cwd"
    temp.mkdir(), cwd.mkdir()
    env = dict(os.environ, TMPDIR=str(temp),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", EXIT_CHILD, str(ROOT / "tests")], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).parent == temp  # it trained in TMPDIR ...
    assert os.listdir(temp) == [] and os.listdir(cwd) == []  # ... and nothing is left


# --------------------------------------------------------------------------- errors

def _cli_error(capsys, *args) -> str:
    assert main(list(map(str, args))) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("o2v train: error: ")
    return err.removeprefix("o2v train: error: ")


@pytest.mark.parametrize("bad", [{"enc_dimm": "4"}, {"epochs": "0"}, {"enc0_network": "rnn"}])
def test_bad_hyperparameters_get_the_clis_error(tmp_path, capsys, bad):
    train_path = write_jsonl(tmp_path / "train.jsonl", CHANNELS["train"][:8])
    hp_file = tmp_path / "hp.json"
    hp_file.write_text(json.dumps({**{k: str(v) for k, v in HP.items()}, **bad}))
    message = _cli_error(capsys, "train", "--train", train_path, "--hyperparameters", hp_file,
                         "--model-dir", tmp_path / "m")
    for hyperparameters in ({**HP, **bad}, hp_file, str(hp_file)):
        with pytest.raises(HyperparameterError) as e:
            o2v_jax.train(hyperparameters, CHANNELS["train"][:8], **QUIET)
        assert str(e.value) == message


@pytest.mark.parametrize("record", [{"label": 1, "in0": [1, 40], "in1": [2]},
                                    {"label": 7, "in0": [1], "in1": [2]},
                                    {"label": 1, "in0": [1, "a"], "in1": [2]}])
def test_bad_records_get_the_clis_error(tmp_path, capsys, record):
    records = CHANNELS["train"][:4] + [record]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    message = _cli_error(capsys, "train", "--train", path, "--model-dir", tmp_path / "m",
                         *[f"--hp={k}={v}" for k, v in HP.items()])
    assert message.startswith(f"{path}:5: ")
    with pytest.raises(DataError) as from_path:
        o2v_jax.train(HP, path, **QUIET)
    assert str(from_path.value) == message
    with pytest.raises(DataError) as from_records:
        o2v_jax.train(HP, records, **QUIET)
    assert str(from_records.value) == message.replace(f"{path}:5: ", "train[4]: ")


# --------------------------------------------------------------------------- evaluate

def test_evaluate_says_what_o2v_evaluate_prints(cli_run):
    _, paths, _, model_dir, _ = cli_run
    code, out = cli("evaluate", "--model-dir", model_dir, "--data", paths["test"])
    assert code == 0
    expected = json.loads(out.strip().splitlines()[-1])
    assert set(expected) == {"accuracy", "cross_entropy"}
    model = o2v_jax.load(model_dir)
    for target, data in [(model_dir, paths["test"]), (str(model_dir), CHANNELS["test"]),
                         (model, arrays(CHANNELS["test"]))]:
        assert o2v_jax.evaluate(target, data) == expected
    _, _, meta = checkpoint.load_model(model_dir)
    assert expected == meta["test_metrics"]
    with pytest.raises(DataError, match=r'^evaluation\[0\]: field "label"'):
        o2v_jax.evaluate(model, [{"label": 5, "in0": [1], "in1": [2]}])


# --------------------------------------------------------------------------- the package

def test_import_is_light_and_train_stays_the_function():
    code = """
import sys, o2v_jax
assert "jax" not in sys.modules, "import o2v_jax imported jax"
from o2v_jax.training import build_steps   # the training-loop module, imported as a submodule
import o2v_jax.training
assert o2v_jax.train.__module__ == "o2v_jax.api" and callable(o2v_jax.train)
assert o2v_jax.evaluate.__module__ == "o2v_jax.api"
assert sys.modules["o2v_jax.training"].build_steps is build_steps
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
