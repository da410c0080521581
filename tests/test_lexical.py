"""lexical: BM25 and TF-IDF equal a hand computation, padding is ignored, blocks and
split bincounts give the same numbers, and the scorers plug into retrieval."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from o2v_jax import lexical, retrieval

DOCS = [[1, 2, 3, 3], [2, 4], [5, 5, 5, 1, 0, 0], [3], [1, 2, 3, 3]]
QUERIES = [[3, 2], [5], [4, 4, 9], [7], [1, 2, 3, 3]]


def hand_bm25(docs, queries, k1=1.2, b=0.75):
    docs = [[t for t in d if t] for d in docs]
    n = len(docs)
    avgdl = sum(len(d) for d in docs) / n
    df = Counter(t for d in docs for t in set(d))
    out = np.zeros((len(queries), n))
    for i, q in enumerate(queries):
        for j, d in enumerate(docs):
            tf = Counter(d)
            for t in q:  # a repeated query term counts again
                if not t or tf[t] == 0:
                    continue
                idf = math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5))
                out[i, j] += idf * tf[t] * (k1 + 1) / (tf[t] + k1 * (1 - b + b * len(d) / avgdl))
    return out


def hand_tfidf(docs, queries):
    docs = [[t for t in d if t] for d in docs]
    n = len(docs)
    df = Counter(t for d in docs for t in set(d))

    def vec(x):
        v = {t: c * (math.log((1 + n) / (1 + df[t])) + 1) for t, c in Counter(x).items() if t in df}
        norm = math.sqrt(sum(w * w for w in v.values()))
        return {t: w / norm for t, w in v.items()} if norm else None

    out = np.zeros((len(queries), n))
    for i, q in enumerate(queries):
        for j, d in enumerate(docs):
            vq, vd = vec(q), vec(d)
            out[i, j] = np.nan if vq is None or vd is None else sum(
                w * vd.get(t, 0.0) for t, w in vq.items())
    return out


def full(scorer):
    return scorer.block(0, scorer.n_queries, 0, scorer.n_candidates)


def test_bm25_equals_the_hand_computation():
    got = full(lexical.bm25(DOCS, QUERIES))
    assert got.dtype == np.float32 and got.shape == (5, 5)
    np.testing.assert_allclose(got, hand_bm25(DOCS, QUERIES), rtol=1e-6)
    # One value by hand: query [5] against doc 2 (tf 3, |d| 4, df 1, N 5, avgdl 3).
    idf = math.log(1 + (5 - 1 + 0.5) / 1.5)
    assert got[1, 2] == pytest.approx(idf * 3 * 2.2 / (3 + 1.2 * (0.25 + 0.75 * 4 / 3)),
                                      rel=1e-6)
    other = full(lexical.bm25(DOCS, QUERIES, k1=2.0, b=0.3))
    np.testing.assert_allclose(other, hand_bm25(DOCS, QUERIES, k1=2.0, b=0.3), rtol=1e-6)


def test_tfidf_equals_the_hand_computation():
    got = full(lexical.tfidf(DOCS, QUERIES))
    want = hand_tfidf(DOCS, QUERIES)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # A query of only unseen terms has no direction: NaN; an identical doc scores 1.
    assert np.isnan(got[3]).all()
    assert got[4, 0] == pytest.approx(1.0) and got[4, 4] == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["bm25", "tfidf"])
def test_padding_is_ignored(name):
    padded_docs = [d + [0, 0] for d in DOCS]
    padded_queries = [[0] + q for q in QUERIES]
    a = full(lexical.scorer(name, DOCS, QUERIES))
    b = full(lexical.scorer(name, padded_docs, padded_queries))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["bm25", "tfidf"])
def test_blocks_and_split_sums_are_bit_identical(name, monkeypatch):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 30, rng.integers(1, 12)).tolist() for _ in range(57)]
    queries = [rng.integers(1, 30, rng.integers(1, 6)).tolist() for _ in range(19)]
    s = lexical.scorer(name, docs, queries)
    whole = full(s)
    np.testing.assert_array_equal(s.block(3, 11, 20, 41), whole[3:11, 20:41])
    monkeypatch.setattr(lexical, "MAX_EXPANDED", 5)  # many bincount calls per block
    np.testing.assert_array_equal(full(s), whole)


def test_identical_candidates_score_identically():
    rng = np.random.default_rng(1)
    doc = rng.integers(1, 50, 40).tolist()
    docs = [rng.integers(1, 50, 30).tolist() for _ in range(10)] + [doc, doc[::-1]]
    queries = [rng.integers(1, 50, 8).tolist() for _ in range(20)]
    for name in ("bm25", "tfidf"):
        s = full(lexical.scorer(name, docs, queries))
        np.testing.assert_array_equal(s[:, -1], s[:, -2])


def test_scorers_plug_into_retrieval():
    # Each query is a reordered copy of its own document's words: rank 1 for both baselines.
    rng = np.random.default_rng(2)
    docs = [rng.choice(np.arange(1, 200), 6, replace=False).tolist() for _ in range(40)]
    queries = [d[::-1][:4] for d in docs]
    rel = retrieval.Relevance.from_lists([[i] for i in range(40)], 40)
    for name in ("bm25", "tfidf"):
        s = lexical.scorer(name, docs, queries)
        got = retrieval.evaluate_blocks(s.block, rel, query_chunk=8, candidate_chunk=16)
        assert got["hits@1"] == 1.0 and got["queries"] == 40


def test_errors():
    with pytest.raises(ValueError, match=r"candidates\[1\]\[2\]: token ids must be >= 0, got -4"):
        lexical.bm25([[1], [2, 3, -4]], [[1]])
    with pytest.raises(ValueError, match="baseline: expected one of bm25, tfidf, got 'bm26'"):
        lexical.scorer("bm26", [[1]], [[1]])
    with pytest.raises(ValueError, match="need k1 >= 0 and 0 <= b <= 1"):
        lexical.bm25([[1]], [[1]], b=1.5)
