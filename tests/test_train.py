"""Training: objective, dense steps, frozen rows, early stopping, learning, metric lines,
save/load, resume, compile counts, donation. The row_sparse update: test_row_sparse.py."""

from __future__ import annotations

import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import HPO_REGEXES, count_compiles, group_pairs, random_batch, run_steps, tiny_hp, write_jsonl

from o2v_jax import checkpoint
from o2v_jax.buckets import Batch, batches
from o2v_jax.config import from_hyperparameters
from o2v_jax.data import read_channel
from o2v_jax.metrics import read_history
from o2v_jax.api import evaluate
from o2v_jax.pretrained import Pretrained
from o2v_jax.training import (TrainState, build_steps, evaluate_params, init_params, stage_batch,
                           staged, train)


def _emitted_epochs(lines: list[str]) -> list[int]:
    """The epoch of each train cross_entropy line, in order (one per epoch run)."""
    return [int(m) for m in re.findall(r"epoch=(\d+), train cross_entropy", "\n".join(lines))]


def _data(tmp_path, name, n, seed, config, regression=False):
    path = write_jsonl(tmp_path / f"{name}.jsonl", group_pairs(n, seed, regression=regression))
    return read_channel(path, config, name=name)


@pytest.mark.parametrize("storage", ["dense", "row_sparse"])
def test_accuracy_counts_real_rows_only_when_fill_rows_are_predicted_right(tmp_path, storage):
    # A model that answers class 0 whatever the input (zero output kernel, bias for 0):
    # its accuracy is exactly the share of label-0 records, and the last batch's fill
    # rows (label 0, weight 0) must not add to it, in training sums or in evaluation.
    config = from_hyperparameters(tiny_hp(token_embedding_storage_type=storage))
    records = group_pairs(37, 3)  # 16 + 16 + 5: the third batch has 11 fill rows
    data = read_channel(write_jsonl(tmp_path / "v.jsonl", records), config, name="validation")
    zeros = sum(r["label"] == 0 for r in records)
    assert 0 < zeros < len(records)
    graphdef, params, keep = init_params(config, 0, (None, None))
    params["output"] = {"kernel": jnp.zeros_like(params["output"]["kernel"]),
                        "bias": jnp.array([5.0, -5.0])}
    steps = build_steps(graphdef, config, keep, layout="cpu")
    assert evaluate_params(steps, params, data, config)["accuracy"] == zeros / len(records)

    fill, correct, count = 0, 0.0, 0.0
    for i, batch in enumerate(batches(data, config, shuffle_seed=0)):
        fill += int((batch.weights == 0).sum())
        assert not batch.labels[batch.weights == 0].any()  # fill rows say label 0
        fresh = jax.tree.map(jnp.array, params)  # the step donates its inputs
        batch, _ = stage_batch(batch, "cpu")
        _, sums = steps.train_step(steps.init_state(fresh, i), batch, jax.random.key(0))
        correct += float(sums["correct"])
        count += float(sums["count"])
    assert fill > 0
    assert (correct, count) == (zeros, len(records))


# --------------------------------------------------------------------------- learning

@pytest.mark.parametrize("network", ["pooled_embedding", "hcnn", "bilstm"])
def test_each_encoder_learns_pair_classification(tmp_path, network):
    config = from_hyperparameters(tiny_hp(enc0_network=network, epochs=6, enc0_layers=1,
                                          enc0_token_embedding_dim=16))
    train_data = _data(tmp_path, "train", 512, 0, config)
    val = _data(tmp_path, "val", 128, 1, config)
    lines: list[str] = []
    result = train(config, train_data, validation=val, model_dir=tmp_path / "m",
                   emit=lines.append, progress=False)
    best = result.history[result.best_epoch]
    assert best["validation_accuracy"] > 0.85, result.history
    text = "\n".join(lines)
    for name, regex in HPO_REGEXES.items():
        if not name.startswith("test"):
            assert re.search(regex, text), name


