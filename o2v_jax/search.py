"""Exact top-k search over a matrix of embeddings, chunked so memory stays bounded.

::

    >>> scores, ids = top_k(queries, candidates, 10)          # (Q, D), (N, D) float
    >>> scores.shape, ids.shape                                # best first
    ((Q, 10), (Q, 10))

How it runs: queries are cut into chunks of ``query_chunk`` rows and candidates into
chunks of ``candidate_chunk`` rows; one jitted step scores a (query chunk, candidate
chunk) block and merges it into a running top-k per query, so memory is
O(query_chunk * (k + candidate_chunk)) whatever Q and N are, and a dense (Q, N) score
matrix never exists. Chunk sizes come from a fixed ladder (powers of two up to the caps),
and a short last candidate chunk is taken as the last ``candidate_chunk`` rows with the
already-seen ones masked, so the step compiles once per (chunk sizes, D, k, metric),
never per Q or N. Candidate chunks are the outer loop: each is copied to the device once.

The order (what "exact" means, and what tests/test_search.py checks against numpy):

* ``dot``: ``q . c``; ``cosine``: ``(q / |q|) . (c / |c|)``, in float32 with the matmul
  at full float32 precision (``Precision.HIGHEST``: no TF32 on GPUs). A zero vector has
  no direction: its cosine scores are NaN.
* Higher scores first; equal scores by lower candidate index (``-0.0 == 0.0``).
* Below every real score come candidates scored ``-inf``, then NaN, each by index; padding
  rows are never returned. ``k > N`` returns N columns.

That is ``np.lexsort((index, -score))`` with NaN placed last, i.e. numpy's stable argsort
of ``-score``. Scores equal numpy's up to float32 rounding of the dot products (XLA and
numpy may sum the D products in a different order), so near-ties within that rounding
may swap; integer-valued inputs give identical results.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

METRICS = ("cosine", "dot")
QUERY_CHUNK = 256  # query rows per step (cap)
CANDIDATE_CHUNK = 8192  # candidate rows per step (cap)
MIN_CHUNK = 8  # smallest rung of the chunk ladder
MAX_CANDIDATES = 2**31 - 2**24  # int32 candidate indices, with room for a chunk past the end


def block_scores(q: jax.Array, c: jax.Array, metric: str) -> jax.Array:
    """Scores of a query block against a candidate block.

    Args:
        q: float (Qc, D) queries.
        c: float (Nc, D) candidates.
        metric: "cosine" or "dot" (static).

    Returns:
        float32 (Qc, Nc). The single definition of a score: retrieval.py's evaluation
        calls it too, so search and metrics rank by the same numbers.
    """
    q = q.astype(jnp.float32)
    c = c.astype(jnp.float32)
    if metric == "cosine":
        # 1/sqrt(0) = inf and 0 * inf = NaN: a zero vector gets NaN scores, as in numpy.
        q = q * lax.rsqrt(jnp.sum(q * q, axis=1, keepdims=True))
        c = c * lax.rsqrt(jnp.sum(c * c, axis=1, keepdims=True))
    return jnp.dot(q, c.T, precision=lax.Precision.HIGHEST)


def chunk_size(n: int, cap: int) -> int:
    """The ladder rung for n rows: the smallest power of two >= n, >= MIN_CHUNK, <= cap."""
    return min(cap, max(MIN_CHUNK, 1 << max(n - 1, 0).bit_length()))


def chunk_starts(n: int, size: int) -> list[tuple[int, int]]:
    """(start, offset) per chunk of `size` rows covering rows [0, n).

    `offset` is the first row the chunk contributes; `start` is where its rows begin, moved
    back for a short last chunk so that every chunk has exactly `size` rows (rows in
    [start, offset) were seen already and are masked). n < size needs rows padded to size.
    """
    out = []
    for offset in range(0, n, size):
        out.append((max(min(offset, n - size), 0), offset))
    return out


def chunk_ids(start: jax.Array, offset: jax.Array, n: jax.Array, size: int) -> jax.Array:
    """int32 (size,) global row ids of a chunk, -1 where masked (seen before, or padding)."""
    ids = start + jnp.arange(size, dtype=jnp.int32)
    return jnp.where((ids >= offset) & (ids < n), ids, -1)


def _select(s, ids, k: int):
    """The k best columns of each row, in the module's order.

    Args:
        s: float32 (Qc, W) scores.
        ids: int32 (Qc, W) or (W,) global candidate ids, -1 = masked (never wins over a
            real candidate). Within a row, ties must be meant to go to the lower position:
            callers keep columns in ascending id order.
        k: columns to keep, <= W.

    Returns:
        float32 (Qc, k) scores and int32 (Qc, k) ids, best first.
    """
    ids = jnp.broadcast_to(ids, s.shape)
    scored = (ids >= 0) & (s > -jnp.inf)  # NaN > -inf is False
    # Real scores above -inf go through top_k on the float scores themselves (its fast
    # path; an int32 total-order key falls back to a full sort on CPU). top_k orders
    # floats totally (-0.0 below 0.0), so zeros are made equal first. Everything else
    # (-inf, NaN, masked) gets -inf here and is ordered in `fill`, only when a row needs it.
    key = jnp.where(scored, jnp.where(s == 0, 0.0, s), -jnp.inf)
    vals, pos = lax.top_k(key, k)  # documented: equal values keep the lower position first
    n_scored = jnp.sum(vals > -jnp.inf, axis=1, keepdims=True)

    def fill(pos):
        # The rest of a short row: -inf scores, then NaN, then masked, each by position.
        # Positions < 2**22 are exact in float32.
        width = s.shape[1]
        rank = jnp.where(ids < 0, 2, jnp.where(jnp.isnan(s), 1, 0)) * width
        key2 = jnp.where(scored, -jnp.inf,
                         -(rank + jnp.arange(width)[None, :]).astype(jnp.float32))
        _, pos2 = lax.top_k(key2, k)
        j = jnp.arange(k)[None, :]
        tail = jnp.take_along_axis(pos2, jnp.clip(j - n_scored, 0, k - 1), axis=1)
        return jnp.where(j < n_scored, pos, tail)

    pos = lax.cond(jnp.any(n_scored < k), fill, lambda p: p, pos)
    return jnp.take_along_axis(s, pos, axis=1), jnp.take_along_axis(ids, pos, axis=1)


@functools.partial(jax.jit, static_argnames=("k", "metric"))
def _step(top_s, top_i, q, c, start, offset, n, *, k: int, metric: str):
    """Merge one scored (query chunk, candidate chunk) block into the running top-k.

    The chunk's own best min(k, Nc) come first, then those merge with the running list
    (Qc, k): every running id is lower than every chunk id and both lists are in order,
    so position in the concatenation orders ties by index.
    """
    s = block_scores(q, c, metric)
    ids = chunk_ids(start, offset, n, c.shape[0])
    s, ids = _select(s, ids, min(k, c.shape[0]))
    return _select(jnp.concatenate([top_s, s], axis=1), jnp.concatenate([top_i, ids], axis=1), k)


def rows(x: Any, start: int, size: int) -> jax.Array:
    """x[start:start+size] on the device (x has at least start+size rows)."""
    if isinstance(x, jax.Array):
        return _device_rows(x, start, size=size)
    return jnp.asarray(x[start:start + size])


@functools.partial(jax.jit, static_argnames=("size",))
def _device_rows(x, start, *, size: int):
    return lax.dynamic_slice_in_dim(x, start, size)


def as_matrix(x: Any, name: str) -> Any:
    """A 2-D float array (a jax.Array stays on its device; anything else becomes numpy float32)."""
    if not isinstance(x, jax.Array):
        x = np.asarray(x)
        if x.dtype.kind not in "fiub":
            raise ValueError(f"{name}: expected a numeric (rows, D) array, got dtype {x.dtype}")
        x = x.astype(np.float32, copy=False)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (rows, D) array, got shape {tuple(x.shape)}")
    return x


def pad_rows(x: Any, size: int) -> Any:
    """x with zero rows appended up to `size` rows (no copy when it has enough)."""
    if x.shape[0] >= size:
        return x
    pad = ((0, size - x.shape[0]), (0, 0))
    return jnp.pad(x, pad) if isinstance(x, jax.Array) else np.pad(x, pad)


def check_args(queries: Any, candidates: Any, metric: str, query_chunk: int,
               candidate_chunk: int) -> tuple[Any, Any]:
    """Validated (queries, candidates); errors name the argument and what was expected."""
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {', '.join(METRICS)}, got {metric!r}")
    for name, value in (("query_chunk", query_chunk), ("candidate_chunk", candidate_chunk)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    queries = as_matrix(queries, "queries")
    candidates = as_matrix(candidates, "candidates")
    if queries.shape[1] != candidates.shape[1]:
        raise ValueError(f"queries have D={queries.shape[1]} columns but candidates have "
                         f"D={candidates.shape[1]}; both need the same embedding size")
    if candidates.shape[0] > MAX_CANDIDATES:
        raise ValueError(f"candidates: at most {MAX_CANDIDATES:,} rows (int32 ids), got "
                         f"{candidates.shape[0]:,}")
    return queries, candidates


def top_k(queries: Any, candidates: Any, k: int, *, metric: str = "cosine",
          query_chunk: int = QUERY_CHUNK,
          candidate_chunk: int = CANDIDATE_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """The k best candidates of every query, exactly (the order is in the module docstring).

    Args:
        queries: float (Q, D), numpy or jax.
        candidates: float (N, D), numpy or jax (a jax.Array is sliced on its device).
        k: how many per query, >= 1; more than N gives N.
        metric: "cosine" or "dot".
        query_chunk, candidate_chunk: caps on the rows scored per step; the step holds
            float32 (query_chunk, k + candidate_chunk) at a time.

    Returns:
        scores: float32 (Q, min(k, N)), best first.
        indices: int64 (Q, min(k, N)), rows of `candidates`.
    """
    queries, candidates = check_args(queries, candidates, metric, query_chunk, candidate_chunk)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k: expected an int >= 1, got {k!r}")
    n_q, n_c = queries.shape[0], candidates.shape[0]
    k = min(k, n_c)
    if n_q == 0 or k == 0:
        return np.zeros((n_q, k), np.float32), np.zeros((n_q, k), np.int64)
    qc = chunk_size(n_q, query_chunk)
    nc = chunk_size(n_c, candidate_chunk)
    candidates = pad_rows(candidates, nc)
    queries = pad_rows(queries, -(-n_q // qc) * qc)
    q_blocks = [rows(queries, q0, qc) for q0 in range(0, n_q, qc)]
    state = [(jnp.full((qc, k), -jnp.inf, jnp.float32), jnp.full((qc, k), -1, jnp.int32))
             for _ in q_blocks]
    for start, offset in chunk_starts(n_c, nc):
        c = rows(candidates, start, nc)
        for j, q in enumerate(q_blocks):
            state[j] = _step(*state[j], q, c, start, offset, n_c, k=k, metric=metric)
    scores = np.concatenate([np.asarray(s) for s, _ in state])[:n_q]
    indices = np.concatenate([np.asarray(i) for _, i in state])[:n_q]
    return scores, indices.astype(np.int64)


def reference_top_k(queries: np.ndarray, candidates: np.ndarray, k: int,
                    metric: str = "cosine") -> tuple[np.ndarray, np.ndarray]:
    """The same search in plain numpy over a dense (Q, N) matrix: for tests, small inputs.

    Scores in float32 like top_k; the order is numpy's stable argsort of -score with NaN
    last (np.argsort puts NaN last).
    """
    q = np.asarray(queries, np.float32)
    c = np.asarray(candidates, np.float32)
    if metric == "cosine":
        with np.errstate(divide="ignore", invalid="ignore"):
            q = q / np.sqrt(np.sum(q * q, axis=1, keepdims=True))
            c = c / np.sqrt(np.sum(c * c, axis=1, keepdims=True))
    s = q @ c.T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, axis=1), order
