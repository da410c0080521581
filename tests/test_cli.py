"""The `o2v` command line: train (plain and SageMaker layout), evaluate, serve and
transform flags, and the errors main() reports."""

from __future__ import annotations

import json
import re
import socket

import pytest
from conftest import group_pairs, tiny_hp, write_jsonl

from o2v_jax.cli import build_parser, main


def test_sagemaker_layout_train_and_evaluate(tmp_path, capsys):
    root = tmp_path / "ml"
    (root / "input" / "config").mkdir(parents=True)
    hp = {k: str(v) for k, v in tiny_hp(epochs=2).items()} | {"_kvstore": "device", "_num_gpus": "auto"}
    (root / "input" / "config" / "hyperparameters.json").write_text(json.dumps(hp))
    (root / "input" / "config" / "resourceconfig.json").write_text(json.dumps({"current_host": "algo-7"}))
    write_jsonl(root / "input" / "data" / "train" / "part-0.jsonl", group_pairs(64, 0))
    write_jsonl(root / "input" / "data" / "validation" / "v.jsonl", group_pairs(32, 1))
    write_jsonl(root / "input" / "data" / "test" / "t.jsonl", group_pairs(32, 2))
    assert main(["train", "--sagemaker", "--ml-root", str(root), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"#quality_metric: host=algo-7, epoch=1, validation accuracy <score>=\S+", out)
    assert re.search(r"#quality_metric: host=algo-7, test cross_entropy <loss>=\S+", out)
    model_dir = root / "model"
    saved = json.loads((model_dir / "hyperparameters.json").read_text())
    assert saved["epochs"] == "2" and saved["enc1_network"] == "enc0"
    assert main(["evaluate", "--model-dir", str(model_dir), "--data",
                 str(root / "input" / "data" / "test")]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(metrics) == {"accuracy", "cross_entropy"}


def test_train_overrides_and_bad_hyperparameter(tmp_path, capsys):
    train_path = write_jsonl(tmp_path / "train.jsonl", group_pairs(32, 0))
    hp_file = tmp_path / "hp.json"
    hp_file.write_text(json.dumps(tiny_hp()))
    code = main(["train", "--train", str(train_path), "--hyperparameters", str(hp_file),
                 "--hp", "epochs=0", "--model-dir", str(tmp_path / "m")])
    assert code == 2
    err = capsys.readouterr().err
    assert "epochs='0'" in err and "[1, 100]" in err


def test_sagemaker_failure_file(tmp_path):
    root = tmp_path / "ml"
    (root / "input" / "config").mkdir(parents=True)
    (root / "input" / "config" / "hyperparameters.json").write_text(json.dumps(tiny_hp(enc_dimm=4)))
    write_jsonl(root / "input" / "data" / "train" / "a.jsonl", group_pairs(8, 0))
    assert main(["train", "--sagemaker", "--ml-root", str(root)]) == 2
    assert "did you mean 'enc_dim'" in (root / "output" / "failure").read_text()


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "evaluate"):
        assert command in out


def test_train_without_flags_uses_sagemaker_layout(tmp_path, capsys):
    # `docker run IMAGE train` runs `o2v train` with no flags.
    root = tmp_path / "ml"
    (root / "input" / "config").mkdir(parents=True)
    (root / "input" / "config" / "hyperparameters.json").write_text(json.dumps(tiny_hp(epochs=1)))
    write_jsonl(root / "input" / "data" / "train" / "a.jsonl", group_pairs(32, 0))
    assert main(["train", "--ml-root", str(root), "--no-progress"]) == 0
    assert (root / "model" / "model.json").is_file()


# A child process whose stdout is a pipe, as in a SageMaker container: after epoch 0 is
# checkpointed it says so on stderr and waits for a line on stdin. Whatever epoch 0 wrote
# to stdout must already be in the pipe then; nothing here waits for time to pass.
GATED_CHILD = """
import json, sys
from o2v_jax import checkpoint

save, waited = checkpoint.save_training_state, []

def save_then_wait(*args, **kwargs):
    save(*args, **kwargs)
    if not waited:
        waited.append(True)
        sys.stderr.write("GATE\\n")
        sys.stderr.flush()
        sys.stdin.readline()

checkpoint.save_training_state = save_then_wait
if sys.argv[1] == "cli":
    from o2v_jax.cli import main
    sys.exit(main(sys.argv[2:]))
from o2v_jax.config import load_hyperparameters
from o2v_jax.data import read_channel
from o2v_jax.training import train
config = load_hyperparameters(sys.argv[3], [])
train(config, read_channel(sys.argv[2], config), model_dir=sys.argv[4], progress=False)
"""


@pytest.mark.parametrize("entry", ["cli", "library"])
def test_metric_lines_reach_a_pipe_as_each_epoch_ends(tmp_path, entry):
    import os
    import subprocess
    import sys
    import threading
    from pathlib import Path

    train_path = write_jsonl(tmp_path / "train.jsonl", group_pairs(64, 0, max_len=4))
    hp_file = tmp_path / "hp.json"
    hp_file.write_text(json.dumps(tiny_hp(epochs=3)))
    model_dir = tmp_path / "m"
    args = (["cli", "train", "--train", str(train_path), "--hyperparameters", str(hp_file),
             "--model-dir", str(model_dir)] if entry == "cli"
            else ["library", str(train_path), str(hp_file), str(model_dir)])
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ,
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    env.pop("PYTHONUNBUFFERED", None)
    child = subprocess.Popen([sys.executable, "-c", GATED_CHILD, *args], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0, env=env)
    watchdog = threading.Timer(600, child.kill)  # only a hung child ever meets it
    watchdog.start()
    try:
        err = b""
        for line in child.stderr:
            err += line
            if line == b"GATE\n":
                break
        else:
            pytest.fail(f"the child ended before epoch 0 was saved:\n{err.decode()}")
        assert child.poll() is None  # waiting on stdin: still mid-run
        os.set_blocking(child.stdout.fileno(), False)
        early = b""
        while True:  # what the pipe holds now, without waiting for more
            try:
                chunk = os.read(child.stdout.fileno(), 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                break
            early += chunk
        os.set_blocking(child.stdout.fileno(), True)
        lines = early.decode().splitlines()
        assert [line.split(",")[0] for line in lines] == [
            "#quality_metric: host=algo-1", "#quality_metric: host=algo-1",
            "#progress_metric: host=algo-1", "#throughput_metric: host=algo-1"], lines
        assert all("epoch=0" in line for line in lines[:2])
        rest, err = child.communicate(b"go\n")
    finally:
        watchdog.cancel()
        child.kill()
    assert child.returncode == 0, err.decode()
    assert "epoch=2, train accuracy" in rest.decode()


# --------------------------------------------------------------------------- serve and transform


def test_serve_help_says_where_it_binds_and_errors_exit_as_before(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "default 127.0.0.1, this machine only" in text and "0.0.0.0" in text
    assert all(t in text for t in ("application/json", "application/jsonlines",
                                   "application/x-npz", "application/x-npy"))
    # Bad settings and a missing model directory: exit 2, one line naming the problem.
    assert main(["serve", "--model-dir", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == \
        f"o2v serve: error: model directory {tmp_path / 'missing'} does not exist"
    assert main(["serve", "--model-dir", str(tmp_path), "--max-body-mb", "0"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == \
        "o2v serve: error: max_body_mb (--max-body-mb, SAGEMAKER_MAX_PAYLOAD_IN_MB) must be in [1, 100], got 0"
    monkeypatch.setenv("SAGEMAKER_BATCH_STRATEGY", "ALL")
    assert main(["serve", "--sagemaker", "--model-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "o2v serve: error: SAGEMAKER_BATCH_STRATEGY='ALL'" in err and "Traceback" not in err
    assert not (tmp_path / "output").exists()  # no SageMaker failure file: that is for training jobs


def test_serve_on_a_taken_port_exits_1(tmp_path, capsys):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert main(["serve", "--model-dir", str(tmp_path), "--port", str(port)]) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith(f"o2v serve: error: cannot listen on 127.0.0.1:{port}: ")


@pytest.mark.parametrize("spelling, strategy", [
    ("MultiRecord", "MultiRecord"), ("multi_record", "MultiRecord"), ("MULTI_RECORD", "MultiRecord"),
    ("SingleRecord", "SingleRecord"), ("singlerecord", "SingleRecord"), ("SINGLE_RECORD", "SingleRecord")])
def test_transform_strategy_takes_every_sagemaker_spelling(spelling, strategy):
    argv = ["transform", "--model-dir", "m", "--input", "i", "--output", "o"]
    assert build_parser().parse_args(argv).strategy == "MultiRecord"
    assert build_parser().parse_args([*argv, "--strategy", spelling]).strategy == strategy


def test_transform_errors_exit_2_with_one_line(tmp_path, capsys):
    argv = ["transform", "--input", str(tmp_path), "--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as e:
        main([*argv, "--model-dir", str(tmp_path), "--strategy", "Batch"])
    assert e.value.code == 2
    assert "argument --strategy: invalid choice: 'Batch'" in capsys.readouterr().err
    assert main([*argv, "--model-dir", str(tmp_path / "nomodel")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == \
        f"o2v transform: error: {tmp_path / 'nomodel'}: model directory not found"


def test_evaluate_retrieval_prints_metric_lines_and_json(tmp_path, capsys):
    from conftest import train_tiny_model

    model_dir = train_tiny_model(tmp_path, objective="contrastive", epochs=1)
    data = write_jsonl(tmp_path / "pairs.jsonl",
                       [{"in0": r["in0"], "in1": r["in1"]} for r in group_pairs(20, 3, max_len=4)])
    argv = ["evaluate", "--model-dir", str(model_dir), "--data", str(data), "--retrieval"]
    assert main([*argv, "--baseline", "bm25"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    metrics = json.loads(out[-1])
    assert {"hits@1", "hits@5", "hits@10", "mrr", "ndcg@10", "queries", "candidates"} <= set(metrics)
    assert set(metrics["baselines"]) == {"bm25"}
    assert f"#quality_metric: host=algo-1, test mrr <score>={metrics['mrr']!r}" in out
    assert any(line.startswith("#quality_metric: host=algo-1, test bm25 mrr <score>=") for line in out)


def test_evaluate_retrieval_bad_flags_and_files_exit_2_with_one_line(tmp_path, capsys):
    from conftest import train_tiny_model

    argv = ["evaluate", "--model-dir", str(tmp_path / "m"), "--data", str(tmp_path / "d.jsonl")]
    with pytest.raises(SystemExit) as e:  # argparse: before anything is read
        main([*argv, "--retrieval", "--baseline", "bm99"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --baseline: invalid choice: 'bm99'" in err and "bm25" in err and "tfidf" in err
    assert main([*argv, "--baseline", "bm25"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == \
        "o2v evaluate: error: --baseline compares retrieval metrics: it needs --retrieval"
    model_dir = train_tiny_model(tmp_path, objective="contrastive", epochs=1)
    queries_only = tmp_path / "queries.jsonl"
    queries_only.write_text('{"in0": [1, 2]}\n')
    assert main(["evaluate", "--model-dir", str(model_dir), "--data", str(queries_only),
                 "--retrieval"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"o2v evaluate: error: {queries_only}:1: ")
    assert 'field "in1": missing' in err[0]