def test_regression_reaches_low_mse(tmp_path):
    config = from_hyperparameters(tiny_hp(output_layer="mean_squared_error", epochs=6))
    train_data = _data(tmp_path, "train", 512, 0, config, regression=True)
    test = _data(tmp_path, "test", 128, 2, config, regression=True)
    lines: list[str] = []
    result = train(config, train_data, test=test, model_dir=tmp_path / "m", emit=lines.append,
                   progress=False)
    # labels are +-1, so predicting the mean would give MSE ~1.
    assert result.test_metrics["mean_squared_error"] < 0.3
    assert any(re.search(r"#quality_metric: host=\S+, test mean_squared_error <loss>=(\S+)", x) for x in lines)


# --------------------------------------------------------------------------- compile counts

@pytest.mark.parametrize("layout,storage", [("cpu", "dense"), ("accelerator", "dense"),
                                            ("accelerator", "row_sparse")])
def test_train_step_compiles_once_per_bucket_shape(tmp_path, layout, storage):
    # Fed as train() feeds it (train.staged: device copies on an accelerator). The CPU
    # row_sparse step compiles per row-set size too (row_sparse.row_cap), so not here.
    config = from_hyperparameters(tiny_hp(enc0_max_seq_len=20, bucket_width=10,
                                          token_embedding_storage_type=storage))
    data = read_channel(write_jsonl(tmp_path / "t.jsonl", group_pairs(200, 0, max_len=20)), config)
    graphdef, params, keep = init_params(config, 0, (None, None), layout=layout)
    steps = build_steps(graphdef, config, keep, layout=layout)
    state, root = steps.init_state(params), jax.random.key(0)
    shapes = set()
    with count_compiles() as compiles:
        for epoch in range(2):
            for b, real in staged(batches(data, config, shuffle_seed=epoch), layout):
                shapes.add((b.in0.shape, b.in1.shape))
                assert real == int(np.asarray(b.weights).sum())
                state, _ = steps.train_step(state, b, root)
    assert len(shapes) > 1
    assert len(compiles) == len(shapes)
    assert int(state.step) == 2 * len(list(batches(data, config, shuffle_seed=0)))


@pytest.mark.parametrize("layout", ["cpu", "accelerator"])
def test_staged_batches_are_the_batches_in_order(tmp_path, layout):
    # train()'s feed: on an accelerator from a worker thread, as device arrays.
    config = from_hyperparameters(tiny_hp(enc0_max_seq_len=20, bucket_width=10))
    data = read_channel(write_jsonl(tmp_path / "t.jsonl", group_pairs(150, 0, max_len=20)), config)
    want = list(batches(data, config, shuffle_seed=3))
    got = list(staged(batches(data, config, shuffle_seed=3), layout))
    assert len(got) == len(want) > 1
    for (b, real), w in zip(got, want):
        assert real == int(w.weights.sum())
        assert isinstance(b.in0, jax.Array) == (layout == "accelerator")
        for x, y in zip((b.in0, b.in1, b.labels, b.weights), (w.in0, w.in1, w.labels, w.weights)):
            np.testing.assert_array_equal(np.asarray(x), y)


@pytest.mark.parametrize("layout,storage", [("cpu", "dense"), ("cpu", "row_sparse"),
                                            ("accelerator", "row_sparse")])
def test_train_step_donates_its_state_and_counts_steps(layout, storage):
    # The step overwrites the parameters and optimizer state in place (donated buffers),
    # and folds its dropout key from (root, state.step), so the step number advances.
    config = from_hyperparameters(tiny_hp(token_embedding_storage_type=storage, dropout=0.2))
    graphdef, params, keep = init_params(config, 0, (None, None), layout=layout)
    steps = build_steps(graphdef, config, keep, layout=layout)
    state = steps.init_state(params, step=5)
    new, sums = steps.train_step(state, Batch(*random_batch(vocab_used=10)), jax.random.key(0))
    assert int(new.step) == 6 and float(sums["count"]) == 16.0
    donated = jax.tree.leaves((state.params, state.opt_state))
    assert all(x.is_deleted() for x in donated if x.size), "the step must donate its state"
    assert isinstance(new, TrainState) and not any(x.is_deleted() for x in jax.tree.leaves(new))


