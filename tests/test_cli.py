"""The `o2v` command line: train (plain and SageMaker layout), evaluate, errors."""

from __future__ import annotations

import json
import re

import pytest
from conftest import group_pairs, tiny_hp, write_jsonl

from o2v_jax.cli import main


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
