"""Lexical baselines over token ids: BM25 and TF-IDF cosine, scored in blocks for retrieval.

::

    >>> scorer = bm25(candidates, queries)            # lists of token id sequences
    >>> retrieval.evaluate_blocks(scorer.block, relevance)

Both treat a sequence as a bag of token ids; id 0 is padding and ignored. Document
statistics (N, document frequencies, lengths) come from the candidates only, as a search
engine indexes its collection; query terms absent from every candidate score nothing.

BM25 (Robertson & Zaragoza, "The Probabilistic Relevance Framework: BM25 and Beyond",
2009, eq. 3.15, with Lucene's non-negative idf)::

    score(q, d) = sum_t qtf(t) * idf(t) * tf(t,d) (k1 + 1) / (tf(t,d) + k1 (1 - b + b |d| / avgdl))
    idf(t)      = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))

with k1 = 1.2, b = 0.75 (Lucene's defaults), |d| the non-padding tokens of d, avgdl
their mean over the candidates, and qtf the term's count in the query (a repeated query
term counts again, as a repeated Lucene clause does: the k3 -> infinity form). An empty
query scores 0 against everything, which retrieval ranks as a tie (no credit).

TF-IDF: the cosine of tf-idf vectors as scikit-learn's TfidfVectorizer builds them by
default (raw counts, ``smooth_idf=True``, ``sublinear_tf=False``, ``norm="l2"``)::

    w(t, x) = tf(t, x) * (ln((1 + N) / (1 + df(t))) + 1),  score = w(q) . w(d) / (|w(q)| |w(d)|)

with the vocabulary taken from the candidates, so a query's unseen terms do not enter
its norm. An empty query or document (all padding) has no direction: its scores are NaN,
which retrieval ranks last.

Scores are sparse products computed with numpy only: postings sorted by (term, candidate)
are looked up for each (query, term) of a block and summed with bincount in a fixed
order, so two candidates with the same terms get bit-identical scores.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

BM25_K1 = 1.2
BM25_B = 0.75
MAX_EXPANDED = 1 << 22  # postings gathered per bincount call: bounds a block's temporary memory


@dataclasses.dataclass(frozen=True)
class Bags:
    """Token bags of many sequences, row-compressed.

    Attributes:
        indptr: int64 (S + 1,): sequence s's terms are terms[indptr[s]:indptr[s+1]].
        terms: int64 (nnz,) distinct token ids per sequence, ascending, no 0.
        rows: int64 (nnz,) the sequence each entry belongs to.
        counts: float64 (nnz,) how often each occurs.
        lengths: float64 (S,) non-padding tokens per sequence.
    """

    indptr: np.ndarray
    terms: np.ndarray
    rows: np.ndarray
    counts: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.indptr) - 1


def bags(sequences: Sequence[Sequence[int]], name: str = "sequences") -> Bags:
    """Count the token ids of each sequence (0 = padding, dropped).

    Raises:
        ValueError: a negative id; the message names the sequence and position.
    """
    lens = np.fromiter((len(s) for s in sequences), np.int64, len(sequences))
    flat = np.fromiter((int(t) for s in sequences for t in s), np.int64, int(lens.sum()))
    if flat.size and flat.min() < 0:
        at = int(np.argmax(flat < 0))
        seq = int(np.searchsorted(np.cumsum(lens), at, side="right"))
        pos = at - int(np.sum(lens[:seq]))
        raise ValueError(f"{name}[{seq}][{pos}]: token ids must be >= 0, got {flat[at]}")
    row = np.repeat(np.arange(len(sequences), dtype=np.int64), lens)
    keep = flat != 0
    row, flat = row[keep], flat[keep]
    width = int(flat.max(initial=0)) + 1
    key, counts = np.unique(row * width + flat, return_counts=True)
    per_row = np.bincount(key // width, minlength=len(sequences))
    indptr = np.zeros(len(sequences) + 1, np.int64)
    np.cumsum(per_row, out=indptr[1:])
    lengths = np.bincount(row, minlength=len(sequences)).astype(np.float64)
    return Bags(indptr=indptr, terms=key % width, rows=key // width,
                counts=counts.astype(np.float64), lengths=lengths)


@dataclasses.dataclass(frozen=True)
class Scorer:
    """Weighted query and candidate bags; ``block`` gives their dot products.

    Attributes:
        name: "bm25" or "tfidf".
        query: Bags of the queries, counts replaced by query-side weights.
        key: int64 (nnz,) term * N + candidate of each posting, ascending.
        weight: float64 (nnz,) candidate-side weight of each posting.
        n_candidates: N.
        empty_query, empty_candidate: bool (Q,), (N,): all padding (TF-IDF scores NaN).
    """

    name: str
    query: Bags
    key: np.ndarray
    weight: np.ndarray
    n_candidates: int
    empty_query: np.ndarray
    empty_candidate: np.ndarray

    @property
    def n_queries(self) -> int:
        return len(self.query)

    def block(self, q0: int, q1: int, c0: int, c1: int) -> np.ndarray:
        """float32 (q1 - q0, c1 - c0): scores of queries q0..q1-1 x candidates c0..c1-1."""
        n = self.n_candidates
        out = np.zeros((q1 - q0) * (c1 - c0), np.float64)
        lo_e, hi_e = self.query.indptr[q0], self.query.indptr[q1]
        q_row = self.query.rows[lo_e:hi_e] - q0
        q_term = self.query.terms[lo_e:hi_e]
        q_weight = self.query.counts[lo_e:hi_e]
        # Each (query, term) entry's postings inside [c0, c1), by binary search on the keys.
        lo = np.searchsorted(self.key, q_term * n + c0)
        hi = np.searchsorted(self.key, q_term * n + c1)
        sizes = hi - lo
        ends = np.cumsum(sizes)
        # Split only between entries, so every candidate's sum is grouped the same way.
        cut = 0
        while cut < len(sizes):
            base = ends[cut - 1] if cut else 0
            stop = max(int(np.searchsorted(ends, base + MAX_EXPANDED, side="right")), cut + 1)
            e = np.arange(cut, stop)
            rep = np.repeat(e, sizes[cut:stop])
            within = np.arange(len(rep)) - np.repeat(ends[cut:stop] - sizes[cut:stop] - base,
                                                     sizes[cut:stop])
            post = lo[rep] + within
            cols = self.key[post] % n - c0
            out += np.bincount(q_row[rep] * (c1 - c0) + cols,
                               weights=q_weight[rep] * self.weight[post], minlength=out.size)
            cut = stop
        s = out.reshape(q1 - q0, c1 - c0)
        if self.name == "tfidf":
            empty = self.empty_query[q0:q1, None] | self.empty_candidate[None, c0:c1]
            s = np.where(empty, np.nan, s)
        return s.astype(np.float32)


def _postings(docs: Bags, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = len(docs)
    key = docs.terms * n + docs.rows
    order = np.argsort(key, kind="stable")
    return key[order], weight[order]


def _doc_freq(docs: Bags, vocab: int) -> np.ndarray:
    return np.bincount(docs.terms, minlength=vocab).astype(np.float64)


def _vocab(*bs: Bags) -> int:
    return max(int(b.terms.max(initial=0)) for b in bs) + 1


def bm25(candidates: Sequence[Sequence[int]], queries: Sequence[Sequence[int]], *,
         k1: float = BM25_K1, b: float = BM25_B) -> Scorer:
    """BM25 of every query against every candidate (formula in the module docstring)."""
    if not k1 >= 0 or not 0 <= b <= 1:
        raise ValueError(f"bm25: need k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}")
    docs, qs = bags(candidates, "candidates"), bags(queries, "queries")
    vocab = _vocab(docs, qs)
    n = len(docs)
    df = _doc_freq(docs, vocab)
    idf = np.log1p((n - df + 0.5) / (df + 0.5))
    avgdl = docs.lengths.mean() if n and docs.lengths.sum() else 1.0
    tf = docs.counts
    norm = k1 * (1.0 - b + b * docs.lengths[docs.rows] / avgdl)
    weight = idf[docs.terms] * tf * (k1 + 1.0) / (tf + norm)
    key, weight = _postings(docs, weight)
    return Scorer(name="bm25", query=qs, key=key, weight=weight, n_candidates=n,
                  empty_query=qs.lengths == 0, empty_candidate=docs.lengths == 0)


def tfidf(candidates: Sequence[Sequence[int]], queries: Sequence[Sequence[int]]) -> Scorer:
    """TF-IDF cosine of every query against every candidate (module docstring)."""
    docs, qs = bags(candidates, "candidates"), bags(queries, "queries")
    vocab = _vocab(docs, qs)
    n = len(docs)
    df = _doc_freq(docs, vocab)
    idf = np.log((1.0 + n) / (1.0 + df)) + 1.0
    seen = df > 0
    d_w = _unit(docs, docs.counts * idf[docs.terms])
    q_w = _unit(qs, np.where(seen[qs.terms], qs.counts * idf[qs.terms], 0.0))
    key, weight = _postings(docs, d_w)
    return Scorer(name="tfidf", query=dataclasses.replace(qs, counts=q_w), key=key,
                  weight=weight, n_candidates=n, empty_query=~_has_weight(qs, q_w),
                  empty_candidate=docs.lengths == 0)


def _unit(x: Bags, w: np.ndarray) -> np.ndarray:
    """w divided by its row's L2 norm (rows of norm 0 stay 0)."""
    norm = np.sqrt(np.bincount(x.rows, weights=w * w, minlength=len(x)))
    return w / np.where(norm > 0, norm, 1.0)[x.rows]


def _has_weight(x: Bags, w: np.ndarray) -> np.ndarray:
    return np.bincount(x.rows, weights=np.abs(w), minlength=len(x)) > 0


SCORERS = {"bm25": bm25, "tfidf": tfidf}


def scorer(name: str, candidates: Sequence[Sequence[int]],
           queries: Sequence[Sequence[int]], **params: Any) -> Scorer:
    """The baseline called `name` ("bm25" or "tfidf")."""
    if name not in SCORERS:
        raise ValueError(f"baseline: expected one of {', '.join(SCORERS)}, got {name!r}")
    return SCORERS[name](candidates, queries, **params)