def test_the_dropout_key_is_folded_from_the_state_step():
    # Two runs from step 0 agree; a run that starts at another step number differs.
    config = from_hyperparameters(tiny_hp(dropout=0.5))
    graphdef, params, keep = init_params(config, 0, (None, None), layout="cpu")
    steps = build_steps(graphdef, config, keep, layout="cpu")
    batch = Batch(*random_batch(vocab_used=10))

    def loss_after(step):
        fresh = jax.tree.map(jnp.array, params)
        return float(steps.train_step(steps.init_state(fresh, step), batch, jax.random.key(0))[1]["loss"])

    assert loss_after(0) == loss_after(0) != loss_after(1)


def test_steps_and_model_must_share_a_layout():
    config = from_hyperparameters(tiny_hp())
    graphdef, params, keep = init_params(config, 0, (None, None), layout="cpu")
    steps = build_steps(graphdef, config, keep, layout="accelerator")
    with pytest.raises(ValueError, match="layout='cpu' but the steps for 'accelerator'"):
        steps.train_step(steps.init_state(params), Batch(*random_batch(vocab_used=10)),
                         jax.random.key(0))


# --------------------------------------------------------------------------- frozen rows

def pretrained_rows(vocab: int = 40, dim: int = 16):
    """A Pretrained with rows 1, 2, 3, 5 found (distinct values), and its vectors."""
    found = np.zeros(vocab, bool)
    found[[1, 2, 3, 5]] = True
    vectors = np.where(found[:, None], np.arange(vocab * dim, dtype=np.float32).reshape(vocab, dim) / 100, 0)
    return Pretrained(vectors=vectors.astype(np.float32), found=found), vectors


@pytest.mark.parametrize("optimizer", ["adam", "adagrad", "rmsprop", "adadelta", "sgd"])
def test_frozen_pretrained_rows_never_change(optimizer):
    # (The row_sparse update: test_row_sparse.py.)
    config = from_hyperparameters(tiny_hp(optimizer=optimizer, weight_decay=0.5,
                                          enc0_pretrained_embedding_file="g.txt",
                                          enc0_vocab_file="v.json"))
    pre, vectors = pretrained_rows()
    before, params, _ = run_steps(config, random_batch(vocab_used=10), pretrained=(pre, pre))
    for name in ("embed0", "embed1"):
        new = np.asarray(params[name]["embedding"])
        np.testing.assert_array_equal(new[pre.found], vectors[pre.found])  # initialised and frozen
        assert not np.allclose(new[[4, 6, 7]], before[name]["embedding"][[4, 6, 7]])


def test_unfrozen_pretrained_rows_train():
    config = from_hyperparameters(tiny_hp(enc0_pretrained_embedding_file="g.txt", enc0_vocab_file="v.json",
                                          enc0_freeze_pretrained_embedding="false"))
    found = np.zeros(40, bool)
    found[1:5] = True
    pre = Pretrained(vectors=np.ones((40, 16), np.float32), found=found)
    before, params, _ = run_steps(config, random_batch(vocab_used=10), pretrained=(pre, pre))
    np.testing.assert_array_equal(before["embed0"]["embedding"][1:5], 1.0)
    assert not np.allclose(np.asarray(params["embed0"]["embedding"][1:5]), 1.0)


# --------------------------------------------------------------------------- checkpoints

