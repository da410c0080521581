"""Predictor: no compiles after warm-up (the server's request path included),
bucket/batch invariance, same answers as the model, input forms, validation,
INFERENCE_PREFERRED_MODE, the compile cache. respond() with a predictor: test_app.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import count_compiles, tiny_hp, train_tiny_model

import o2v_jax
from o2v_jax import checkpoint, media
from o2v_jax.app import respond
from o2v_jax.config import from_hyperparameters
from o2v_jax.ragged import Ragged
from o2v_jax.model import abstract_model, merge_params
from o2v_jax.env import PREFERRED_MODE as ENV_PREFERRED_MODE
from o2v_jax.predictor import load
from o2v_jax.training import init_params

ATOL = 1e-5  # float32 on CPU; see docs/inference.md "Same answers everywhere"
# Small ladders keep the suite fast and still exercise every code path: lengths
# (4, 8, 12), batch sizes (1, 4, 16), and a token cap that drops 16 for L > 4.
HP = dict(enc0_max_seq_len=12, bucket_width=4, enc_dim=8, mlp_dim=8, epochs=1, mini_batch_size=8)
SMALL = {"batch_sizes": (1, 4, 16), "max_batch_tokens": 64}
VOCAB = 40


def save_untrained(path, **overrides):
    """A model directory from init_params + save_model (no training: fast)."""
    config = from_hyperparameters(tiny_hp(**{**HP, **overrides}))
    _, params, _ = init_params(config, 0, (None, None))
    checkpoint.save_model(path, hyperparameters=config.to_hyperparameters(), params=params,
                          metadata={})
    return path


def reference(model_dir):
    """The training-side model, rebuilt from the saved parameters."""
    config = from_hyperparameters(checkpoint.read_manifest(model_dir)["hyperparameters"])
    graphdef, abstract = abstract_model(config)
    _, params, _ = checkpoint.load_model(model_dir, target=jax.tree.map(
        lambda s: np.zeros(s.shape, s.dtype), abstract))
    return merge_params(graphdef, jax.tree.map(jnp.asarray, params))


def padded(seqs, length=12):
    """int32 (N, length), sequences cut to length and 0-padded."""
    out = np.zeros((len(seqs), length), np.int32)
    for i, s in enumerate(seqs):
        s = s[:length]
        out[i, :len(s)] = s
    return out


def random_seqs(rng, n, max_len=12, min_len=1):
    return [rng.integers(1, VOCAB, rng.integers(min_len, max_len + 1)).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny pooled_embedding classifier trained for one epoch."""
    return train_tiny_model(tmp_path_factory.mktemp("predictor"), **HP)


@pytest.fixture(scope="module")
def predictor(model_dir):
    return load(model_dir, **SMALL)


# --------------------------------------------------------------------------- compiles

def test_no_compilation_after_warmup(model_dir):
    p = load(model_dir, **SMALL)
    with count_compiles() as before:
        p.embed([[1, 2, 3]])
    assert before, "the counter must see the lazy compile of an unwarmed predictor"
    seconds = p.warmup()
    assert seconds >= 0 and p.num_compiled == len(p.executable_keys())
    rng = np.random.default_rng(0)
    with count_compiles() as events:
        for _ in range(30):
            n = int(rng.integers(0, 40))
            seqs = random_seqs(rng, n, max_len=15, min_len=0)  # > 12 is truncated
            others = random_seqs(rng, n, max_len=15)
            p.embed(seqs, encoder="in0")
            p.embed(seqs, encoder="in1")
            p.predict(seqs, others)
        p.embed(padded(random_seqs(rng, 5), 12))
        respond(b'{"in0": [1, 2], "in1": [3]}\n', media.JSONLINES, media.JSON, p)
    assert events == []
    assert p.num_compiled == len(p.executable_keys())


def test_executables_cover_ladders_and_token_cap(model_dir):
    p = load(model_dir, **SMALL)
    assert p.ladders == ((4, 8, 12), (4, 8, 12))
    assert p.sizes_for(4) == (1, 4, 16) and p.sizes_for(8) == (1, 4) and p.sizes_for(100) == (1,)
    keys = p.executable_keys()
    assert len(keys) == len(set(keys)) == 2 * (3 + 2 + 2) + 3


# --------------------------------------------------------------------------- same answers

