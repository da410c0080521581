"""The lazy row_sparse update (o2v_jax/row_sparse.py): only the rows a batch reads move,
the same results as the dense update, in every code path (host gradient plan, scatter
buffer, the accelerator layout run on CPU), and the host and device row finders."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_batch, run_steps, tiny_hp

from o2v_jax.buckets import Batch
from o2v_jax.config import from_hyperparameters
from o2v_jax.pretrained import Pretrained
from o2v_jax.row_sparse import (ROW_CHUNK, Options, chunk_gradient, device_rows,
                                gradient_plan, host_rows, plan_batch, row_cap)


@pytest.fixture(params=["plan", "buffer", "accelerator"])
def gradient_path(request):
    """run_steps arguments for every way a row_sparse step sums a pooled table's gradient
    and updates its rows: on CPU, a gradient_plan (tables read by at least
    plan_min_tokens tokens a step) or a (cap, D) scatter-add buffer, then the chunked
    lazy loop; the accelerator layout, one scatter and a one-shot update, run on CPU."""
    if request.param == "accelerator":
        return {"layout": "accelerator"}
    return {"layout": "cpu",
            "options": Options(plan_min_tokens=0 if request.param == "plan" else 10**9)}


@pytest.mark.parametrize("optimizer", ["adam", "adagrad", "sgd"])
@pytest.mark.parametrize("tied", ["true", "false"])
def test_row_sparse_touches_only_batch_rows(optimizer, tied, gradient_path):
    config = from_hyperparameters(tiny_hp(token_embedding_storage_type="row_sparse",
                                          optimizer=optimizer, tied_token_embedding_weight=tied,
                                          weight_decay=0.01))
    before, params, opt_state = run_steps(config, random_batch(vocab_used=10), **gradient_path)
    for name in ("embed0",) + (() if tied == "true" else ("embed1",)):
        old, new = before[name]["embedding"], np.asarray(params[name]["embedding"])
        np.testing.assert_array_equal(new[10:], old[10:])  # unused rows untouched
        assert not np.allclose(new[1:10], old[1:10])  # used rows moved
        for leaf in jax.tree.leaves(opt_state["tables"][name]):
            leaf = np.asarray(leaf)
            if leaf.ndim == 2:
                assert not leaf[10:].any(), "optimizer state of unused rows changed"


def test_row_sparse_matches_dense_sgd_without_decay(gradient_path):
    # Plain SGD has no state, so lazy and dense updates must agree exactly on used rows.
    batch = random_batch(vocab_used=10)
    dense = from_hyperparameters(tiny_hp(optimizer="sgd", learning_rate=0.1))
    sparse = dense.replace(token_embedding_storage_type="row_sparse")
    _, p_dense, _ = run_steps(dense, batch, steps=2, **gradient_path)
    _, p_sparse, _ = run_steps(sparse, batch, steps=2, **gradient_path)
    for a, b in zip(jax.tree.leaves(p_dense), jax.tree.leaves(p_sparse)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ids", ["uniform", "zipf"])
def test_row_sparse_first_adam_step_equals_dense_over_many_row_chunks(ids, gradient_path):
    # From zero moments one Adam step leaves rows without gradient where they are, so the
    # lazy and dense updates agree (to rounding, below); ~900 distinct ids span several of the lazy
    # loop's row chunks (ROW_CHUNK) and a padded row set (row_cap). Zipf ids give
    # chunks of several gather levels (gradient_plan), uniform ones of one.
    hp = tiny_hp(enc0_vocab_size=5000, enc0_max_seq_len=32, optimizer="adam")
    rng = np.random.default_rng(3)
    if ids == "uniform":
        rows = 16
        in0, in1 = (rng.integers(1, 5000, size=(rows, 32)).astype(np.int32) for _ in range(2))
    else:  # 700 ids 3 times (chunks 1 and 2 of 3+ levels), the rest Zipf (a hot chunk 0)
        rows = 48
        flat = np.concatenate([np.repeat(np.arange(1, 701), 3),
                               np.minimum(rng.zipf(1.2, size=2 * rows * 32 - 2100), 4999)])
        in0, in1 = rng.permutation(flat).astype(np.int32).reshape(2, rows, 32)
    in0[:, -3:] = 0
    batch = (in0, in1, rng.integers(0, 2, rows).astype(np.float32), np.ones(rows, np.float32))
    assert len(np.unique(np.concatenate([in0, in1]))) > 2 * ROW_CHUNK
    dense = from_hyperparameters(hp)
    _, p_dense, s_dense = run_steps(dense, batch, steps=1, **gradient_path)
    _, p_sparse, s_sparse = run_steps(
        dense.replace(token_embedding_storage_type="row_sparse"), batch, steps=1, **gradient_path)
    tables = ("embed0", "embed1")
    others = [({k: v for k, v in p.items() if k not in tables}, s)  # all but the tables
              for p, s in ((p_dense, s_dense), (p_sparse, s_sparse))]
    for a, b in zip(jax.tree.leaves(others[0]), jax.tree.leaves(others[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # The tables only to 1% of the learning rate: gradient_plan sums a hot row's many
    # terms in another order, and where they nearly cancel (|g| ~ Adam's eps) the first
    # step lr * g / (|g| + eps) magnifies that rounding (one element of 80,000 here).
    for name in tables:
        np.testing.assert_allclose(np.asarray(p_dense[name]["embedding"]),
                                   np.asarray(p_sparse[name]["embedding"]), rtol=0, atol=1e-4)


@pytest.mark.parametrize("tied", ["true", "false"])
def test_row_sparse_pooled_path_matches_dense_with_dropout(tied, gradient_path):
    # The row_sparse step differentiates pooled encoders w.r.t. their (B, D) outputs and
    # applies model.encode's output dropout itself: same dropout masks (same sites), same
    # gradients as the dense step through the model, or this fails.
    batch = random_batch(vocab_used=30)
    dense = from_hyperparameters(tiny_hp(optimizer="sgd", learning_rate=0.1, dropout=0.3,
                                         tied_token_embedding_weight=tied))
    sparse = dense.replace(token_embedding_storage_type="row_sparse")
    _, p_dense, _ = run_steps(dense, batch, steps=2, **gradient_path)
    _, p_sparse, _ = run_steps(sparse, batch, steps=2, **gradient_path)
    for a, b in zip(jax.tree.leaves(p_dense), jax.tree.leaves(p_sparse)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def _plan_case(case):
    """(bags, vocab) for test_gradient_plan_sums_each_rows_tokens."""
    rng = np.random.default_rng(7)
    if case == "zipf_tied":  # hot chunk, chunks of several levels, padding, a padded cap
        bags = [np.minimum(rng.zipf(1.3, size=(16, length)), 4999) for length in (32, 40)]
        bags[0][:, 28:] = 0
        return bags, 5000
    if case == "one_full_chunk":  # 255 ids + row 0 = exactly ROW_CHUNK rows
        return [np.arange(1, 256).reshape(5, 51)], 300
    if case == "two_full_chunks":  # 511 ids + row 0 = exactly 2 * ROW_CHUNK rows
        return [np.arange(1, 512).reshape(7, 73)], 600
    if case == "one_more_row":  # 256 ids + row 0: row 0 alone in chunk 1
        return [np.arange(1, 257).reshape(4, 64)], 300
    if case == "all_padding":  # only row 0
        return [np.zeros((4, 8)), np.zeros((4, 6))], 50
    if case == "one_id_both_sides":  # one id, many times on both sides
        bags = [np.full((4, 8), 7), np.full((4, 6), 7)]
        bags[1][:, -2:] = 0
        return bags, 50
    if case == "equal_counts":  # 400 ids x 4 tokens each: the most levels per later chunk
        return [rng.permutation(np.repeat(np.arange(1, 401), 4)).reshape(32, 50)], 500
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["zipf_tied", "one_full_chunk", "two_full_chunks", "one_more_row",
                                  "all_padding", "one_id_both_sides", "equal_counts"])
def test_gradient_plan_sums_each_rows_tokens(case):
    # The row_sparse gradient of pooled encoders (gradient_plan + chunk_gradient)
    # against a plain scatter-add. Integer-valued per-row gradients make every float32
    # sum exact, so any token dropped, doubled or sent to the wrong row fails.
    bags, vocab = _plan_case(case)
    bags = [b.astype(np.int32) for b in bags]
    rows, count, hot, levels, level_starts = gradient_plan(bags, vocab)
    n = int(count)
    real = rows[:n]
    read = set(np.concatenate([b.ravel() for b in bags]).tolist()) | {0}
    assert sorted(real.tolist()) == sorted(read)  # each id once, row 0 included
    assert (rows[n:] == vocab).all() and rows.size % ROW_CHUNK == 0
    sources = sum(b.shape[0] for b in bags)
    rng = np.random.default_rng(0)
    per = rng.integers(-8, 9, size=(sources, 3)).astype(np.float32)
    expected = np.zeros((vocab, 3), np.float64)
    for i, b in enumerate(bags):
        for r, row in enumerate(b):
            for t in row[row != 0]:
                expected[t] += per[i * b.shape[0] + r]
    ext = jnp.concatenate([per, jnp.zeros((1, 3)), jnp.asarray(hot) @ per])
    grad = jax.jit(chunk_gradient)
    for c in range(-(-n // ROW_CHUNK)):
        got = np.asarray(grad(ext, levels, level_starts, c))
        ids = rows[c * ROW_CHUNK:(c + 1) * ROW_CHUNK]
        ok = ids < vocab
        np.testing.assert_array_equal(got[ok], expected[ids[ok]], err_msg=f"chunk {c}")
        np.testing.assert_array_equal(got[~ok], 0.0)


@pytest.mark.parametrize("method", ["mark", "sort"])
@pytest.mark.parametrize("case", ["zipf_tied", "one_more_row", "all_padding", "one_id_both_sides"])
def test_device_rows_lists_each_id_once_and_remaps_the_bags(case, method):
    # The accelerator layout's rows (device_rows, both ways of finding them): the
    # distinct ids with row 0, sorted, padded with distinct out-of-range ids, and every
    # bag position pointing at its own id.
    bags, vocab = _plan_case(case)
    bags = [jnp.asarray(b, jnp.int32) for b in bags]
    rows, count, remapped = jax.jit(lambda b: device_rows(b, vocab, method))(bags)
    rows, n = np.asarray(rows), int(count)
    want = np.unique(np.concatenate([[0]] + [np.asarray(b).ravel() for b in bags]))
    np.testing.assert_array_equal(rows[:n], want)
    cap = min(vocab, 1 + sum(b.size for b in bags))
    np.testing.assert_array_equal(rows[n:], vocab + np.arange(n, cap))
    for b, r in zip(bags, remapped):
        np.testing.assert_array_equal(rows[np.asarray(r)], np.asarray(b))




@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_frozen_pretrained_rows_never_change(optimizer, gradient_path):
    config = from_hyperparameters(tiny_hp(optimizer=optimizer, token_embedding_storage_type="row_sparse",
                                          weight_decay=0.5, enc0_pretrained_embedding_file="g.txt",
                                          enc0_vocab_file="v.json"))
    vocab, dim = 40, 16
    found = np.zeros(vocab, bool)
    found[[1, 2, 3, 5]] = True
    vectors = np.where(found[:, None], np.arange(vocab * dim, dtype=np.float32).reshape(vocab, dim) / 100, 0)
    pre = Pretrained(vectors=vectors.astype(np.float32), found=found)
    before, params, _ = run_steps(config, random_batch(vocab_used=10), pretrained=(pre, pre),
                                  **gradient_path)
    for name in ("embed0", "embed1"):
        new = np.asarray(params[name]["embedding"])
        np.testing.assert_array_equal(new[found], vectors[found])  # initialised and frozen
        assert not np.allclose(new[[4, 6, 7]], before[name]["embedding"][[4, 6, 7]])


@pytest.mark.parametrize("case", ["zipf_tied", "one_more_row", "all_padding", "one_id_both_sides"])
def test_host_rows_list_each_id_once_row_0_first(case):
    bags, vocab = _plan_case(case)
    bags = [b.astype(np.int32) for b in bags]
    rows, count, remapped = host_rows(bags, vocab)
    n = int(count)
    want = np.unique(np.concatenate([[0]] + [b.ravel() for b in bags]))
    np.testing.assert_array_equal(rows[:n], want)
    assert (rows[n:] == vocab).all() and rows.size == row_cap(n, min(vocab, 1 + sum(b.size for b in bags)))
    for b, r in zip(bags, remapped):
        np.testing.assert_array_equal(rows[r], b)


def test_row_cap_ladder():
    assert [row_cap(n, 10**6) for n in (1, 256, 257, 385, 513, 769, 1025)] == \
        [256, 256, 512, 512, 768, 1024, 1536]
    assert row_cap(300, 280) == 512  # never below the rows, a multiple of ROW_CHUNK
    assert all(row_cap(n, 10**6) % ROW_CHUNK == 0 for n in range(1, 5000, 37))


@pytest.mark.parametrize("tied", [True, False])
def test_plan_batch_plans_pooled_tables_from_the_token_threshold(tied):
    in0, in1, labels, weights = random_batch(vocab_used=30)
    batch = Batch(in0, in1, labels, weights)
    tables = ("embed0",) if tied else ("embed0", "embed1")
    for min_tokens, pooled, planned in ((0, True, True), (10**9, True, False), (0, False, False)):
        out = plan_batch(batch, tied=tied, vocab=(40, 40), pooled=pooled, plan_min_tokens=min_tokens)
        assert tuple(out.tables) == tables
        np.testing.assert_array_equal(out.batch.in0, in0)
        for name in tables:
            t = out.tables[name]
            assert (t.plan is not None) == planned and (t.remapped is None) == planned
            read = np.concatenate([in0, in1] if tied else [in0] if name == "embed0" else [in1])
            assert sorted(t.rows[:int(t.count)].tolist()) == sorted(set(read.ravel()) | {0})
