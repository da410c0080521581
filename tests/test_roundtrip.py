"""What training writes, loading must read back (issue 16).

A property test over the hyperparameter space: any valid map resolves to a Config whose
resolved map (what model.json and hyperparameters.json store) parses back to the same
Config, through the same code every loader uses; and a seeded sample of small configs
goes all the way: train -> o2v_jax.load -> embed. The fixture
``fixtures/pooled-enc-dim-1024`` is a model directory written before the fix (a pooled
token dim of 1024 stored in model.json), which must keep loading.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import o2v_jax
from o2v_jax import checkpoint
from o2v_jax.config import (ACTIVATIONS, COMPARATORS, NETWORKS, OBJECTIVES, OPTIMIZERS,
                            OUTPUT_LAYERS, ROW_SPARSE_OPTIMIZERS, SPECS, Config, HyperparameterError,
                            from_hyperparameters)

from conftest import group_pairs, write_jsonl

FIXTURE = Path(__file__).parent / "fixtures" / "pooled-enc-dim-1024"
FIXTURE_PAIRS = Path(__file__).parent / "fixtures" / "pooled-enc-dim-1024-pairs.jsonl"

# Deterministic: the same examples on every run and machine, no database in the repo.
PROPERTY = settings(derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _int(name: str, draw, lo: int | None = None, hi: int | None = None) -> int:
    spec = SPECS[name]
    return draw(st.integers(int(spec.lo if lo is None else lo),
                            int(spec.hi if hi is None else hi)))


def _spelled(draw, name: str, value) -> str | int | float | bool:
    """A value as users send it: a string (sometimes padded or "4.0"), or a JSON scalar;
    enum values in any case (the container lower-cases them)."""
    if isinstance(value, bool):
        return draw(st.sampled_from([value, "true" if value else "false", "True" if value else "FALSE"]))
    if isinstance(value, int):
        return draw(st.sampled_from([str(value), f" {value} ", f"{value}.0", value]))
    if isinstance(value, float):
        return draw(st.sampled_from([repr(value), value]))
    if SPECS[name].kind in ("choice", "layers"):
        return draw(st.sampled_from([value, value.upper(), f" {value}"]))
    return draw(st.sampled_from([value, f" {value} "]))


@st.composite
def encoder(draw, side: str, enc_dim: int, network: str) -> dict:
    hp = {f"{side}_network": network,
          f"{side}_max_seq_len": _int(f"{side}_max_seq_len", draw),
          f"{side}_vocab_size": _int(f"{side}_vocab_size", draw)}
    if draw(st.booleans()):
        hp[f"{side}_layers"] = draw(st.sampled_from(["auto", "1", "2", "3", "4", "AUTO"]))
    if draw(st.booleans()):
        hp[f"{side}_cnn_filter_width"] = _int(f"{side}_cnn_filter_width", draw)
    if network == "pooled_embedding" and draw(st.booleans()):
        # The coupled value itself (what a resolved map holds), whatever enc_dim is.
        hp[f"{side}_token_embedding_dim"] = enc_dim
    elif draw(st.booleans()):
        hp[f"{side}_token_embedding_dim"] = _int(f"{side}_token_embedding_dim", draw)
    if draw(st.booleans()):
        hp[f"{side}_pretrained_embedding_file"] = draw(st.sampled_from(["glove.txt", "vec.6B_50d"]))
        hp[f"{side}_vocab_file"] = draw(st.sampled_from(["vocab.json", "v_0.json"]))
        hp[f"{side}_freeze_pretrained_embedding"] = draw(st.booleans())
    return hp


@st.composite
def hyperparameter_maps(draw) -> dict:
    """A valid SageMaker hyperparameter map, from the whole space (ranges, couplings)."""
    enc_dim = _int("enc_dim", draw)
    net0 = draw(st.sampled_from(NETWORKS))
    hp = {"enc_dim": enc_dim, **draw(encoder("enc0", enc_dim, net0))}
    net1 = draw(st.sampled_from(("enc0",) + NETWORKS))
    if net1 == "enc0":
        if draw(st.booleans()):
            hp["enc1_network"] = "enc0"
        if draw(st.booleans()):  # ignored: enc1 copies enc0
            hp["enc1_vocab_size"] = _int("enc1_vocab_size", draw)
    else:
        hp.update(draw(encoder("enc1", enc_dim, net1)))
    tied = draw(st.booleans())
    if tied and net1 != "enc0":
        # One token table: equal resolved vocab sizes and token dims (spec §4.6).
        hp["enc1_vocab_size"] = hp["enc0_vocab_size"]
        dims = {}
        for side, net in (("enc0", net0), ("enc1", net1)):
            dims[side] = enc_dim if net == "pooled_embedding" else int(hp.get(f"{side}_token_embedding_dim", 300))
        if dims["enc0"] != dims["enc1"]:
            if "pooled_embedding" in (net0, net1) and enc_dim > SPECS["enc0_token_embedding_dim"].hi:
                tied = False  # a non-pooled table cannot be enc_dim wide here
            else:
                target = enc_dim if "pooled_embedding" in (net0, net1) else dims["enc0"]
                for side, net in (("enc0", net0), ("enc1", net1)):
                    if net != "pooled_embedding":
                        hp[f"{side}_token_embedding_dim"] = target
    if tied:
        hp["tied_token_embedding_weight"] = True
    ops = draw(st.permutations(COMPARATORS))[:draw(st.integers(1, 3))]
    hp["comparator_list"] = draw(st.sampled_from([", ".join(ops), ",".join(ops), " " + " ,".join(ops)]))
    storage = draw(st.sampled_from(("dense", "row_sparse")))
    hp["token_embedding_storage_type"] = storage
    hp["optimizer"] = draw(st.sampled_from(ROW_SPARSE_OPTIMIZERS if storage == "row_sparse" else OPTIMIZERS))
    hp["output_layer"] = draw(st.sampled_from(OUTPUT_LAYERS))
    hp["mlp_activation"] = draw(st.sampled_from(ACTIVATIONS))
    for name in ("mlp_layers", "mlp_dim", "num_classes", "epochs", "mini_batch_size",
                 "early_stopping_patience", "bucket_width"):
        if draw(st.booleans()):
            hp[name] = _int(name, draw)
    if draw(st.booleans()):
        hp["negative_sampling_rate"] = draw(st.integers(0, 1000))
    for name in ("dropout", "learning_rate", "weight_decay", "early_stopping_tolerance"):
        if draw(st.booleans()):
            spec = SPECS[name]
            hp[name] = draw(st.floats(spec.lo, spec.hi, allow_nan=False, allow_infinity=False))
    # o2v extensions: objective=contrastive couples defaults (tied table, batch size...)
    # and needs softmax with two classes; its temperature may be set with either objective.
    if draw(st.booleans()):
        hp["objective"] = draw(st.sampled_from(OBJECTIVES))
        if hp["objective"] == "contrastive":
            hp["output_layer"] = "softmax"
            hp["num_classes"] = 2
    if draw(st.booleans()):
        spec = SPECS["contrastive_temperature"]
        hp["contrastive_temperature"] = draw(st.floats(spec.lo, spec.hi, allow_nan=False,
                                                       allow_infinity=False))
    if draw(st.booleans()):
        hp["_kvstore"] = "dist_sync"  # SageMaker's internal keys are accepted and ignored
    return {k: _spelled(draw, k, v) if not k.startswith("_") else v for k, v in hp.items()}


@PROPERTY
@given(hp=hyperparameter_maps())
def test_resolved_map_parses_back_to_the_same_config(hp):
    config = from_hyperparameters(hp)
    resolved = config.to_hyperparameters()
    assert all(isinstance(v, str) for v in resolved.values())
    # What save_model writes (JSON text) and what every loader parses.
    stored = json.loads(json.dumps({"hyperparameters": resolved}))["hyperparameters"]
    again = from_hyperparameters(stored)
    assert again == config
    assert again.to_hyperparameters() == resolved
    # Variants re-validate from the resolved map too.
    assert config.replace(epochs=config.epochs) == config


@settings(PROPERTY, max_examples=8)
@given(hp=hyperparameter_maps())
def test_save_then_read_config_gives_the_same_config(hp, tmp_path_factory):
    from o2v_jax.model import abstract_model

    config = from_hyperparameters(hp)
    model_dir = tmp_path_factory.mktemp("m")
    checkpoint.save_model(model_dir, hyperparameters=config.to_hyperparameters(),
                          params={"x": np.zeros(1, np.float32)}, metadata={})
    loaded, manifest = checkpoint.read_config(model_dir)
    assert loaded == config
    # hyperparameters.json (for people and tools) is valid input for the same model.
    on_disk = json.loads((model_dir / "hyperparameters.json").read_text())
    assert from_hyperparameters(on_disk) == config
    # The abstract model a loader restores into has the configured table shapes.
    _, shapes = abstract_model(loaded)
    assert shapes["embed0"]["embedding"].shape == (config.enc0.vocab_size, config.enc0.token_embedding_dim)


def test_pooled_token_dim_equal_to_enc_dim_is_accepted_above_1000():
    config = from_hyperparameters({"enc0_max_seq_len": 4, "enc0_vocab_size": 10, "enc_dim": 4096,
                                   "enc0_network": "pooled_embedding",
                                   "enc0_token_embedding_dim": "4096", "enc1_token_embedding_dim": "4096"})
    assert config.enc0.token_embedding_dim == config.enc1.token_embedding_dim == 4096


@pytest.mark.parametrize("hp, bad", [
    # Out of range and not the coupled value: still SageMaker's range error.
    ({"enc0_network": "pooled_embedding", "enc_dim": 4096, "enc0_token_embedding_dim": 2000},
     "enc0_token_embedding_dim='2000' is invalid: expected an integer in [2, 1000]"),
    # Equal to enc_dim, but hcnn's token dim is its own setting: range error.
    ({"enc0_network": "hcnn", "enc_dim": 4096, "enc0_token_embedding_dim": 4096},
     "enc0_token_embedding_dim='4096' is invalid"),
    # enc1 is its own hcnn, so its 4096 is not coupled, though enc0 is pooled.
    ({"enc0_network": "pooled_embedding", "enc1_network": "hcnn", "enc1_max_seq_len": 4,
      "enc1_vocab_size": 10, "enc_dim": 4096, "enc1_token_embedding_dim": 4096},
     "enc1_token_embedding_dim='4096' is invalid"),
    ({"enc0_network": "pooled_embedding", "enc_dim": 4096, "enc0_token_embedding_dim": "big"},
     "enc0_token_embedding_dim='big' is invalid"),
])
def test_other_out_of_range_token_dims_still_rejected(hp, bad):
    with pytest.raises(HyperparameterError) as e:
        from_hyperparameters({"enc0_max_seq_len": 4, "enc0_vocab_size": 10, **hp})
    assert bad in str(e.value)


# ----------------------------------------------------------------- a model of today's code


def _fixture_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(FIXTURE, dst)
    return dst


def test_fixture_holds_a_coupled_value_above_the_user_range():
    stored = json.loads((FIXTURE / "model.json").read_text())["hyperparameters"]
    assert stored["enc0_network"] == "pooled_embedding"
    assert int(stored["enc0_token_embedding_dim"]) == int(stored["enc_dim"]) == 1024 > SPECS[
        "enc0_token_embedding_dim"].hi


def test_model_written_before_the_fix_loads_embeds_and_predicts(tmp_path):
    model = o2v_jax.load(_fixture_copy(tmp_path))
    u = model.embed([[1, 2, 3], [4]], encoder="in0")
    v = model.embed([[1, 2, 3], [4]], encoder="in1")
    assert u.shape == (2, 1024) and np.isfinite(u).all()
    np.testing.assert_array_equal(u, v)  # tied pooled tables: the same encoder on both sides
    scores = model.predict([[1, 2]], [[3]])
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-6)


def test_model_written_before_the_fix_evaluates_transforms_and_serves(tmp_path):
    from o2v_jax.app import App, Settings
    from o2v_jax.api import evaluate
    from o2v_jax.transform import transform

    model_dir = _fixture_copy(tmp_path)
    metrics = evaluate(model_dir, FIXTURE_PAIRS)
    assert set(metrics) == {"cross_entropy", "accuracy"} and np.isfinite(metrics["cross_entropy"])

    requests = write_jsonl(tmp_path / "in" / "r.jsonl", [{"in0": [1, 2], "in1": [3]}, {"in1": [5]}])
    predictor = o2v_jax.load(model_dir)
    stats = transform(predictor, requests.parent, tmp_path / "out", skip_bad_lines=False)
    assert stats.lines == 2
    lines = (tmp_path / "out" / "r.jsonl.out").read_text().splitlines()
    assert "scores" in json.loads(lines[0]) and len(json.loads(lines[1])["embeddings"]) == 1024

    app = App(Settings(model_dir=model_dir))
    app.ready(predictor)
    response = app.handle("POST", "/invocations", {"Content-Type": "application/json"},
                          b'{"instances": [{"in1": [5, 6]}]}')
    assert response.status == 200
    assert len(json.loads(response.body)["predictions"][0]["embeddings"]) == 1024


def test_pooled_model_above_1000_trains_resumes_and_loads(tmp_path):
    """The plainest pooled run of the issue (enc_dim above 1000), interrupted and resumed."""
    from o2v_jax.data import read_channel
    from o2v_jax.training import train

    config = from_hyperparameters({"enc0_network": "pooled_embedding", "enc0_vocab_size": 40,
                                   "enc0_max_seq_len": 4, "enc_dim": 1001, "mlp_dim": 4,
                                   "mini_batch_size": 16, "epochs": 2})
    data = read_channel(write_jsonl(tmp_path / "t.jsonl", group_pairs(32, 0, max_len=4)), config)
    run = dict(model_dir=tmp_path / "m", emit=lambda line: None, progress=False)
    first = train(config, data, stop_after_epochs=1, **run)
    assert first.epochs_run == 1 and not (tmp_path / "m" / "model.json").exists()
    # Resuming re-reads what the interrupted run saved (its resolved hyperparameters).
    done = train(config, data, resume=True, **run)
    assert done.epochs_run == 2 and len(done.history) == 2
    loaded, _ = checkpoint.read_config(tmp_path / "m")
    assert loaded == config
    assert o2v_jax.load(tmp_path / "m").embed([[1, 2]]).shape == (1, 1001)


# ----------------------------------------------------------------- a sample, end to end


def _small_maps(seed: int) -> list[dict]:
    """Small valid maps: each network on each side, enc1=enc0, tied and untied tables,
    row_sparse, regression, and pooled encoders with enc_dim above the user-facing token
    range (the coupled case); the other settings drawn from a seeded generator."""
    rng = np.random.default_rng(seed)
    sides = [("pooled_embedding", "enc0", 1024), ("hcnn", "bilstm", None),
             ("pooled_embedding", "hcnn", 1001), ("bilstm", "pooled_embedding", None)]
    maps = []
    for net0, net1, enc_dim in sides:
        hp = {"enc0_network": net0, "enc0_vocab_size": 40, "enc0_max_seq_len": 6,
              "enc_dim": enc_dim or int(rng.integers(4, 12)),
              "enc0_token_embedding_dim": int(rng.integers(2, 8)),
              "mlp_dim": 4, "mlp_layers": int(rng.integers(0, 2)), "mini_batch_size": 16,
              "epochs": 1, "enc0_layers": str(rng.choice(["1", "2"] if net0 == "hcnn" else ["auto", "1"])),
              "comparator_list": ", ".join(rng.permutation(COMPARATORS)[:int(rng.integers(1, 4))]),
              "output_layer": str(rng.choice(OUTPUT_LAYERS)),
              "token_embedding_storage_type": str(rng.choice(["dense", "row_sparse"]))}
        if net1 != "enc0":
            hp.update({"enc1_network": net1, "enc1_vocab_size": 40, "enc1_max_seq_len": 5,
                       "enc1_token_embedding_dim": hp["enc0_token_embedding_dim"]})
        if "pooled_embedding" not in (net0, net1) or net1 == "enc0":
            hp["tied_token_embedding_weight"] = bool(rng.random() < 0.5)
        maps.append(hp)
    return maps


# Four runs (each compiles a model: the suite's time budget), with a seed whose draws cover
# what the coverage test below asks for.
SMALL = _small_maps(seed=1)


def test_small_sample_covers_the_coupled_case():
    configs = [from_hyperparameters(hp) for hp in SMALL]
    assert any(c.enc_dim > 1000 for c in configs)
    assert {c.enc0.network for c in configs} | {c.enc1.network for c in configs} == set(NETWORKS)
    assert {c.tied_token_embedding_weight for c in configs} == {True, False}
    assert {c.token_embedding_storage_type for c in configs} == {"dense", "row_sparse"}
    assert {c.is_regression for c in configs} == {True, False}


@pytest.mark.parametrize("hp", SMALL, ids=[f"{h['enc0_network']}-{h.get('enc1_network', 'enc0')}-{h['enc_dim']}"
                                           for h in SMALL])
def test_train_load_embed(hp, tmp_path):
    from o2v_jax.data import read_channel
    from o2v_jax.training import train

    config = from_hyperparameters(hp)
    records = group_pairs(24, 1, max_len=5, regression=config.is_regression)
    data = read_channel(write_jsonl(tmp_path / "t.jsonl", records), config)
    train(config, data, model_dir=tmp_path / "m", emit=lambda line: None, progress=False)
    model = o2v_jax.load(tmp_path / "m")
    assert isinstance(model.config, Config) and model.config == config
    for encoder in ("in0", "in1"):
        out = model.embed([[1, 2, 3], [7], []], encoder=encoder)
        assert out.shape == (3, config.enc_dim) and np.isfinite(out).all()


# ----------------------------------------------------------------- inputs that may be gone


def test_pretrained_model_needs_no_auxiliary_after_training(tmp_path, capsys):
    """Serving, evaluating, transforming and resuming never re-read the auxiliary
    channel: the pretrained rows live in the parameters, the frozen-row masks in the
    training state. Here the channel is deleted between an interrupted run and its resume."""
    from o2v_jax.cli import main
    from o2v_jax.data import read_channel
    from o2v_jax.pretrained import read_auxiliary
    from o2v_jax.training import train

    hp = {"enc0_network": "pooled_embedding", "enc0_vocab_size": 40, "enc0_max_seq_len": 8,
          "enc_dim": 8, "mlp_dim": 8, "mini_batch_size": 16, "epochs": 2,
          "enc0_pretrained_embedding_file": "glove.txt", "enc0_vocab_file": "vocab.json"}
    aux = tmp_path / "aux"
    aux.mkdir()
    rng = np.random.default_rng(0)
    vectors = {f"w{i}": rng.normal(size=8).round(4) for i in range(1, 10)}
    (aux / "vocab.json").write_text(json.dumps({w: i for i, w in enumerate(vectors, 1)}))
    (aux / "glove.txt").write_text("".join(w + " " + " ".join(map(str, v)) + "\n"
                                           for w, v in vectors.items()))
    train_file = write_jsonl(tmp_path / "train.jsonl", group_pairs(48, 0))
    config = from_hyperparameters(hp)
    data = read_channel(train_file, config)
    pretrained = read_auxiliary(aux, config)
    run = dict(emit=lambda line: None, progress=False, pretrained=pretrained)
    whole = train(config, data, model_dir=tmp_path / "whole", **run)
    train(config, data, model_dir=tmp_path / "m", stop_after_epochs=1, **run)
    shutil.rmtree(aux)

    (tmp_path / "hp.json").write_text(json.dumps({k: str(v) for k, v in hp.items()}))
    assert main(["train", "--train", str(train_file), "--hyperparameters", str(tmp_path / "hp.json"),
                 "--model-dir", str(tmp_path / "m"), "--resume", "--no-progress"]) == 0
    capsys.readouterr()
    model = o2v_jax.load(tmp_path / "m")
    same = o2v_jax.load(tmp_path / "whole")
    ids = [[i] for i in range(1, 10)]
    # Frozen pretrained rows never moved, and the resumed run equals the whole one.
    np.testing.assert_allclose(model.embed(ids), np.stack(list(vectors.values())), atol=1e-6)
    np.testing.assert_array_equal(model.embed([[12, 30], [20]]), same.embed([[12, 30], [20]]))
    assert whole.epochs_run == 2

    assert main(["evaluate", "--model-dir", str(tmp_path / "m"), "--data", str(train_file)]) == 0
    assert "cross_entropy" in capsys.readouterr().out
    requests = write_jsonl(tmp_path / "req.jsonl", [{"in0": [1, 2], "in1": [3]}])
    assert main(["transform", "--model-dir", str(tmp_path / "m"), "--input", str(requests),
                 "--output", str(tmp_path / "out"), "--no-progress"]) == 0
    assert "scores" in (tmp_path / "out" / "req.jsonl.out").read_text()
