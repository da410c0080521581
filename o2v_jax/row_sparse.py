"""Lazy ``row_sparse`` updates (MXNet's row_sparse + lazy_update), and what makes them fast.

Only the token-table rows a batch reads, and their optimizer state, are updated; the
other rows never change. :class:`LazyUpdate` is the row_sparse drop-in for training.py's
dense update, ``(params, opt_state, batch, key) -> (params, opt_state, sums)``; nothing
else here is needed to follow training (a reader of training.py can skip this module).

Two code shapes (``layout``, :mod:`o2v_jax.kernels`):

* ``"cpu"``: each table's rows are found on the host (:func:`plan_batch`, numpy, before
  the jitted step), padded to a short ladder of sizes (:func:`row_cap`); pooled encoders
  with enough tokens also get a :func:`gradient_plan`. The optimizer runs over
  ROW_CHUNK-row chunks that stay in cache, and writes rows back in place
  (:func:`o2v_jax.native.set_rows`).
* ``"accelerator"``: the rows are found inside the step (:func:`device_rows`), the
  gradient is one scatter, and the optimizer runs once over all rows.

docs/training.md explains each piece; benchmarks/RESULTS.md has what each was worth.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from o2v_jax import native
from o2v_jax.buckets import Batch
from o2v_jax.kernels import bag_counts, embedding_bag_mean, embedding_bag_mean_grad
from o2v_jax.model import join_tables, split_tables, table_group, table_groups

# Rows per iteration of the lazy optimizer loop: a chunk's parameters, optimizer state and
# gradient (a few x 256 x D floats) stay in cache between their gather, the optax math
# and their scatter. Smaller chunks were slower, larger ones no faster.
ROW_CHUNK = 256
# Below this many tokens a step, a table's gradient is a plain (cap, D) scatter-add buffer:
# gradient_plan's fixed costs (numpy work, a (ROW_CHUNK, S) matmul) outweigh its gain on
# small batches (one-token MovieLens sides), while long pooled bags (Wikipedia) gain.
PLAN_MIN_TOKENS = 4096
DEVICE_ROWS_METHODS = ("mark", "sort")


@dataclasses.dataclass(frozen=True)
class Options:
    """Knobs of the row_sparse step, for tests and benchmarks; results never depend on them."""

    native_rows: bool = True  # CPU: False writes rows back with XLA's scatter (slower)
    plan_min_tokens: int = PLAN_MIN_TOKENS  # CPU: a table's tokens a step to get a plan
    device_rows: str = "mark"  # accelerator: how device_rows finds distinct ids


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TableRows:
    """The rows of one token table a batch reads, and how to sum their gradient.

    ``rows`` int32 (cap,): the distinct ids (padding row 0 included), padded with ids
    >= V; ``count`` int32 (): how many are real; ``remapped``: the bags reading the table
    as positions in ``rows`` (None with a plan); ``plan``: :func:`gradient_plan`'s
    (hot, levels, level_starts), or None.
    """

    rows: Any
    count: Any
    remapped: tuple | None
    plan: tuple | None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PlannedBatch:
    """A batch with its tables' rows: what the CPU row_sparse step takes."""

    batch: Batch
    tables: dict[str, TableRows]  # table group -> its rows