@pytest.mark.parametrize("network", ["pooled_embedding", "hcnn", "bilstm"])
def test_embed_is_bucket_and_batch_invariant(tmp_path, network):
    model_dir = save_untrained(tmp_path / network, enc0_network=network,
                               enc0_token_embedding_dim=8,
                               enc0_layers=2 if network == "hcnn" else 1)
    p = load(model_dir, **SMALL)
    rng = np.random.default_rng(1)
    seqs = random_seqs(rng, 23)
    together = p.embed(seqs)
    alone = np.stack([p.embed([s])[0] for s in seqs[:8]])
    np.testing.assert_allclose(alone, together[:8], atol=ATOL, rtol=0)
    # Another batch ladder: every sequence in a 32-row batch, mostly padding rows.
    other = load(model_dir, batch_sizes=(32,), max_batch_tokens=1000).embed(seqs)
    np.testing.assert_allclose(other, together, atol=ATOL, rtol=0)
    model = reference(model_dir)
    np.testing.assert_allclose(together, np.asarray(model.encode(padded(seqs), 0)), atol=ATOL, rtol=0)
    assert np.abs(together).max() > 0


def test_bilstm_and_hcnn_sides_look_up_a_token_projection_table(tmp_path, monkeypatch):
    from o2v_jax import predictor as predictor_module

    model_dir = save_untrained(tmp_path / "m", enc0_network="bilstm", enc0_token_embedding_dim=6,
                               enc_dim=7, enc1_network="hcnn",
                               enc1_max_seq_len=12, enc1_vocab_size=VOCAB + 5,
                               enc1_token_embedding_dim=6, enc1_layers=2, enc1_cnn_filter_width=2)
    one_size = {"batch_sizes": (32,), "max_batch_tokens": 1000}  # few executables: fast
    p = load(model_dir, **one_size)
    # bilstm: 4 (h_fwd + h_bwd) columns; hcnn: width 2 x 4 first-layer filters (7 = 4 + 3).
    assert p._parts[0].params["projection"].shape == (VOCAB, 4 * 7)
    assert p._parts[1].params["projection"].shape == (VOCAB + 5, 2 * 4)
    # ... and no longer hold the token tables, which the executables do not read.
    assert "embed0" not in p._parts[0].params and "embed1" not in p._parts[1].params
    # The cap is one byte below the bilstm table: that side falls back to the matmul.
    monkeypatch.setattr(predictor_module, "PROJECTION_MAX_BYTES", VOCAB * 4 * 7 * 4 - 1)
    capped = load(model_dir, **one_size)
    assert "projection" not in capped._parts[0].params and "projection" in capped._parts[1].params
    assert "embed0" in capped._parts[0].params
    monkeypatch.setattr(predictor_module, "PROJECTION_MAX_BYTES", 0)
    plain = load(model_dir, **one_size)
    assert not any("projection" in plain._parts[side].params for side in (0, 1))
    # (test_embed_is_bucket_and_batch_invariant compares the tables with the training model)
    rng = np.random.default_rng(4)
    in0, in1 = random_seqs(rng, 19), random_seqs(rng, 19)
    for side, seqs in ((0, in0), (1, in1)):
        got = p.embed(seqs, encoder=f"in{side}")
        np.testing.assert_allclose(got, plain.embed(seqs, encoder=f"in{side}"), atol=ATOL, rtol=0)
    np.testing.assert_allclose(capped.embed(in0), p.embed(in0), atol=ATOL, rtol=0)
    np.testing.assert_allclose(p.predict(in0, in1), plain.predict(in0, in1), atol=ATOL, rtol=0)


def test_embed_and_predict_equal_the_training_model(model_dir, predictor):
    model = reference(model_dir)
    rng = np.random.default_rng(2)
    in0, in1 = random_seqs(rng, 37), random_seqs(rng, 37)
    for side, seqs in ((0, in0), (1, in1)):
        want = np.asarray(model.encode(padded(seqs), side))
        got = predictor.embed(seqs, encoder=f"in{side}")
        assert got.dtype == np.float32 and got.shape == (37, 8)
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    logits, _ = model(padded(in0), padded(in1))
    want = np.asarray(jax.nn.softmax(logits, axis=-1))
    got = predictor.predict(in0, in1)
    assert got.shape == (37, 2)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-6)


def test_regression_predict_returns_one_column(tmp_path):
    model_dir = save_untrained(tmp_path / "reg", output_layer="mean_squared_error")
    p = load(model_dir, **SMALL)
    rng = np.random.default_rng(3)
    in0, in1 = random_seqs(rng, 9), random_seqs(rng, 9)
    output, _ = reference(model_dir)(padded(in0), padded(in1))
    got = p.predict(in0, in1)
    assert got.shape == (9, 1)
    np.testing.assert_allclose(got, np.asarray(output), atol=ATOL, rtol=0)


def test_caller_order_is_kept(predictor):
    rng = np.random.default_rng(4)
    seqs = random_seqs(rng, 30)  # shuffled lengths across all buckets
    forward = predictor.embed(seqs)
    perm = rng.permutation(30)
    np.testing.assert_allclose(predictor.embed([seqs[i] for i in perm]), forward[perm], atol=ATOL)
    scores = predictor.predict(seqs, seqs[::-1])
    np.testing.assert_allclose(predictor.predict([seqs[i] for i in perm],
                                                 [seqs[::-1][i] for i in perm]), scores[perm],
                               atol=ATOL)


