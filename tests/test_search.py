"""search.top_k: equal to numpy's stable argsort across chunk boundaries, NaN/inf/-0.0
order, k > N, device inputs, one compile per chunk shape, clear errors."""

from __future__ import annotations


import jax.numpy as jnp
import numpy as np
import pytest

from conftest import count_compiles

from o2v_jax.search import chunk_size, reference_top_k, top_k


def integer_data(rng, q, n, d=6, lo=-2, hi=3):
    """Small integers: every dot product is exact in float32, so XLA and numpy agree to
    the bit and ties are everywhere."""
    return (rng.integers(lo, hi, (q, d)).astype(np.float32),
            rng.integers(lo, hi, (n, d)).astype(np.float32))


# (Q, N, k, query_chunk, candidate_chunk): N not a multiple of the chunk, k > chunk,
# k == N, k > N, N < chunk, one query, one candidate.
SHAPES = [
    (37, 100, 5, 8, 16),
    (37, 100, 40, 8, 16),
    (20, 64, 10, 8, 16),
    (9, 30, 30, 8, 8),
    (9, 30, 50, 8, 8),
    (5, 6, 3, 8, 64),
    (1, 1, 4, 8, 8),
    (70, 1000, 17, 32, 128),
]


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_equals_numpy_exactly_on_integer_data(shape):
    n_q, n, k, qc, nc = shape
    rng = np.random.default_rng(n * 31 + k)
    q, c = integer_data(rng, n_q, n)
    scores, ids = top_k(q, c, k, metric="dot", query_chunk=qc, candidate_chunk=nc)
    ref_s, ref_i = reference_top_k(q, c, k, metric="dot")
    assert ids.shape == (n_q, min(k, n)) and ids.dtype == np.int64
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_array_equal(scores, ref_s)


def test_ties_go_to_the_lower_index_across_chunks():
    # Every score equal: the answer is 0..k-1 whatever the chunking.
    q = np.ones((3, 4), np.float32)
    c = np.ones((50, 4), np.float32)
    for k, nc in ((5, 8), (20, 8), (50, 16)):
        _, ids = top_k(q, c, k, metric="dot", query_chunk=8, candidate_chunk=nc)
        np.testing.assert_array_equal(ids, np.broadcast_to(np.arange(k), (3, k)))


def test_cosine_equals_numpy_up_to_rounding():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((45, 16)).astype(np.float32)
    c = rng.standard_normal((333, 16)).astype(np.float32)
    scores, ids = top_k(q, c, 12, query_chunk=16, candidate_chunk=64)
    ref_s, ref_i = reference_top_k(q, c, 12)
    np.testing.assert_allclose(scores, ref_s, atol=1e-6)
    # Indices must agree exactly wherever neighbouring reference scores are not near-ties.
    full = np.sort(ref_s, axis=1)[:, ::-1]
    clear = np.ones_like(ids, bool)
    clear[:, 1:] &= np.abs(np.diff(full, axis=1)) > 1e-5
    clear[:, :-1] &= np.abs(np.diff(full, axis=1)) > 1e-5
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(ids[clear], ref_i[clear])


def test_nan_inf_and_signed_zero_order():
    # One query [1]; the candidate's value is its dot score.
    values = [0.0, np.nan, -np.inf, -0.0, 2.0, np.inf, np.nan, -np.inf, 0.0, -1.0]
    c = np.array(values, np.float32)[:, None]
    q = np.ones((1, 1), np.float32)
    for nc in (8, 16):
        scores, ids = top_k(q, c, len(values), metric="dot", query_chunk=8, candidate_chunk=nc)
        # inf, 2, zeros by index (-0.0 ties 0.0), -1, -inf by index, NaN by index.
        assert ids[0].tolist() == [5, 4, 0, 3, 8, 9, 2, 7, 1, 6]
        _, ref_i = reference_top_k(q, c, len(values), metric="dot")
        np.testing.assert_array_equal(ids, ref_i)
        assert np.isnan(scores[0, -2:]).all() and scores[0, 0] == np.inf


def test_nan_rows_rank_last_and_zero_vectors_score_nan():
    rng = np.random.default_rng(2)
    q = rng.standard_normal((4, 5)).astype(np.float32)
    c = rng.standard_normal((40, 5)).astype(np.float32)
    c[[3, 17]] = np.nan
    c[25] = 0.0  # cosine of a zero vector: NaN
    scores, ids = top_k(q, c, 40, query_chunk=8, candidate_chunk=8)
    assert (ids[:, -3:] == [3, 17, 25]).all()
    assert np.isnan(scores[:, -3:]).all() and not np.isnan(scores[:, :-3]).any()


def test_k_above_n_returns_each_candidate_once_and_no_padding():
    rng = np.random.default_rng(3)
    q, c = integer_data(rng, 10, 11)
    scores, ids = top_k(q, c, 100, metric="dot", query_chunk=8, candidate_chunk=8)
    assert ids.shape == (10, 11)
    assert all(sorted(row) == list(range(11)) for row in ids.tolist())


def test_device_arrays_give_the_same_answer():
    rng = np.random.default_rng(4)
    q, c = integer_data(rng, 13, 90)
    want = top_k(q, c, 7, metric="dot", query_chunk=8, candidate_chunk=32)
    got = top_k(jnp.asarray(q), jnp.asarray(c), 7, metric="dot", query_chunk=8,
                candidate_chunk=32)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])


def test_empty_inputs():
    q = np.zeros((0, 3), np.float32)
    s, i = top_k(q, np.ones((5, 3)), 2)
    assert s.shape == i.shape == (0, 2)
    s, i = top_k(np.ones((4, 3)), np.zeros((0, 3)), 2)
    assert s.shape == i.shape == (4, 0)


def test_no_compile_after_warmup_for_the_same_chunk_shapes():
    rng = np.random.default_rng(5)
    q, c = integer_data(rng, 100, 1000)
    top_k(q, c, 10, query_chunk=32, candidate_chunk=64)  # warm-up
    with count_compiles() as events:
        # Other Q and N on the same rungs (32 queries, 64 candidates per step).
        top_k(q[:70], c[:900], 10, query_chunk=32, candidate_chunk=64)
        top_k(q[:33], c[:65], 10, query_chunk=32, candidate_chunk=64)
    assert events == []
    with count_compiles() as events:
        top_k(q, c, 11, query_chunk=32, candidate_chunk=64)  # a new k compiles
    assert events


def test_chunk_ladder():
    assert [chunk_size(n, 64) for n in (0, 1, 8, 9, 33, 64, 65, 10**6)] == \
        [8, 8, 8, 16, 64, 64, 64, 64]


@pytest.mark.parametrize("kwargs, match", [
    (dict(metric="l2"), "metric: expected one of cosine, dot"),
    (dict(k=0), "k: expected an int >= 1"),
    (dict(k=2.5), "k: expected an int >= 1"),
    (dict(query_chunk=0), "query_chunk: expected a positive int"),
    (dict(candidate_chunk=-8), "candidate_chunk: expected a positive int"),
    (dict(queries=np.ones(3)), r"queries: expected a 2-D \(rows, D\) array, got shape \(3,\)"),
    (dict(candidates=np.ones((4, 2))), "queries have D=3 columns but candidates have D=2"),
    (dict(candidates=np.array([["a", "b", "c"]])), "candidates: expected a numeric"),
])
def test_bad_arguments(kwargs, match):
    args = dict(queries=np.ones((2, 3)), candidates=np.ones((4, 3)), k=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        top_k(args.pop("queries"), args.pop("candidates"), args.pop("k"), **args)
