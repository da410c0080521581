"""Retrieval evaluation: each query ranks every candidate; hits@k, MRR and nDCG@10.

::

    >>> g = group_pairs(in0s, in1s, labels)              # distinct queries and candidates
    >>> evaluate_embeddings(embed(g.queries), embed(g.candidates), g.relevance)
    {'hits@1': ..., 'hits@5': ..., 'hits@10': ..., 'mrr': ..., 'ndcg@10': ...,
     'queries': ..., 'candidates': ..., 'queries_without_relevant': ...}

Pairs to a retrieval task (issue 21): every distinct ``in0`` (same token ids = same item) is
a query, every distinct ``in1`` a candidate; a query's relevant candidates are the
``in1`` it is paired with by a label-1 (or unlabelled) row. Label-0 rows add candidates
and no relevance.

Ranks, with ties counted against the relevant item. Within one query, a relevant item r
with score s_r is placed after every non-relevant candidate scoring >= s_r, so equal
scores never help. NaN scores rank last: a relevant item scored NaN gets no credit, and a
NaN candidate never outranks anything. Relevant items sorted by score, the i-th
(1-based) sits at position ``p_i = i + #{non-relevant j : s_j >= s_(i)}``. Then, per query:

* ``hits@k`` = 1 if p_1 <= k (any relevant item in the top k);
* ``mrr`` = 1 / p_1 (0 when every relevant item is NaN);
* ``ndcg@10`` = sum_{p_i <= 10} 1/log2(p_i + 1) / sum_{i <= min(m, 10)} 1/log2(i + 1),
  binary gains, m = number of relevant items.

Each is averaged over queries with at least one relevant item (``queries``);
``queries_without_relevant`` counts the others, which are left out of every average. A
model whose scores are all equal is ranked below every non-relevant candidate: hits and
nDCG are 0 once there are at least 10 non-relevant candidates, and MRR is the worst
possible, 1 / (1 + #non-relevant); an all-NaN model scores 0 everywhere.

How it scales: scores are computed in (query chunk, candidate chunk) blocks and never held
for all pairs (a 10^4 x 10^6 evaluation needs O(chunk) memory). Two passes over the
blocks: the first collects the relevant items' scores, the second counts, per query, the
candidates scoring >= each of its 10 best relevant scores. Both passes call one compiled
function, so a relevant item's score is bit-for-bit the number its competitors are
compared with (a separately computed pair score could differ in the last bit and turn a
tie into a win).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from o2v_jax import search

CUTOFF = 10  # deepest position any metric reads (hits@10, nDCG@10); MRR reads p_1 exactly
HITS_AT = (1, 5, 10)
METRIC_NAMES = ("hits@1", "hits@5", "hits@10", "mrr", "ndcg@10")
QUERY_CHUNK = 256  # query rows per evaluation block (cap)
CANDIDATE_CHUNK = 4096  # candidate rows per evaluation block (cap)


@dataclasses.dataclass(frozen=True)
class Relevance:
    """Which candidates are relevant to each query, row-compressed (CSR without values).

    Attributes:
        indptr: int64 (Q + 1,): query q's relevant candidates are indices[indptr[q]:indptr[q+1]].
        indices: int64 (nnz,) candidate rows, distinct and ascending within a query.
        n_candidates: N, the number of candidates ranked.
    """

    indptr: np.ndarray
    indices: np.ndarray
    n_candidates: int

    @property
    def n_queries(self) -> int:
        return len(self.indptr) - 1

    def counts(self) -> np.ndarray:
        """int64 (Q,): relevant candidates per query."""
        return np.diff(self.indptr)

    @classmethod
    def from_lists(cls, lists: Sequence[Sequence[int]], n_candidates: int) -> Relevance:
        """From one list of relevant candidate rows per query (duplicates collapse)."""
        rows = [np.unique(np.asarray(r, dtype=np.int64)) for r in lists]
        for q, r in enumerate(rows):
            if r.size and (r[0] < 0 or r[-1] >= n_candidates):
                raise ValueError(f"relevance of query {q}: candidate rows must be in "
                                 f"[0, {n_candidates}), got {r.tolist()}")
        indptr = np.zeros(len(rows) + 1, np.int64)
        np.cumsum([len(r) for r in rows], out=indptr[1:])
        indices = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        return cls(indptr=indptr, indices=indices.astype(np.int64), n_candidates=n_candidates)

    @classmethod
    def from_dense(cls, mask: Any) -> Relevance:
        """From a boolean (Q, N) matrix (small problems and tests)."""
        mask = np.asarray(mask, dtype=bool)
        if mask.ndim != 2:
            raise ValueError(f"relevance mask: expected a (Q, N) matrix, got shape {mask.shape}")
        return cls.from_lists([np.flatnonzero(row) for row in mask], mask.shape[1])


@dataclasses.dataclass(frozen=True)
class Grouped:
    """Pairs as a retrieval task (group_pairs)."""

    queries: list[list[int]]  # distinct in0 sequences, in order of first appearance
    candidates: list[list[int]]  # distinct in1 sequences, in order of first appearance
    relevance: Relevance
    query_of_pair: np.ndarray  # int64 (pairs,): row of each pair's in0 in `queries`
    candidate_of_pair: np.ndarray  # int64 (pairs,): row of each pair's in1 in `candidates`


def group_pairs(in0s: Sequence[Sequence[int]], in1s: Sequence[Sequence[int]],
                labels: Sequence[Any] | None = None) -> Grouped:
    """Distinct queries (in0) and candidates (in1) of a list of pairs, and their relevance.

    Args:
        in0s, in1s: token id sequences, one per pair; equal sequences are one item.
        labels: None (every pair is relevant) or one label per pair, 1 (relevant) or
            0 (adds the in1 as a candidate, no relevance).

    Raises:
        ValueError: lengths differ, or a label is not 0 or 1; it names the pair (0-based).
    """
    if len(in0s) != len(in1s) or (labels is not None and len(labels) != len(in0s)):
        sizes = f"{len(in0s)} in0, {len(in1s)} in1" + (
            "" if labels is None else f", {len(labels)} labels")
        raise ValueError(f"pairs: need as many in0 as in1 (and labels), got {sizes}")
    query_rows: dict[tuple[int, ...], int] = {}
    cand_rows: dict[tuple[int, ...], int] = {}
    qp = np.empty(len(in0s), np.int64)
    cp = np.empty(len(in0s), np.int64)
    relevant = np.ones(len(in0s), bool)
    for i, (a, b) in enumerate(zip(in0s, in1s)):
        qp[i] = query_rows.setdefault(tuple(int(t) for t in a), len(query_rows))
        cp[i] = cand_rows.setdefault(tuple(int(t) for t in b), len(cand_rows))
        if labels is not None:
            label = labels[i]
            if label not in (0, 1) or isinstance(label, str):
                raise ValueError(f"pair {i}: label: retrieval needs 1 (relevant) or 0 "
                                 f"(candidate only), or no label; got {label!r}")
            relevant[i] = label == 1
    # CSR by query: stable sort of the relevant pairs, then drop repeated (query, candidate).
    q, c = qp[relevant], cp[relevant]
    key = np.unique(q * max(len(cand_rows), 1) + c)
    q, c = key // max(len(cand_rows), 1), key % max(len(cand_rows), 1)
    indptr = np.zeros(len(query_rows) + 1, np.int64)
    np.cumsum(np.bincount(q, minlength=len(query_rows)), out=indptr[1:])
    return Grouped(queries=[list(s) for s in query_rows], candidates=[list(s) for s in cand_rows],
                   relevance=Relevance(indptr=indptr, indices=c, n_candidates=len(cand_rows)),
                   query_of_pair=qp, candidate_of_pair=cp)


# --------------------------------------------------------------------------- metrics


def metrics_from_positions(positions: np.ndarray, n_relevant: np.ndarray) -> dict[str, Any]:
    """The metrics from each query's relevant positions (the module docstring's p_i).

    Args:
        positions: float (Q, CUTOFF): p_1..p_10 per query (1-based), inf where the i-th
            best relevant item is missing or NaN-scored.
        n_relevant: int (Q,): m, relevant items per query; queries with 0 are left out.
    """
    positions = np.asarray(positions, np.float64)
    n_relevant = np.asarray(n_relevant, np.int64)
    has = n_relevant > 0
    p, m = positions[has], n_relevant[has]
    out: dict[str, Any] = {}
    if p.shape[0] == 0:
        raise ValueError("no query has a relevant candidate: retrieval metrics are undefined")
    for k in HITS_AT:
        out[f"hits@{k}"] = float(np.mean(p[:, 0] <= k))
    out["mrr"] = float(np.mean(1.0 / p[:, 0]))  # 1/inf = 0
    discount = 1.0 / np.log2(np.arange(CUTOFF) + 2.0)  # position 1..10
    gains = np.where(p <= CUTOFF, 1.0 / np.log2(np.minimum(p, CUTOFF) + 1.0), 0.0)
    ideal = np.cumsum(discount)[np.minimum(m, CUTOFF) - 1]
    out["ndcg@10"] = float(np.mean(gains.sum(axis=1) / ideal))
    out["queries"] = int(p.shape[0])
    out["queries_without_relevant"] = int(np.sum(~has))
    return out


@functools.partial(jax.jit, static_argnames=("metric",))
def _tally_embeddings(q, c, start, offset, n, rel, thresholds, *, metric: str):
    return _tally(search.block_scores(q, c, metric), start, offset, n, rel, thresholds)


@jax.jit
def _tally_scores(s, start, offset, n, rel, thresholds):
    return _tally(s.astype(jnp.float32), start, offset, n, rel, thresholds)


def _tally(s, start, offset, n, rel, thresholds):
    """One block's part of both passes.

    Args:
        s: float32 (Qc, Nc) scores of the block, whose columns are candidates start...
        start, offset, n: int scalars; columns before `offset` or at/after `n` are masked.
        rel: int32 (Qc, R) relevant candidate rows per query, -1 = none.
        thresholds: float32 (Qc, CUTOFF) each query's best relevant scores, NaN = none.

    Returns:
        float32 (Qc, R): scores of the relevant items in this block's live columns, NaN
        elsewhere; int32 (Qc, CUTOFF): live columns scoring >= each threshold.
    """
    ids = search.chunk_ids(start, offset, n, s.shape[1])
    local = rel - start
    live = (rel >= offset) & (rel < n) & (local >= 0) & (local < s.shape[1])
    got = jnp.take_along_axis(s, jnp.clip(local, 0, s.shape[1] - 1), axis=1)
    rel_scores = jnp.where(live, got, jnp.nan)
    ge = (s[:, :, None] >= thresholds[:, None, :]) & (ids >= 0)[None, :, None]
    return rel_scores, jnp.sum(ge, axis=1, dtype=jnp.int32)


BlockFn = Callable[[int, int, int, int], Any]  # (q0, q1, c0, c1) -> (q1-q0, c1-c0) scores


def evaluate_embeddings(query_emb: Any, candidate_emb: Any, relevance: Relevance, *,
                        metric: str = "cosine", query_chunk: int = QUERY_CHUNK,
                        candidate_chunk: int = CANDIDATE_CHUNK) -> dict[str, Any]:
    """Retrieval metrics of embeddings: every query ranks every candidate by `metric`.

    Args:
        query_emb: float (Q, D); candidate_emb: float (N, D) (numpy, or jax on a device).
        relevance: Q rows over N candidates.
        metric: "cosine" (the issue's ranking) or "dot", scored as search.block_scores does.

    Returns:
        The METRIC_NAMES and queries, candidates, queries_without_relevant.
    """
    q, c = search.check_args(query_emb, candidate_emb, metric, query_chunk, candidate_chunk)
    _check_relevance(relevance, q.shape[0], c.shape[0])
    qc = search.chunk_size(q.shape[0], query_chunk)
    nc = search.chunk_size(c.shape[0], candidate_chunk)
    q = search.pad_rows(q, -(-q.shape[0] // qc) * qc)
    c = search.pad_rows(c, nc)

    def tally(q0, start, offset, rel, thr, c_block):
        return _tally_embeddings(search.rows(q, q0, qc), c_block, start, offset,
                                 relevance.n_candidates, rel, thr, metric=metric)

    return _evaluate(relevance, qc, nc, lambda start: search.rows(c, start, nc), tally)


def evaluate_blocks(score_block: BlockFn, relevance: Relevance, *,
                    query_chunk: int = QUERY_CHUNK,
                    candidate_chunk: int = CANDIDATE_CHUNK) -> dict[str, Any]:
    """Retrieval metrics of any scorer that fills (query rows, candidate rows) blocks.

    Args:
        score_block: f(q0, q1, c0, c1) -> float (q1-q0, c1-c0) scores of queries
            q0..q1-1 against candidates c0..c1-1 (e.g. lexical.Scorer.block). Scores are
            compared in float32.
        relevance: which candidates are relevant to each query.
    """
    _check_relevance(relevance, relevance.n_queries, relevance.n_candidates)
    n_q, n_c = relevance.n_queries, relevance.n_candidates
    qc = search.chunk_size(n_q, query_chunk)
    nc = search.chunk_size(n_c, candidate_chunk)

    def tally(q0, start, offset, rel, thr, _):
        q1, c1 = min(q0 + qc, n_q), min(start + nc, n_c)
        s = np.asarray(score_block(q0, q1, start, c1), dtype=np.float32)
        if s.shape != (q1 - q0, c1 - start):
            raise ValueError(f"score_block({q0}, {q1}, {start}, {c1}): expected shape "
                             f"{(q1 - q0, c1 - start)}, got {s.shape}")
        s = np.pad(s, ((0, qc - s.shape[0]), (0, nc - s.shape[1])), constant_values=np.nan)
        return _tally_scores(s, start, offset, n_c, rel, thr)

    return _evaluate(relevance, qc, nc, lambda start: None, tally)


def evaluate_scores(scores: Any, relevance: Relevance, **chunks: int) -> dict[str, Any]:
    """Retrieval metrics of a dense float (Q, N) score matrix (small problems, tests)."""
    scores = np.asarray(scores)
    if scores.shape != (relevance.n_queries, relevance.n_candidates):
        raise ValueError(f"scores: expected shape {(relevance.n_queries, relevance.n_candidates)} "
                         f"(queries, candidates), got {scores.shape}")
    return evaluate_blocks(lambda q0, q1, c0, c1: scores[q0:q1, c0:c1], relevance, **chunks)


def _check_relevance(relevance: Relevance, n_queries: int, n_candidates: int) -> None:
    if relevance.n_queries != n_queries or relevance.n_candidates != n_candidates:
        raise ValueError(f"relevance covers {relevance.n_queries} queries x "
                         f"{relevance.n_candidates} candidates, but the scores are "
                         f"{n_queries} x {n_candidates}")


def _evaluate(relevance: Relevance, qc: int, nc: int, candidate_block: Callable[[int], Any],
              tally: Callable[..., Any]) -> dict[str, Any]:
    """Both passes over (candidate chunk, query chunk) blocks; see the module docstring."""
    n_q, n_c = relevance.n_queries, relevance.n_candidates
    m = relevance.counts()
    # Relevant rows per query padded to a power of two, so R comes from a short ladder.
    width = search.chunk_size(int(m.max(initial=1)), 1 << 62)
    rel = np.full((-(-n_q // qc) * qc, width), -1, np.int32)
    slot = np.arange(len(relevance.indices)) - np.repeat(relevance.indptr[:-1], m)
    rel[np.repeat(np.arange(n_q), m), slot] = relevance.indices
    rel_scores = np.full(rel.shape, np.nan, np.float32)
    counts = np.zeros((rel.shape[0], CUTOFF), np.int64)
    no_thresholds = np.full((qc, CUTOFF), np.nan, np.float32)
    chunks = search.chunk_starts(n_c, nc)

    # Pass 1: relevant scores, from the blocks that hold relevant items.
    for start, offset in chunks:
        end = min(offset + nc, n_c)
        blocks = None
        for q0 in range(0, n_q, qc):
            r = rel[q0:q0 + qc]
            here = (r >= offset) & (r < end)
            if not here.any():
                continue
            blocks = candidate_block(start) if blocks is None else blocks
            got, _ = tally(q0, start, offset, r, no_thresholds, blocks)
            rel_scores[q0:q0 + qc] = np.where(here, np.asarray(got), rel_scores[q0:q0 + qc])

    # Thresholds: each query's CUTOFF best relevant scores, NaN (no credit) last.
    thresholds = -np.sort(-rel_scores, axis=1)[:, :CUTOFF]  # np.sort puts NaN last
    if thresholds.shape[1] < CUTOFF:
        pad = CUTOFF - thresholds.shape[1]
        thresholds = np.pad(thresholds, ((0, 0), (0, pad)), constant_values=np.nan)

    # Pass 2: candidates scoring >= each threshold.
    for start, offset in chunks:
        block = candidate_block(start)
        for q0 in range(0, n_q, qc):
            _, got = tally(q0, start, offset, rel[q0:q0 + qc], thresholds[q0:q0 + qc], block)
            counts[q0:q0 + qc] += np.asarray(got)

    # Relevant items at >= the threshold are not competitors; the i-th relevant item
    # sits after the non-relevant ones at >= its score and the i-1 relevant before it.
    rel_ge = np.sum(rel_scores[:, :, None] >= thresholds[:, None, :], axis=1)
    i = np.arange(1, CUTOFF + 1)
    positions = np.where(np.isnan(thresholds), np.inf, i + counts - rel_ge)[:n_q]
    out = metrics_from_positions(positions, m)
    out["candidates"] = n_c
    return {**{k: out[k] for k in METRIC_NAMES}, "queries": out["queries"],
            "candidates": n_c, "queries_without_relevant": out["queries_without_relevant"]}