def test_save_load_identical_metrics_and_determinism(tmp_path):
    config = from_hyperparameters(tiny_hp(epochs=2, dropout=0.2))
    data = _data(tmp_path, "train", 128, 0, config)
    val = _data(tmp_path, "val", 64, 1, config)
    path = write_jsonl(tmp_path / "val2.jsonl", group_pairs(64, 1))
    r1 = train(config, data, validation=val, model_dir=tmp_path / "a", emit=lambda _: None, progress=False)
    r2 = train(config, data, validation=val, model_dir=tmp_path / "b", emit=lambda _: None, progress=False)
    assert r1.history[-1]["validation_cross_entropy"] == r2.history[-1]["validation_cross_entropy"]
    saved = evaluate(tmp_path / "a", path)
    assert saved["cross_entropy"] == pytest.approx(r1.history[r1.best_epoch]["validation_cross_entropy"], rel=1e-6)
    assert not (tmp_path / "a" / "training").exists()  # resume state cleared when done
    _, pa, _ = checkpoint.load_model(tmp_path / "a")
    _, pb, _ = checkpoint.load_model(tmp_path / "b")
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_equals_uninterrupted_run(tmp_path):
    # Resuming runs only the epochs after the saved one (a run that checked the saved
    # state and then started again at epoch 0 would reach the same result), keeps the
    # saved history, timings included, and refuses a damaged state.
    config = from_hyperparameters(tiny_hp(epochs=4, dropout=0.1, negative_sampling_rate=1))
    data = _data(tmp_path, "train", 96, 0, config)
    val = _data(tmp_path, "val", 32, 1, config)
    kw = dict(validation=val, progress=False)
    full = train(config, data, model_dir=tmp_path / "full", emit=lambda _: None, **kw)
    lines: list[str] = []
    part = train(config, data, model_dir=tmp_path / "part", stop_after_epochs=2, emit=lines.append, **kw)
    assert part.epochs_run == 2 and _emitted_epochs(lines) == [0, 1]
    assert (tmp_path / "part" / "training").exists()

    damaged = tmp_path / "damaged"  # the same state, one array's checksum wrong
    shutil.copytree(tmp_path / "part", damaged)
    manifest_path = damaged / "training" / "state.json"
    manifest = json.loads(manifest_path.read_text())
    name = sorted(manifest["checksums"])[-1]
    manifest["checksums"][name] = "crc32:00000000"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(checkpoint.ModelDirError, match=f"array {name} does not match the checksum"):
        train(config, data, model_dir=damaged, resume=True, emit=lambda _: None, **kw)

    # metrics.jsonl: the two epochs run, and a line for epoch 2 as if the run had been
    # stopped after writing it but before saving the state: resuming must not repeat it.
    metrics_path = tmp_path / "part" / "metrics.jsonl"
    assert [r["epoch"] for r in read_history(metrics_path)] == [0, 1]
    with open(metrics_path, "a") as f:
        f.write(json.dumps({**part.history[-1], "epoch": 2}) + "\n")

    lines.clear()
    resumed = train(config, data, model_dir=tmp_path / "part", resume=True, emit=lines.append, **kw)
    assert resumed.epochs_run == 4 and _emitted_epochs(lines) == [2, 3]
    assert resumed.history[:2] == part.history
    assert read_history(metrics_path) == resumed.history
    assert read_history(tmp_path / "full" / "metrics.jsonl") == full.history
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3]
    assert [h["validation_cross_entropy"] for h in resumed.history] == \
        [h["validation_cross_entropy"] for h in full.history]
    _, pf, _ = checkpoint.load_model(tmp_path / "full")
    _, pr, _ = checkpoint.load_model(tmp_path / "part")
    for x, y in zip(jax.tree.leaves(pf), jax.tree.leaves(pr)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def rising_validation_run(tmp_path_factory):
    """A run whose validation loss rises after its first epoch: the validation labels are
    the training labels' opposite, and a high learning rate fits the training pairs fast.
    Patience 1 of 8 epochs: early stopping ends it after epoch 2, and epoch 0 is best."""
    root = tmp_path_factory.mktemp("rising")
    config = from_hyperparameters(tiny_hp(epochs=8, early_stopping_patience=1, learning_rate=0.05))
    data = read_channel(write_jsonl(root / "train.jsonl", group_pairs(128, 0, max_len=4)), config)
    flipped = [dict(r, label=1 - r["label"]) for r in group_pairs(48, 1, max_len=4)]
    val_path = write_jsonl(root / "val.jsonl", flipped)
    val = read_channel(val_path, config, name="validation")
    lines: list[str] = []
    result = train(config, data, validation=val, test=val, model_dir=root / "m",
                   emit=lines.append, progress=False)
    return result, lines, val_path


def test_the_best_epoch_is_kept_not_the_last(rising_validation_run):
    result, lines, val_path = rising_validation_run
    losses = [h["validation_cross_entropy"] for h in result.history]
    assert result.best_epoch == int(np.argmin(losses)) == 0 < len(losses) - 1, losses
    assert losses[-1] > losses[0] + 0.1  # the last epoch is clearly worse
    _, _, meta = checkpoint.load_model(result.model_dir)
    assert (meta["best_epoch"], meta["epochs_run"]) == (0, len(losses))
    # The saved parameters are the best epoch's: they score its validation loss again.
    saved = evaluate(result.model_dir, val_path)
    assert saved["cross_entropy"] == pytest.approx(losses[0], rel=1e-6)
    assert result.test_metrics["cross_entropy"] == pytest.approx(losses[0], rel=1e-6)
    assert f"Best model based on epoch 0. Best loss: {losses[0]:.3f}" in lines


def test_metrics_jsonl_holds_each_epoch_as_the_metric_lines_say(rising_validation_run):
    result, lines, _ = rising_validation_run
    records = read_history(result.model_dir / "metrics.jsonl")
    assert records == result.history and [r["epoch"] for r in records] == [0, 1, 2]
    metric = re.compile(r"#quality_metric: host=algo-1, epoch=(\d+), (train|validation) (\w+) <\w+>=(\S+)")
    found = [m.groups() for m in map(metric.fullmatch, lines) if m]
    assert len(found) == 3 * 4  # per epoch: train and validation cross_entropy and accuracy
    for epoch, channel, name, value in found:
        assert records[int(epoch)][f"{channel}_{name}"] == float(value)  # the same digits
    throughput = [line for line in lines if line.startswith("#throughput_metric")]
    assert throughput == [f"#throughput_metric: host=algo-1, train throughput="
                          f"{r['records_per_second']:.2f} records/second" for r in records]
    assert all(r["seconds"] > 0 for r in records)


def test_early_stopping_ends_the_loop(rising_validation_run):
    # Patience 1: epoch 1 is bad (no better than epoch 0 by the tolerance), epoch 2 is
    # the second bad one, which exceeds the patience: no epoch 3.
    result, lines, _ = rising_validation_run
    assert result.stopped_early and result.epochs_run == 3 and len(result.history) == 3
    assert [h["epoch"] for h in result.history] == [0, 1, 2]
    assert _emitted_epochs(lines) == [0, 1, 2]
    assert lines.count("Bad epochs exceeded patience. Stopping training early!") == 1
    _, _, meta = checkpoint.load_model(result.model_dir)
    assert (meta["stopped_early"], meta["epochs_run"]) == (True, 3)


def test_resume_refuses_other_hyperparameters(tmp_path):
    config = from_hyperparameters(tiny_hp(epochs=3))
    data = _data(tmp_path, "train", 64, 0, config)
    train(config, data, model_dir=tmp_path / "m", stop_after_epochs=1, emit=lambda _: None, progress=False)
    with pytest.raises(checkpoint.ModelDirError, match="other hyperparameters"):
        train(config.replace(learning_rate=0.02), data, model_dir=tmp_path / "m", resume=True,
              emit=lambda _: None, progress=False)


def test_interrupted_save_keeps_previous_model(tmp_path, monkeypatch):
    tree = {"w": np.ones(3, np.float32)}
    checkpoint.save_model(tmp_path, hyperparameters={"a": "1"}, params=tree, metadata={"v": 1})

    def crash(*_a, **_k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint, "_write_json_atomic", crash)
    with pytest.raises(RuntimeError):
        checkpoint.save_model(tmp_path, hyperparameters={"a": "2"}, params={"w": np.zeros(3, np.float32)},
                              metadata={"v": 2})
    monkeypatch.undo()
    hp, params, meta = checkpoint.load_model(tmp_path)
    assert hp == {"a": "1"} and meta == {"v": 1}
    np.testing.assert_array_equal(params["w"], 1.0)