def test_chunks_and_out_give_the_same_result(model_dir, predictor):
    rng = np.random.default_rng(5)
    seqs = random_seqs(rng, 30)
    want = predictor.embed(seqs)
    chunked = load(model_dir, chunk_size=7, **SMALL)
    out = np.full((30, 8), np.nan, np.float32)
    assert chunked.embed(seqs, out=out) is out
    np.testing.assert_allclose(out, want, atol=ATOL, rtol=0)
    np.testing.assert_allclose(chunked.predict(seqs, seqs), predictor.predict(seqs, seqs), atol=ATOL)


# --------------------------------------------------------------------------- inputs

def test_array_ragged_and_list_inputs_agree(predictor):
    rng = np.random.default_rng(6)
    seqs = random_seqs(rng, 12)
    want = predictor.embed(seqs)
    array = padded(seqs)
    lengths = np.array([len(s) for s in seqs])
    np.testing.assert_allclose(predictor.embed(array, lengths=lengths), want, atol=ATOL)
    np.testing.assert_allclose(predictor.embed(array), want, atol=ATOL)  # 0-padded
    np.testing.assert_allclose(predictor.embed(array.astype(np.int64)), want, atol=ATOL)
    np.testing.assert_allclose(predictor.embed(Ragged.from_lists(seqs)), want, atol=ATOL)
    np.testing.assert_allclose(predictor.embed([np.array(s) for s in seqs]), want, atol=ATOL)
    # lengths shorter than the row: the ids after it are ignored
    cut = predictor.embed(array, lengths=np.minimum(lengths, 2))
    np.testing.assert_allclose(cut, predictor.embed([s[:2] for s in seqs]), atol=ATOL)
    np.testing.assert_allclose(predictor.predict(array, array, in0_lengths=lengths),
                               predictor.predict(seqs, seqs), atol=ATOL)
    # a token that is not a number: its sequence and position (rows counted from 0)
    for bad, got in (([[1, 2], [3, "a"]], "str 'a'"), ([[1], [[2]]], "list [2]"), ([[None]], "NoneType")):
        with pytest.raises(TypeError, match=rf"in0 sequence {len(bad) - 1}, position \d: expected an "
                                            rf"integer token id, got {re.escape(got)}"):
            predictor.embed(bad)
    # an array of no columns is N empty sequences, as [[], ...] is
    np.testing.assert_array_equal(predictor.embed(np.zeros((2, 0), np.int32)),
                                  predictor.embed([[], []]))


def test_long_sequences_are_truncated_like_training(predictor):
    long = list(range(1, 30))
    np.testing.assert_allclose(predictor.embed([long]), predictor.embed([long[:12]]), atol=ATOL)


def test_empty_input(predictor):
    assert predictor.embed([]).shape == (0, 8)
    assert predictor.embed(np.zeros((0, 5), np.int32), encoder="in1").shape == (0, 8)
    assert predictor.predict([], []).shape == (0, 2)
    empty_row = predictor.embed([[], [3]])  # an empty sequence is all padding: finite
    assert np.isfinite(empty_row).all()


@pytest.mark.parametrize("seqs, where, value", [
    ([[1, 2], [3], [4, 5, 40]], "in0 sequence 2, position 2", "token id 40"),
    ([[1, 2], [-1]], "in0 sequence 1, position 0", "token id -1"),
    ([[1], [2**70]], "in0 sequence 1, position 0", f"token id {2**70}"),
])
def test_out_of_range_ids_name_row_and_position(predictor, seqs, where, value):
    with pytest.raises(ValueError, match=f"{where}: {value} is out of range.*\\[0, 39\\]"):
        predictor.embed(seqs)


def test_out_of_range_errors_count_rows_across_chunks_and_sides(model_dir, predictor):
    chunked = load(model_dir, chunk_size=4, **SMALL)
    seqs = [[1]] * 9 + [[1, 99]]
    with pytest.raises(ValueError, match="in1 sequence 9, position 1: token id 99"):
        chunked.embed(seqs, encoder="in1")
    with pytest.raises(ValueError, match="in1 sequence 9, position 1"):
        predictor.predict([[1]] * 10, seqs)
    with pytest.raises(ValueError, match="in0 sequence 0, position 3"):
        predictor.embed(np.array([[1, 2, 3, 41]]))


def test_bad_input_shapes_and_arguments(predictor):
    with pytest.raises(TypeError, match="list of token ids"):
        predictor.embed([1, 2, 3])
    with pytest.raises(TypeError, match="2-D integer"):
        predictor.embed(np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="lengths must be 2 integers"):
        predictor.embed(np.ones((2, 3), np.int32), lengths=[1, 4])
    with pytest.raises(ValueError, match="encoder='enc0'"):
        predictor.embed([[1]], encoder="enc0")
    with pytest.raises(ValueError, match="in0 has 2 sequences but in1 has 1"):
        predictor.predict([[1], [2]], [[1]])


