"""retrieval: metric values on hand-made rankings (ties against the relevant item,
several relevant, queries with none, constant and NaN models), equal to a plain sort
reference across chunk boundaries, pairs grouped into queries and candidates."""

from __future__ import annotations

import math

import numpy as np
import pytest

from o2v_jax import retrieval
from o2v_jax.retrieval import Relevance, evaluate_embeddings, evaluate_scores, group_pairs

from conftest import count_compiles


def reference(scores: np.ndarray, relevance: Relevance) -> dict:
    """The metrics by sorting every query's candidates: score descending, NaN last,
    non-relevant before relevant among equal scores (ties count against)."""
    hits = {k: [] for k in retrieval.HITS_AT}
    rr, ndcg, none = [], [], 0
    for q in range(relevance.n_queries):
        rel = set(relevance.indices[relevance.indptr[q]:relevance.indptr[q + 1]].tolist())
        if not rel:
            none += 1
            continue
        s = scores[q]
        order = sorted(range(len(s)), key=lambda j: (bool(np.isnan(s[j])),
                                                     0.0 if np.isnan(s[j]) else -float(s[j]),
                                                     j in rel))
        # A NaN-scored relevant item gets no credit wherever the sort put it.
        pos = [p + 1 for p, j in enumerate(order) if j in rel and not np.isnan(s[j])]
        first = pos[0] if pos else math.inf
        for k in hits:
            hits[k].append(first <= k)
        rr.append(1.0 / first)
        dcg = sum(1.0 / math.log2(p + 1) for p in pos if p <= 10)
        ndcg.append(dcg / sum(1.0 / math.log2(i + 2) for i in range(min(len(rel), 10))))
    out = {f"hits@{k}": float(np.mean(v)) for k, v in hits.items()}
    out.update({"mrr": float(np.mean(rr)), "ndcg@10": float(np.mean(ndcg)),
                "queries": len(rr), "candidates": scores.shape[1],
                "queries_without_relevant": none})
    return out


def assert_metrics(got: dict, want: dict):
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


# --------------------------------------------------------------------------- hand-made


def test_a_tie_with_a_non_relevant_item_counts_against():
    # Relevant item 2 ties item 1 at the top: rank 2, not 1.
    scores = np.array([[0.1, 0.9, 0.9, 0.3]])
    got = evaluate_scores(scores, Relevance.from_lists([[2]], 4))
    assert got["hits@1"] == 0.0 and got["hits@5"] == 1.0
    assert got["mrr"] == 0.5
    assert got["ndcg@10"] == pytest.approx(1 / math.log2(3))


def test_ties_among_relevant_items_do_not_hurt():
    # Items 1 and 2 both relevant and tied at the top: positions 1 and 2, nDCG 1.
    got = evaluate_scores(np.array([[0.1, 0.9, 0.9, 0.3]]), Relevance.from_lists([[1, 2]], 4))
    assert got["hits@1"] == 1.0 and got["mrr"] == 1.0 and got["ndcg@10"] == pytest.approx(1.0)


def test_several_relevant_items():
    # Order: 5, 0(rel), 4, 1(rel), 3, 2(rel): positions 2, 4, 6.
    scores = np.array([[0.8, 0.6, 0.1, 0.3, 0.7, 0.9]])
    got = evaluate_scores(scores, Relevance.from_lists([[0, 1, 2]], 6))
    assert got["hits@1"] == 0.0 and got["hits@5"] == 1.0 and got["mrr"] == 0.5
    dcg = 1 / math.log2(3) + 1 / math.log2(5) + 1 / math.log2(7)
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert got["ndcg@10"] == pytest.approx(dcg / idcg)


def test_ideal_dcg_stops_at_ten_relevant_items():
    # 12 relevant items ranked first: nDCG@10 is exactly 1.
    scores = np.arange(20, 0, -1, dtype=np.float32)[None, :]
    got = evaluate_scores(scores, Relevance.from_lists([list(range(12))], 20))
    assert got["ndcg@10"] == pytest.approx(1.0)
    # The same 12 behind 5 non-relevant ones: positions 6..10 count, 5 of 10 ideal gains.
    got = evaluate_scores(scores, Relevance.from_lists([list(range(5, 17))], 20))
    disc = [1 / math.log2(p + 1) for p in range(1, 11)]
    assert got["ndcg@10"] == pytest.approx(sum(disc[5:]) / sum(disc))
    assert got["mrr"] == pytest.approx(1 / 6)