def row_cap(rows: int, limit: int) -> int:
    """The static size a set of ``rows`` gathered table rows is padded to.

    The smallest of 256, 384, 512, 768, 1024, ... (2^k and 3 * 2^(k-1)) that holds
    ``rows``, at most ``limit`` (the most rows a batch can read), rounded up to a multiple
    of ROW_CHUNK: each bucket shape compiles for a few sizes only, and the padding wastes
    under a third of the gradient buffer.
    """
    cap = 256
    while cap < rows:
        cap = cap * 3 // 2 if cap & (cap - 1) == 0 else cap // 3 * 4
    cap = max(min(cap, limit), rows)
    return -(-cap // ROW_CHUNK) * ROW_CHUNK


def table_bags(tied: bool, in0, in1) -> dict[str, tuple[list, int]]:
    """Token table group -> (the id arrays reading it, in side order; the side whose
    vocabulary it has)."""
    out: dict[str, tuple[list, int]] = {}
    for side, ids in enumerate((in0, in1)):
        out.setdefault(table_group(side, tied), ([], side))[0].append(ids)
    return out


# --------------------------------------------------------------------------- host plans (CPU)

@functools.lru_cache(maxsize=64)
def _token_sources(shapes: tuple[tuple[int, int], ...]) -> np.ndarray:
    """int32 (T,): for bags of these (B, L_i) shapes flattened in (bag, position, batch
    row) order, each token's source ``bag * B + batch row`` (its row of the stacked
    per-row gradients)."""
    return np.concatenate([np.tile(np.arange(rows, dtype=np.int32) + i * rows, length)
                           for i, (rows, length) in enumerate(shapes)])


def gradient_plan(bags: list[np.ndarray], vocab: int) -> tuple[np.ndarray, ...]:
    """A pooled table's rows for one batch, and how to sum their gradient without scatters.

    Row ``r``'s gradient is the sum of ``per_token[src]`` over the real tokens of id r in
    the batch, ``src`` = the bag and batch row the token is in (``per_token`` is that
    row's gradient divided by its token count). On CPU, XLA's scatter-add is a serial
    loop, slower than a gather of the same rows, and a (cap, D) buffer for it must be
    zeroed, filled and read back from memory; so the sums are formed in cache from gathers
    and one matmul instead. The rows are ordered by token count, most frequent first, and:

    * chunk 0 (the ROW_CHUNK most frequent rows: about half the tokens of Zipf text, up
      to thousands per row) is ``hot @ per_token``, ``hot`` = token counts per (row, src);
    * every later chunk is a sum of gathers, one per *level*: level k holds, for each
      row of the chunk, the ``src`` of its k-th token (or a zero row). A chunk needs as
      many levels as its first row has tokens, which by the ordering is at most the
      smallest count in the chunk before it, so all chunks need at most T / ROW_CHUNK
      levels (T = the bags' B * L). Each row's tokens are summed in token order.

    Args:
      bags: the ids reading this table, int32 (B, L_i) each (in0, then in1 when tied).
      vocab: V, the table's row count.

    Returns:
      ``rows`` int32 (cap,): the distinct ids, padding row 0 included (last; its
      gradient is 0), padded with V to :func:`row_cap`; ``count`` int32 (): how many are
      real; ``hot`` float32 (ROW_CHUNK, S): chunk 0's token counts, S = len(bags) * B;
      ``levels`` int32 (T // ROW_CHUNK + 2, ROW_CHUNK): rows of ``per_token`` extended
      as (S + 1 + ROW_CHUNK, D) = [per_token; 0; hot @ per_token] (so chunk 0 is the one
      level S + 1 + arange(ROW_CHUNK) and a missing token reads row S, zero);
      ``level_starts`` int32 (cap / ROW_CHUNK + 1,): chunk c's levels are
      ``levels[level_starts[c]:level_starts[c + 1]]``.
    """
    sources = len(bags) * bags[0].shape[0]
    flat = np.concatenate([a.T.ravel() for a in bags])  # ids, (bag, position, batch row) order
    occ = np.flatnonzero(flat)  # real tokens; padding (id 0) gets no gradient
    # One sort of unique int64 keys (numpy's SIMD sort; a stable argsort is much slower):
    # the tokens by id, each id's tokens in token order.
    shift = max(int(flat.size).bit_length(), 1)
    keys = np.sort((flat[occ].astype(np.int64) << shift) | occ)
    ids = keys >> shift
    starts = np.flatnonzero(np.diff(ids, prepend=-1))  # each distinct id's first token
    counts = np.diff(starts, append=ids.size)
    # Distinct ids by count, most frequent first, ties by id (again one unique-key sort).
    s2 = max(int(starts.size).bit_length(), 1)
    order = np.sort(((counts.max(initial=0) - counts).astype(np.int64) << s2)
                    | np.arange(starts.size)) & ((1 << s2) - 1)
    rows = np.append(ids[starts[order]], 0).astype(np.int32)  # + padding row 0
    n = rows.size
    cap = row_cap(n, min(vocab, flat.size + 1))
    row_counts = counts[order]
    first = np.concatenate([[0], np.cumsum(row_counts)])  # row position -> its first token
    pos = np.repeat(np.arange(order.size), row_counts)  # each token's row position
    rank = np.arange(ids.size) - first[pos]  # k: the token is its row's k-th
    src = _token_sources(tuple(a.shape for a in bags))[
        keys[starts[order][pos] + rank] & ((1 << shift) - 1)]
    n_hot = first[min(ROW_CHUNK, order.size)]  # tokens of chunk 0
    hot = np.bincount(pos[:n_hot] * sources + src[:n_hot], minlength=ROW_CHUNK * sources)
    hot = hot.astype(np.float32).reshape(ROW_CHUNK, sources)
    per_chunk = np.zeros(cap // ROW_CHUNK, np.int64)
    per_chunk[:-(-n // ROW_CHUNK)] = 1  # chunk 0 (hot), and a chunk of row 0 alone (zeros)
    firsts = row_counts[ROW_CHUNK::ROW_CHUNK]  # first (most frequent) row of chunks 1, 2, ...
    per_chunk[1:1 + firsts.size] = firsts
    level_starts = np.concatenate([[0], np.cumsum(per_chunk)]).astype(np.int32)
    levels = np.full((flat.size // ROW_CHUNK + 2, ROW_CHUNK), sources, np.int32)
    levels[0] = sources + 1 + np.arange(ROW_CHUNK)
    p = pos[n_hot:]
    levels[level_starts[p // ROW_CHUNK] + rank[n_hot:], p % ROW_CHUNK] = src[n_hot:]
    padded = np.full(cap, vocab, np.int32)
    padded[:n] = rows
    return padded, np.int32(n), hot, levels, level_starts


def host_rows(ids: list[np.ndarray], vocab: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """int32 (cap,) the sorted distinct ids of ``ids`` (row 0 first) padded with V, int32
    () their count, and ``ids`` as positions in that list. A vocabulary-sized mark array
    finds them (O(V + T), no sort)."""
    mark = np.zeros(vocab, bool)
    mark[0] = True  # padding stays position 0, so the model's `id != 0` mask holds
    for a in ids:
        mark[a.ravel()] = True
    rows = np.flatnonzero(mark).astype(np.int32)
    lut = np.zeros(vocab, np.int32)
    lut[rows] = np.arange(rows.size, dtype=np.int32)
    padded = np.full(row_cap(rows.size, min(vocab, sum(a.size for a in ids) + 1)), vocab,
                     np.int32)
    padded[:rows.size] = rows
    return padded, np.int32(rows.size), [lut[a] for a in ids]


def plan_batch(batch: Batch, *, tied: bool, vocab: tuple[int, int], pooled: bool,
               plan_min_tokens: int = PLAN_MIN_TOKENS) -> PlannedBatch:
    """The host half of the CPU step: each table's rows (and a gradient plan for pooled
    tables read by at least ``plan_min_tokens`` tokens). Doing this on the host keeps
    sorts out of the compiled step and lets the optimizer loop scale with the ids a batch
    really has (on Zipf text far fewer than B * L); the price is a compile per row_cap
    size a bucket shape's batches reach (a few)."""
    in0, in1 = np.asarray(batch.in0), np.asarray(batch.in1)
    tables = {}
    for name, (bags, side) in table_bags(tied, in0, in1).items():
        if pooled and sum(b.size for b in bags) >= plan_min_tokens:
            rows, count, *plan = gradient_plan(bags, vocab[side])
            tables[name] = TableRows(rows, count, None, tuple(plan))
        else:
            rows, count, remapped = host_rows(bags, vocab[side])
            tables[name] = TableRows(rows, count, tuple(remapped), None)
    return PlannedBatch(Batch(in0, in1, batch.labels, batch.weights), tables)


class HostPlannedStep:
    """The CPU row_sparse train step: :func:`plan_batch` on the host, then ``step``, the
    jitted ``(state, planned batch, key) -> (state, sums)``."""

    def __init__(self, step: Callable, plan: Callable[[Batch], PlannedBatch]):
        self.step = step
        self.plan = plan

    def __call__(self, state, batch: Batch, key: jax.Array):
        return self.step(state, self.plan(batch), key)


# --------------------------------------------------------------------------- device rows

def device_rows(bags: list[jax.Array], vocab: int,
                method: str = "mark") -> tuple[jax.Array, jax.Array, list[jax.Array]]:
    """:func:`host_rows` computed inside the jitted step (the accelerator layout).

    Device work instead of host work per step, and one static row count per bucket
    shape: ``min(V, T + 1)`` (T = the bags' tokens), so a shape compiles once. Returns
    int32 (cap,) the sorted distinct ids (padding row 0 first) padded with V, V + 1, ...
    (out of range, and distinct, so the optimizer's scatters may promise unique indices:
    no atomics on a GPU), int32 () their count, and ``bags`` as positions in that list.
    Ids must be in [0, V) (channels are checked when read).

    ``method``: "mark" sets a flag per id in a vocabulary-sized array and numbers the
    flags with a prefix sum (O(V + T), no sort); "sort" is jnp.unique (a device sort,
    O(T log T), launched through a custom call).
    """
    if method not in DEVICE_ROWS_METHODS:
        raise ValueError(f"method={method!r} is invalid: expected one of {DEVICE_ROWS_METHODS}")
    flat = jnp.concatenate([jnp.zeros(1, jnp.int32)] + [b.ravel().astype(jnp.int32) for b in bags])
    cap = min(vocab, flat.size)
    if method == "sort":
        rows, inverse = jnp.unique(flat, size=cap, fill_value=vocab, return_inverse=True)
        rows, inverse = rows.astype(jnp.int32), inverse.reshape(-1).astype(jnp.int32)
        count = jnp.sum(rows < vocab).astype(jnp.int32)
    else:
        mark = jnp.zeros(vocab, jnp.int32).at[flat].set(1)
        position = jnp.cumsum(mark, dtype=jnp.int32) - 1  # of each marked id, in id order
        count = position[-1] + 1
        inverse = position[flat]
        rows = jnp.full(cap, vocab, jnp.int32).at[jnp.where(mark == 1, position, cap)].set(
            jnp.arange(vocab, dtype=jnp.int32), mode="drop")
    slots = jnp.arange(cap, dtype=jnp.int32)
    rows = jnp.where(slots < count, rows, vocab + slots)
    inverse = inverse[1:]
    remapped, start = [], 0
    for b in bags:
        remapped.append(inverse[start:start + b.size].reshape(b.shape))
        start += b.size
    return rows, count, remapped


def chunk_gradient(per_token: jax.Array, levels: jax.Array, level_starts: jax.Array,
                   chunk: jax.Array) -> jax.Array:
    """The gradient of chunk ``chunk``'s rows of a :func:`gradient_plan`: the sum of one
    ROW_CHUNK-row gather of the extended ``per_token`` (S + 1 + ROW_CHUNK, D) per level
    of the chunk. float32 (ROW_CHUNK, D), formed in cache inside the optimizer loop."""
    lo, hi = level_starts[chunk], level_starts[chunk + 1]

    def add(level, acc):
        return acc + per_token.at[levels[level]].get(mode="promise_in_bounds")

    # Every chunk that runs has at least one level, so the first gather starts the sum.
    first = per_token.at[levels[lo]].get(mode="promise_in_bounds")
    return jax.lax.fori_loop(lo + 1, hi, add, first)


# --------------------------------------------------------------------------- the update

@dataclasses.dataclass(frozen=True)
class LazyUpdate:
    """``(params, opt_state, batch, key) -> (params, opt_state, sums)`` updating only the
    table rows the batch reads. ``batch`` is a :class:`PlannedBatch` on CPU, a plain
    Batch on an accelerator (whose rows are then found in the step).

    Attributes:
      loss: objectives.PairLoss: ``loss(params, batch, key)`` and
        ``loss.from_encodings(params, u, v, batch, key)``, both -> (loss, sums).
      tx: the optax optimizer; keep: table group -> float32 (V, 1) update mask (0 =
      frozen row); tied, vocab, pooled: from the config; layout: "cpu" or "accelerator".
    """

    loss: Any
    tx: optax.GradientTransformation
    keep: Mapping[str, jax.Array]
    tied: bool
    vocab: tuple[int, int]
    pooled: bool  # both encoders pooled_embedding: differentiate w.r.t. the (B, D) bags
    layout: str
    options: Options = Options()

    @property
    def one_shot(self) -> bool:
        """On an accelerator the update runs once over all rows (a loop iteration costs a
        launch and a host round trip there); on CPU in ROW_CHUNK-row chunks."""
        return self.layout == "accelerator"

    def __call__(self, params, opt_state, batch, key):
        if self.one_shot:
            batch = self._device_plan(batch)
        rest, tables = split_tables(params)
        sums, g_rest, g_tables = self._grads(rest, tables, batch, key)
        up_rest, st_rest = self.tx.update(g_rest, opt_state["rest"], rest)
        new_tables, st_tables = {}, {}
        for name, table in tables.items():
            new_tables[name], st_tables[name] = self._lazy_update(
                name, table, opt_state["tables"][name], batch.tables[name], g_tables[name])
        params = join_tables(optax.apply_updates(rest, up_rest), new_tables)
        return params, {"rest": st_rest, "tables": st_tables}, sums

    def _device_plan(self, batch: Batch) -> PlannedBatch:
        tables = {}
        for name, (bags, side) in table_bags(self.tied, batch.in0, batch.in1).items():
            rows, count, remapped = device_rows(bags, self.vocab[side], self.options.device_rows)
            tables[name] = TableRows(rows, count, tuple(remapped), None)
        return PlannedBatch(batch, tables)

    def _grads(self, rest, tables, planned: PlannedBatch, key):
        """(sums, grads of rest, per table: chunk -> its rows' gradient, (ROW_CHUNK, D))."""
        batch, rows = planned.batch, {k: t.rows for k, t in planned.tables.items()}

        def sliced(g):  # chunks of a (cap, D) gradient buffer (all of it in one shot)
            if self.one_shot:
                return lambda c: g
            return lambda c: jax.lax.dynamic_slice_in_dim(g, c * ROW_CHUNK, ROW_CHUNK)

        if not self.pooled:  # through the model, on gathered tables and remapped ids
            in0s, in1s = (r for k in table_groups(self.tied) for r in planned.tables[k].remapped)
            sub = {name: t.at[rows[name]].get(mode="clip") for name, t in tables.items()}
            (_, sums), grads = jax.value_and_grad(self.loss, has_aux=True)(
                join_tables(rest, sub), Batch(in0s, in1s, batch.labels, batch.weights), key)
            g_rest, g_sub = split_tables(grads)
            return sums, g_rest, {name: sliced(g) for name, g in g_sub.items()}
        # Pooled encoders read the full tables by id (no gathered copy), and the model is
        # differentiated w.r.t. their (B, D) outputs, so both (tied) sides' table gradient
        # is summed from per-row gradients at once. Each real token of batch row b adds
        # g[b] / count[b] to its table row: with a gradient_plan those sums are formed per
        # chunk inside the optimizer loop (no (cap, D) buffer is zeroed, scattered into
        # and read back); else they are scatter-added into one.
        ids = (batch.in0, batch.in1)
        u, v = (embedding_bag_mean(tables[table_group(side, self.tied)], ids[side], self.layout)
                for side in (0, 1))
        head = lambda rest, u, v: self.loss.from_encodings(  # noqa: E731
            join_tables(rest, tables), u, v, batch, key)
        (_, sums), (g_rest, g_u, g_v) = jax.value_and_grad(head, argnums=(0, 1, 2), has_aux=True)(
            rest, u, v)
        per_bag: dict[str, list] = {}
        for side, g in enumerate((g_u, g_v)):
            per_bag.setdefault(table_group(side, self.tied), []).append((ids[side], g))
        grads = {}
        for name, parts in per_bag.items():
            table_rows = planned.tables[name]
            if table_rows.plan is None:  # ids remapped to positions in `rows`
                grads[name] = sliced(embedding_bag_mean_grad(
                    rows[name].shape[0],
                    [(r, g) for r, (_, g) in zip(table_rows.remapped, parts)], self.layout))
                continue
            hot, levels, level_starts = table_rows.plan
            per = jnp.concatenate([g / bag_counts(b, g.dtype) for b, g in parts])  # (S, D)
            per = jnp.concatenate([per, jnp.zeros_like(per[:1]), hot @ per])  # see gradient_plan
            grads[name] = functools.partial(chunk_gradient, per, levels, level_starts)
        return sums, g_rest, grads

    def _lazy_update(self, name, table, state, table_rows: TableRows, chunk_grad):
        return update_rows(self.tx, table, state, table_rows.rows, table_rows.count, chunk_grad,
                           self.keep.get(name), one_shot=self.one_shot,
                           native_rows=self.options.native_rows)


def update_rows(tx: optax.GradientTransformation, table, state, rows, count, chunk_grad, mask, *,
                one_shot: bool, native_rows: bool = True):
    """The optax update of only the rows ``rows[:count]`` of a table and its state:
    ``(table, state)``.

    ``chunk_grad(i)`` gives the gradient of rows ``rows[i * ROW_CHUNK:][:ROW_CHUNK]``;
    ``mask`` (V, 1) multiplies the updates (0 = frozen row), or None.

    A loop over ROW_CHUNK-row chunks: gather the chunk's parameters and optimizer
    state, run ``tx.update`` on them, scatter both back. Chunks keep the work in
    cache (one read and one write of each touched row), and the loop stops after the
    last real row, so the padding of ``rows`` costs nothing here. Padding ids are >= V:
    gathered with clipping (harmless garbage), dropped by the scatters. One shot
    (accelerators): the body runs once on all of ``rows``, padding included, and
    ``chunk_grad(0)`` is the whole (cap, D) gradient; ``rows`` must then be sorted and
    distinct, padding included (as :func:`device_rows` makes them).

    It sees one table as it is: a row-sharded table's shard under ``shard_map`` works
    the same (o2v_jax.sharded), with ``rows`` local to the shard.
    """
    vocab = table.shape[0]
    per_row = lambda x: x.ndim > 0 and x.shape[0] == vocab  # noqa: E731 - state leaves of table shape
    # One shot: the ids are sorted and distinct (padding too), so the scatters need no
    # atomics. Chunks: host rows repeat V as padding.
    hint = {"indices_are_sorted": True, "unique_indices": True} if one_shot else {}

    def body(i, carry):
        table, state = carry
        idx = rows if one_shot else jax.lax.dynamic_slice_in_dim(rows, i * ROW_CHUNK, ROW_CHUNK)
        g = chunk_grad(i)
        p = table.at[idx].get(mode="clip")
        st = jax.tree.map(lambda x: x.at[idx].get(mode="clip") if per_row(x) else x, state)
        up, st = tx.update(g, st, p)
        if mask is not None:
            up = up * mask.at[idx].get(mode="clip")
        if one_shot:
            table = table.at[idx].add(up, mode="drop", **hint)
            write = lambda full, part: full.at[idx].set(part, mode="drop", **hint)  # noqa: E731
        else:  # CPU chunks: the native row write-back (native.py), p + up = the add's floats
            table = native.set_rows(table, idx, p + up, native=native_rows)
            write = lambda full, part: native.set_rows(full, idx, part, native=native_rows)  # noqa: E731
        # Scalar leaves (Adam's step count) are written after the loop, once.
        state = jax.tree.map(lambda full, part: write(full, part) if per_row(full) else full,
                             state, st)
        return table, state

    if one_shot:
        table, new_state = body(0, (table, state))
    else:
        chunks = (count + ROW_CHUNK - 1) // ROW_CHUNK
        table, new_state = jax.lax.fori_loop(0, chunks, body, (table, state))
    # The scalar leaves as one update of no rows computes them (e.g. count + 1).
    empty = lambda x: x[:0] if per_row(x) else x  # noqa: E731
    _, scalars = tx.update(table[:0], jax.tree.map(empty, state), table[:0])
    return table, jax.tree.map(lambda full, s: full if per_row(full) else s, new_state, scalars)