def test_predictor_exposes_its_shape(predictor):
    assert predictor.enc_dim == 8 and predictor.num_outputs == 2
    assert predictor.vocab_sizes == (VOCAB, VOCAB) and predictor.max_seq_lens == (12, 12)
    assert predictor.config.enc0.network == "pooled_embedding"
    assert o2v_jax.load is not None and "Predictor(" in repr(predictor)


# --------------------------------------------------------------------------- preferred mode

def test_preferred_mode_from_environment(model_dir, monkeypatch):
    monkeypatch.setenv(ENV_PREFERRED_MODE, "embedding")
    p = load(model_dir, **SMALL)
    assert p.preferred_mode == "embedding"
    assert p.executable_keys()[0][0] == "encode" and p.executable_keys()[-1][0] == "head"
    # The other mode still answers, and answers the same.
    q = load(model_dir, preferred_mode="classification", **SMALL)
    assert q.preferred_mode == "classification" and q.executable_keys()[0][0] == "head"
    seqs = [[1, 2, 3], [4]]
    np.testing.assert_allclose(p.predict(seqs, seqs), q.predict(seqs, seqs), atol=ATOL)
    monkeypatch.setenv(ENV_PREFERRED_MODE, " Classification ")
    assert load(model_dir, **SMALL).preferred_mode == "classification"
    monkeypatch.delenv(ENV_PREFERRED_MODE)
    assert load(model_dir, **SMALL).preferred_mode == "classification"  # the default


def test_invalid_preferred_mode_is_a_clear_error(model_dir, monkeypatch):
    monkeypatch.setenv(ENV_PREFERRED_MODE, "gpu")
    with pytest.raises(ValueError, match="INFERENCE_PREFERRED_MODE='gpu' is invalid.*embedding"):
        load(model_dir)
    assert load(model_dir, preferred_mode="embedding").preferred_mode == "embedding"  # arg wins
    with pytest.raises(ValueError, match="preferred_mode='scores' is invalid"):
        load(model_dir, preferred_mode="scores")


# --------------------------------------------------------------------------- compile cache

CACHE_SCRIPT = textwrap.dedent("""
    import json, sys, jax
    from o2v_jax.predictor import load
    events = {"compiles": 0, "hits": 0}  # compile requests, persistent-cache hits
    def on_duration(name, secs, **kw):
        if name == "/jax/core/compile/backend_compile_duration":
            events["compiles"] += 1
    def on_event(name, **kw):
        if name == "/jax/compilation_cache/cache_hits":
            events["hits"] += 1
    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    p = load(sys.argv[1], compile_cache_dir=sys.argv[2], batch_sizes=(1, 4), max_batch_tokens=64)
    p.warmup()
    print(json.dumps({**events, "executables": p.num_compiled}))
""")


def test_persistent_compile_cache_serves_a_second_process(model_dir, tmp_path):
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", CACHE_SCRIPT, str(model_dir), str(tmp_path)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    first, second = runs
    # The compile event wraps cache look-ups too: compiles - hits = real XLA compiles
    # (identical programs, e.g. enc0 and enc1 of one shape, hit even in the first run).
    assert first["compiles"] >= first["executables"] > 0 and first["compiles"] > first["hits"]
    assert any(tmp_path.iterdir())
    assert second["hits"] == second["compiles"] >= second["executables"]


# --------------------------------------------------------------------------- devices

DEVICES_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from conftest import group_pairs
    from o2v_jax.predictor import load
    seqs = [r["in0"] for r in group_pairs(300, 5)]  # lengths 1..8: several length buckets
    one = load(sys.argv[1], batch_sizes=(1, 8, 64))
    four = load(sys.argv[1], batch_sizes=(1, 8, 64), devices=4)
    a, b = one.embed(seqs), four.embed(seqs, encoder="in0")
    pa, pb = one.predict(seqs[:40], seqs[40:80]), four.predict(seqs[:40], seqs[40:80])
    part = four._parts[0].params["embed0"]["embedding"]
    print(json.dumps({"embed": float(np.abs(a - b).max()), "predict": float(np.abs(pa - pb).max()),
                      "sizes": four.sizes_for(8), "placed_on": len(part.sharding.device_set)}))
""")


def test_embed_over_four_devices_gives_the_answers_of_one(model_dir):
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "4",
           "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests)])}
    done = subprocess.run([sys.executable, "-c", DEVICES_SCRIPT, str(model_dir)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["placed_on"] == 4 and out["sizes"] == [4, 32, 256]  # each device: 1, 8, 64 rows
    assert out["embed"] < ATOL and out["predict"] < ATOL