def test_queries_without_relevant_items_are_left_out_and_counted():
    scores = np.array([[0.9, 0.1], [0.1, 0.9], [0.5, 0.4]])
    got = evaluate_scores(scores, Relevance.from_lists([[0], [], []], 2))
    assert got["queries"] == 1 and got["queries_without_relevant"] == 2
    assert got["hits@1"] == 1.0 and got["mrr"] == 1.0


def test_constant_model_gets_the_worst_rank():
    n, m = 30, 2
    rel = Relevance.from_lists([[3, 7], [0, 29]], n)
    got = evaluate_scores(np.full((2, n), 0.25), rel)
    assert got["hits@1"] == got["hits@5"] == got["hits@10"] == got["ndcg@10"] == 0.0
    assert got["mrr"] == pytest.approx(1 / (n - m + 1))
    # Constant embeddings (every cosine equal) too, through the embedding path.
    emb = evaluate_embeddings(np.ones((2, 4)), np.ones((n, 4)), rel)
    assert emb["hits@10"] == 0.0 and emb["mrr"] == pytest.approx(1 / (n - m + 1))


def test_nan_model_scores_zero():
    rel = Relevance.from_lists([[0], [1, 2]], 5)
    got = evaluate_scores(np.full((2, 5), np.nan), rel)
    assert all(got[k] == 0.0 for k in retrieval.METRIC_NAMES)
    got = evaluate_embeddings(np.full((2, 3), np.nan), np.ones((5, 3)), rel)
    assert all(got[k] == 0.0 for k in retrieval.METRIC_NAMES)
    # Zero vectors have no cosine: NaN, no credit.
    got = evaluate_embeddings(np.zeros((2, 3)), np.ones((5, 3)), rel)
    assert all(got[k] == 0.0 for k in retrieval.METRIC_NAMES)


def test_a_nan_relevant_item_gets_no_credit_but_its_sibling_does():
    scores = np.array([[np.nan, 0.2, 0.9, 0.5]])
    got = evaluate_scores(scores, Relevance.from_lists([[0, 1]], 4))
    # Item 1 is behind 2 and 3: position 3; item 0 scores nothing.
    assert got["mrr"] == pytest.approx(1 / 3)
    assert got["ndcg@10"] == pytest.approx((1 / math.log2(4)) / (1 + 1 / math.log2(3)))


# --------------------------------------------------------------------------- vs reference


@pytest.mark.parametrize("qc, nc", [(8, 8), (8, 16), (32, 64), (256, 4096)])
def test_scores_equal_the_sort_reference_across_chunks(qc, nc):
    rng = np.random.default_rng(qc + nc)
    n_q, n = 29, 77
    # Few distinct values: ties everywhere; some NaN.
    scores = rng.integers(0, 6, (n_q, n)).astype(np.float32)
    scores[rng.random((n_q, n)) < 0.05] = np.nan
    lists = [rng.choice(n, rng.integers(0, 14), replace=False) for _ in range(n_q)]
    rel = Relevance.from_lists(lists, n)
    assert_metrics(evaluate_scores(scores, rel, query_chunk=qc, candidate_chunk=nc),
                   reference(scores, rel))


def test_embeddings_equal_the_sort_reference_with_exact_ties():
    # Small integer embeddings and dot scores: exact in float32, ties everywhere.
    rng = np.random.default_rng(7)
    n_q, n = 23, 150
    q = rng.integers(-1, 2, (n_q, 3)).astype(np.float32)
    c = rng.integers(-1, 2, (n, 3)).astype(np.float32)
    rel = Relevance.from_lists([rng.choice(n, rng.integers(0, 5), replace=False)
                                for _ in range(n_q)], n)
    want = reference(q @ c.T, rel)
    for qc, nc in ((8, 32), (16, 8), (256, 4096)):
        got = evaluate_embeddings(q, c, rel, metric="dot", query_chunk=qc, candidate_chunk=nc)
        assert_metrics(got, want)


def test_cosine_embeddings_equal_the_sort_reference():
    # Random directions: no near-ties, so float32 rounding cannot reorder anything.
    rng = np.random.default_rng(9)
    q = rng.standard_normal((31, 8))
    c = rng.standard_normal((200, 8))
    rel = Relevance.from_lists([rng.choice(200, rng.integers(0, 4), replace=False)
                                for _ in range(31)], 200)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    cn = c / np.linalg.norm(c, axis=1, keepdims=True)
    want = reference(qn @ cn.T, rel)
    for qc, nc in ((8, 16), (256, 4096)):
        assert_metrics(evaluate_embeddings(q, c, rel, query_chunk=qc, candidate_chunk=nc), want)


def test_constant_embeddings_at_full_chunk_sizes():
    # Every candidate the same vector: each query's scores must tie exactly inside the
    # real-size blocks too, or the relevant item would sometimes win.
    rng = np.random.default_rng(10)
    n = 6000
    q = rng.standard_normal((300, 128)).astype(np.float32)
    c = np.broadcast_to(rng.standard_normal(128).astype(np.float32), (n, 128))
    rel = Relevance.from_lists([[(37 * i) % n] for i in range(300)], n)
    got = evaluate_embeddings(q, c, rel)
    assert got["hits@10"] == 0.0 and got["mrr"] == pytest.approx(1 / n)


def test_no_compile_after_warmup():
    rng = np.random.default_rng(8)
    q = rng.standard_normal((40, 4)).astype(np.float32)
    c = rng.standard_normal((300, 4)).astype(np.float32)
    lists = [[i % 300, (7 * i) % 300] for i in range(40)]
    evaluate_embeddings(q, c, Relevance.from_lists(lists, 300), query_chunk=16,
                        candidate_chunk=64)
    with count_compiles() as events:
        evaluate_embeddings(q[:20], c[:250], Relevance.from_lists([r[:1] for r in lists[:20]], 250),
                            query_chunk=16, candidate_chunk=64)
    assert events == []


# --------------------------------------------------------------------------- pairs


def test_group_pairs_distinct_by_content_with_labels():
    in0 = [[1, 2], [3], [1, 2], [3], [4]]
    in1 = [[5], [6, 7], [6, 7], [5], [8]]
    g = group_pairs(in0, in1, labels=[1, 1, 0, 1, 0])
    assert g.queries == [[1, 2], [3], [4]]
    assert g.candidates == [[5], [6, 7], [8]]
    # [1, 2] -> [5]; [3] -> [6, 7] and [5]; [4] only by a label-0 row: no relevant item.
    assert g.relevance.indptr.tolist() == [0, 1, 3, 3]
    assert g.relevance.indices.tolist() == [0, 0, 1]
    assert g.relevance.n_candidates == 3
    assert g.query_of_pair.tolist() == [0, 1, 0, 1, 2]
    assert g.candidate_of_pair.tolist() == [0, 1, 1, 0, 2]


def test_group_pairs_without_labels_and_repeated_pairs():
    g = group_pairs([[1], [1], [2]], [[9], [9], [9]])
    assert g.relevance.indptr.tolist() == [0, 1, 2] and g.relevance.indices.tolist() == [0, 0]
    # Equal sequences are one item however they were given.
    g = group_pairs([(1, 2), [1, 2]], [np.array([3]), [3]])
    assert len(g.queries) == 1 and len(g.candidates) == 1


@pytest.mark.parametrize("labels, match", [
    ([1, 2.5], r"pair 1: label: retrieval needs 1 \(relevant\) or 0"),
    (["1", 1], "pair 0: label"),
    ([1], "need as many in0 as in1"),
])
def test_group_pairs_errors(labels, match):
    with pytest.raises(ValueError, match=match):
        group_pairs([[1], [2]], [[3], [4]], labels)


def test_relevance_and_shape_errors():
    with pytest.raises(ValueError, match=r"query 1: candidate rows must be in \[0, 3\)"):
        Relevance.from_lists([[0], [3]], 3)
    with pytest.raises(ValueError, match=r"scores: expected shape \(1, 3\)"):
        evaluate_scores(np.zeros((1, 4)), Relevance.from_lists([[0]], 3))
    with pytest.raises(ValueError, match="relevance covers 1 queries x 3 candidates"):
        evaluate_embeddings(np.zeros((2, 4)), np.zeros((3, 4)), Relevance.from_lists([[0]], 3))
    with pytest.raises(ValueError, match="no query has a relevant candidate"):
        evaluate_scores(np.zeros((2, 3)), Relevance.from_lists([[], []], 3))
    dense = Relevance.from_dense([[True, False], [False, False]])
    assert dense.indptr.tolist() == [0, 1, 1] and dense.indices.tolist() == [0]
