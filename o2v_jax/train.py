"""Training: losses, optimizers (incl. lazy row_sparse updates), jitted steps, the epoch
loop with SageMaker's early stopping and metric lines, checkpoints and resume.

Data flow: ``PairData`` -> ``buckets.batches`` (fixed shapes) -> ``train_step`` (jitted,
compiled once per bucket shape) -> per-epoch metrics -> early stopping -> best params ->
``checkpoint.save_model``. See docs/training.md.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from o2v_jax import checkpoint, native
from o2v_jax.buckets import Batch, batches, prefetch
from o2v_jax.config import Config
from o2v_jax.data import PairData
from o2v_jax.pretrained import Pretrained
from o2v_jax.sampling import negative_pairs
from o2v_jax.encoders import bag_counts, dropout, embedding_bag_mean, embedding_bag_mean_grad, layout
from o2v_jax.model import Object2Vec, abstract_model, merge_params, nnx_rngs, split_params

log = logging.getLogger("o2v_jax")

Params = dict[str, Any]  # nested dict of arrays (the model's parameters)
# Where the token tables live in the params dict (model.py: embed0/embed1 nnx.Embed).
TABLES = ("embed0", "embed1")


# --------------------------------------------------------------------------- optimizers

def make_optimizer(config: Config) -> optax.GradientTransformation:
    """The optax chain for ``config.optimizer`` with MXNet 1.3's default constants.

    ``weight_decay`` is MXNet's ``wd``: ``wd * w`` is added to the gradient before the
    optimizer sees it (so it also flows into Adam's moments), not decoupled AdamW decay.
    """
    lr = config.learning_rate
    base = {
        "adam": lambda: optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8),
        "adagrad": lambda: optax.adagrad(lr, initial_accumulator_value=0.0, eps=1e-7),
        "rmsprop": lambda: optax.rmsprop(lr, decay=0.9, eps=1e-8),
        "adadelta": lambda: optax.adadelta(lr, rho=0.9, eps=1e-5),
        "sgd": lambda: optax.sgd(lr),
    }[config.optimizer]()
    if config.weight_decay > 0:
        return optax.chain(optax.add_decayed_weights(config.weight_decay), base)
    return base


# --------------------------------------------------------------------------- objective

def objective(output: jax.Array, labels: jax.Array, weights: jax.Array, regression: bool):
    """Masked loss and metric sums for one batch.

    Args:
      output: float32 (B, C) logits, or (B, 1) predictions for regression.
      labels: float32 (B,) class index or target value.
      weights: float32 (B,) 1 for real rows, 0 for fill rows (never counted).

    Returns:
      (loss, sums): the mean loss over real rows (what is differentiated) and a dict of
      sums over real rows: ``loss`` (cross-entropy or squared error), ``correct``, ``count``.
    """
    count = weights.sum()
    if regression:
        err = output[:, 0] - labels
        sq = err * err
        # MXNet's LinearRegressionOutput back-propagates (pred - label): the gradient of
        # 0.5 * err^2. The reported metric is the plain mean squared error.
        loss = 0.5 * (sq * weights).sum() / jnp.maximum(count, 1.0)
        return loss, {"loss": (sq * weights).sum(), "correct": jnp.zeros(()), "count": count}
    ce = optax.softmax_cross_entropy_with_integer_labels(output, labels.astype(jnp.int32))
    correct = (jnp.argmax(output, axis=-1) == labels.astype(jnp.int32)).astype(jnp.float32)
    loss = (ce * weights).sum() / jnp.maximum(count, 1.0)
    return loss, {"loss": (ce * weights).sum(), "correct": (correct * weights).sum(), "count": count}


def finish_metrics(sums: Mapping[str, float], regression: bool) -> dict[str, float]:
    """Metric sums -> SageMaker's metric names."""
    n = max(float(sums["count"]), 1.0)
    if regression:
        return {"mean_squared_error": float(sums["loss"]) / n}
    ce = float(sums["loss"]) / n
    return {"cross_entropy": ce, "accuracy": float(sums["correct"]) / n}


# --------------------------------------------------------------------------- steps

def init_opt_state(tx: optax.GradientTransformation, params: Params) -> dict[str, Any]:
    """The optimizer state: one for the dense parameters, one per token table (the
    row_sparse step updates tables row by row)."""
    rest, tables = _split_tables(params)
    return {"rest": tx.init(rest), "tables": {k: tx.init(t) for k, t in tables.items()}}


def _split_tables(params: Params) -> tuple[Params, dict[str, jax.Array]]:
    rest = {k: v for k, v in params.items() if k not in TABLES}
    tables = {k: params[k]["embedding"] for k in TABLES if k in params}
    return rest, tables


def _join_tables(rest: Params, tables: Mapping[str, jax.Array]) -> Params:
    return {**rest, **{k: {"embedding": t} for k, t in tables.items()}}


@dataclasses.dataclass(frozen=True)
class Steps:
    """The jitted functions of one training run (built once, cached per bucket shape)."""

    # (params, opt_state, in0, in1, labels, weights, root, step) -> (params, opt_state, sums);
    # the step's dropout key is fold_in(root, step), folded inside (one dispatch a step).
    train_step: Callable
    eval_step: Callable  # (params, in0, in1, labels, weights) -> sums
    init_opt: Callable  # params -> opt_state


# Rows per iteration of the lazy optimizer loop: a chunk's parameters, optimizer state and
# gradient (a few x 256 x D floats) stay in cache between their gather, the optax math
# and their scatter; 128 rows was ~10% slower, 512 no faster (benchmarks/RESULTS.md).
ROW_CHUNK = 256
# Below this many tokens a step, a table's gradient is a plain (cap, D) scatter-add buffer:
# gradient_plan's fixed costs (~0.1 ms of numpy, a (ROW_CHUNK, S) matmul) outweigh its gain
# on small batches. Measured: equal at 4,096 tokens; MovieLens (B 256, one token a side)
# 30% slower with the plan; Wikipedia (B 512, lengths 32 + 50) 25% faster.
PLAN_MIN_TOKENS = 4096


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
    loop ~3x slower than a gather of the same rows, and a (cap, D) buffer for it must be
    zeroed, filled and read back from memory; so the sums are formed in cache from gathers
    and one matmul instead. The rows are ordered by token count, most frequent first, and:

    * chunk 0 (the ROW_CHUNK most frequent rows: ~half the tokens of Zipf text, up to
      thousands per row) is ``hot @ per_token``, ``hot`` = token counts per (row, src);
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
    # One sort of unique int64 keys (numpy's SIMD sort; a stable argsort is ~10x slower):
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


# How device_rows finds a batch's distinct ids: "mark" sets a flag per id in a
# vocabulary-sized array and numbers the flags with a prefix sum (O(V + T), no sort);
# "sort" is jnp.unique (a device sort, O(T log T), launched through a custom call).
DEVICE_ROWS = "mark"


def device_rows(bags: list[jax.Array], vocab: int) -> tuple[jax.Array, jax.Array, list[jax.Array]]:
    """:meth:`_RowRemap._rows` computed inside the jitted step (the accelerator layout).

    Device work instead of host work per step, and one static row count per bucket
    shape: ``min(V, T + 1)`` (T = the bags' tokens), so a shape compiles once. Returns
    int32 (cap,) the sorted distinct ids (padding row 0 first) padded with V, V + 1, ...
    (out of range, and distinct, so the optimizer's scatters may promise unique indices:
    no atomics on a GPU), int32 () their count, and ``bags`` as positions in that list.
    Ids must be in [0, V) (channels are checked when read).
    """
    flat = jnp.concatenate([jnp.zeros(1, jnp.int32)] + [b.ravel().astype(jnp.int32) for b in bags])
    cap = min(vocab, flat.size)
    if DEVICE_ROWS == "sort":
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


def table_bags(tied: bool, in0, in1) -> dict[str, tuple[list, int]]:
    """Token table name -> (the id arrays reading it, the side whose vocab it has)."""
    return ({"embed0": ([in0, in1], 0)} if tied
            else {"embed0": ([in0], 0), "embed1": ([in1], 1)})


class _RowRemap:
    """The lazy row_sparse train step: each table's rows found on the host, then the jitted step.

    For each token table, the distinct ids the batch reads (plus row 0, padding) are
    found on the host and padded with the out-of-range id V to :func:`row_cap` of their
    count. A table read by pooled encoders with at least PLAN_MIN_TOKENS tokens a step
    gets a :func:`gradient_plan` (rows by frequency, and how to sum their gradient);
    other tables get the ids sorted, row 0 first, found with a vocabulary-sized mark
    array (O(V + B*L), no sort), and in0/in1 as positions in that list. Doing this on
    the host keeps sorts out of the compiled step and lets the optimizer loop scale with
    the ids a batch really has (Zipf text: ~0.35 B*L) instead of B*L. The price: a
    bucket shape compiles once per row_cap size its batches reach (two or three on Zipf
    text).
    """

    def __init__(self, config: Config, step: Callable, pooled: bool):
        self.step = step
        self.tied = config.tied_token_embedding_weight
        self.vocab = (config.enc0.vocab_size, config.enc1.vocab_size)
        self.pooled = pooled

    def _cache_size(self) -> int:
        return self.step._cache_size()

    def _rows(self, ids: list[np.ndarray], side: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """int32 (cap,) sorted distinct ids padded with V, int32 () their count, and
        ``ids`` as positions in that list."""
        vocab = self.vocab[side]
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

    def __call__(self, params, opt_state, in0, in1, labels, weights, root, step):
        in0, in1 = np.asarray(in0), np.asarray(in1)
        rows, counts, plans, remapped = {}, {}, {}, {}
        for name, (bags, side) in table_bags(self.tied, in0, in1).items():
            if self.pooled and sum(b.size for b in bags) >= PLAN_MIN_TOKENS:
                rows[name], counts[name], *plans[name] = gradient_plan(bags, self.vocab[side])
            else:
                rows[name], counts[name], remapped[name] = self._rows(bags, side)
        return self.step(params, opt_state, rows, counts, plans, remapped, in0, in1, labels,
                         weights, root, step)


def build_steps(graphdef: Any, config: Config, keep: Mapping[str, jax.Array], *,
                native_rows: bool = True) -> Steps:
    """Build the jitted train and eval steps.

    Args:
      graphdef: the model's static structure (``split_params``).
      config: the resolved configuration.
      keep: table name -> float32 (V, 1), 0 for frozen pretrained rows, 1 elsewhere;
        updates are multiplied by it so frozen rows never move (also under weight decay).
      native_rows: False writes the CPU row_sparse loop's rows back with XLA's scatter
        instead of the native kernel (:mod:`o2v_jax.native`; same results, slower), for
        comparisons.
    """
    tx = make_optimizer(config)
    regression = config.is_regression
    # On an accelerator the lazy update runs in one shot over all of a batch's rows (a
    # loop iteration costs a launch and a host round trip there) and no gradient_plan is
    # made; on CPU, ROW_CHUNK-row chunks that stay in cache. encoders.layout() decides.
    one_shot = layout() == "accelerator"
    tied = config.tied_token_embedding_weight
    if config.row_sparse and not one_shot and native_rows:
        native.available()  # build or load the row write-back now, not inside the first step

    def loss_fn(params, in0, in1, labels, weights, key):
        output, _ = merge_params(graphdef, params)(in0, in1, dropout_key=key)
        return objective(output, labels, weights, regression)

    def dense_step(params, opt_state, in0, in1, labels, weights, root, step):
        key = jax.random.fold_in(root, step)
        (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, in0, in1, labels, weights, key)
        rest, tables = _split_tables(params)
        g_rest, g_tables = _split_tables(grads)
        up_rest, st_rest = tx.update(g_rest, opt_state["rest"], rest)
        new_tables, st_tables = {}, {}
        for name, table in tables.items():
            up, st_tables[name] = tx.update(g_tables[name], opt_state["tables"][name], table)
            if name in keep:
                up = up * keep[name]
            new_tables[name] = table + up
        params = _join_tables(optax.apply_updates(rest, up_rest), new_tables)
        return params, {"rest": st_rest, "tables": st_tables}, sums

    pooled = all(enc.network == "pooled_embedding" for enc in config.encoders)

    def pooled_loss_fn(rest, u, v, tables, labels, weights, key):
        # The model from its encodings on: model.encode's output dropout (sites 0 and 1,
        # model.py) then model.head. Differentiating w.r.t. the pooled vectors (B, D)
        # instead of the gathered table lets the table gradient be summed from (B, D)
        # per-row gradients of both sides at once rather than from one (U, D) buffer per
        # side. tests/test_train.py checks this equals the dense step.
        model = merge_params(graphdef, _join_tables(rest, tables))  # tables: unused
        site = (lambda i: None) if key is None else (lambda i: jax.random.fold_in(key, i))
        u, v = dropout(u, config.dropout, site(0)), dropout(v, config.dropout, site(1))
        output, _ = model.head(u, v, dropout_key=key)
        return objective(output, labels, weights, regression)

    def sparse_grads(rest, tables, rows, plans, remapped, in0, in1, labels, weights, key):
        """(sums, grads of rest, per table: chunk -> its rows' gradient, (ROW_CHUNK, D))."""
        def sliced(g):  # chunks of a (cap, D) gradient buffer (all of it in one shot)
            if one_shot:
                return lambda c: g
            return lambda c: jax.lax.dynamic_slice_in_dim(g, c * ROW_CHUNK, ROW_CHUNK)

        if not pooled:  # through the model, on gathered tables and remapped ids
            in0s, in1s = remapped["embed0"] if tied else (*remapped["embed0"], *remapped["embed1"])
            sub = {name: t.at[rows[name]].get(mode="clip") for name, t in tables.items()}
            (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                _join_tables(rest, sub), in0s, in1s, labels, weights, key)
            g_rest, g_sub = _split_tables(grads)
            return sums, g_rest, {name: sliced(g) for name, g in g_sub.items()}
        # Pooled encoders read the full tables by id (no gathered copy). Each real token
        # of batch row b adds g[b] / count[b] to its table row. With a gradient_plan
        # those sums are formed per chunk inside the optimizer loop (no (cap, D) buffer
        # is zeroed, scattered into and read back); else they are scatter-added into one.
        t0 = tables["embed0"]
        t1 = t0 if tied else tables["embed1"]
        u, v = embedding_bag_mean(t0, in0), embedding_bag_mean(t1, in1)
        (_, sums), (g_rest, g_u, g_v) = jax.value_and_grad(pooled_loss_fn, argnums=(0, 1, 2), has_aux=True)(
            rest, u, v, tables, labels, weights, key)
        per_bag = ({"embed0": [(in0, g_u), (in1, g_v)]} if tied
                   else {"embed0": [(in0, g_u)], "embed1": [(in1, g_v)]})
        grads = {}
        for name, parts in per_bag.items():
            if name not in plans:  # a small batch: its ids remapped to positions in `rows`
                grads[name] = sliced(embedding_bag_mean_grad(
                    rows[name].shape[0], [(ids, g) for ids, (_, g) in zip(remapped[name], parts)]))
                continue
            hot, levels, level_starts = plans[name]
            per = jnp.concatenate([g / bag_counts(ids, g.dtype) for ids, g in parts])  # (S, D)
            per = jnp.concatenate([per, jnp.zeros_like(per[:1]), hot @ per])  # see gradient_plan
            grads[name] = (lambda c, per=per, levels=levels, level_starts=level_starts:
                           chunk_gradient(per, levels, level_starts, c))
        return sums, g_rest, grads

    def lazy_update(name, table, state, rows, count, chunk_grad):
        """The optax update of only the rows ``rows[:count]`` of a table and its state.

        ``chunk_grad(i)`` gives the gradient of rows ``rows[i * ROW_CHUNK:][:ROW_CHUNK]``.

        A loop over ROW_CHUNK-row chunks: gather the chunk's parameters and optimizer
        state, run ``tx.update`` on them, scatter both back. Chunks keep the work in
        cache (one read and one write of each touched row), and the loop stops after the
        last real row, so the padding of ``rows`` costs nothing here. Padding ids are V:
        gathered with clipping (harmless garbage), dropped by the scatters. With
        ``one_shot`` (accelerators) the body runs once on all of ``rows``, padding
        included, and ``chunk_grad(0)`` is the whole (cap, D) gradient.
        """
        vocab = table.shape[0]
        per_row = lambda x: x.ndim > 0 and x.shape[0] == vocab  # noqa: E731 - state leaves of table shape
        mask = keep.get(name)
        # One shot: device_rows' ids are sorted and distinct (padding too), so the
        # scatters need no atomics. Chunks: host rows repeat V as padding.
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

    def sparse_step(params, opt_state, rows, counts, plans, remapped, in0, in1, labels, weights,
                    root, step):
        # Lazy row-wise updates (MXNet's row_sparse + lazy_update): only the rows this
        # batch reads, and their optimizer state, are updated; the rest never change.
        # `rows`, `counts` and per table a gradient plan or the ids remapped to
        # positions in `rows` come from the host (`_RowRemap`).
        rest, tables = _split_tables(params)
        sums, g_rest, g_tables = sparse_grads(rest, tables, rows, plans, remapped, in0, in1,
                                              labels, weights, jax.random.fold_in(root, step))
        up_rest, st_rest = tx.update(g_rest, opt_state["rest"], rest)
        new_tables, st_tables = {}, {}
        for name, table in tables.items():
            new_tables[name], st_tables[name] = lazy_update(
                name, table, opt_state["tables"][name], rows[name], counts[name], g_tables[name])
        params = _join_tables(optax.apply_updates(rest, up_rest), new_tables)
        return params, {"rest": st_rest, "tables": st_tables}, sums

    def eval_step(params, in0, in1, labels, weights):
        return loss_fn(params, in0, in1, labels, weights, None)[1]

    if config.row_sparse:
        if one_shot:  # rows found on the device: no host work per step
            vocab = (config.enc0.vocab_size, config.enc1.vocab_size)

            def device_sparse_step(params, opt_state, in0, in1, labels, weights, root, step):
                rows, counts, remapped = {}, {}, {}
                for name, (bags, side) in table_bags(tied, in0, in1).items():
                    rows[name], counts[name], remapped[name] = device_rows(bags, vocab[side])
                return sparse_step(params, opt_state, rows, counts, {}, remapped, in0, in1,
                                   labels, weights, root, step)

            train_step = jax.jit(device_sparse_step, donate_argnums=(0, 1))
        else:
            train_step = _RowRemap(config, jax.jit(sparse_step, donate_argnums=(0, 1)), pooled)
    else:
        train_step = jax.jit(dense_step, donate_argnums=(0, 1))
    return Steps(
        train_step=train_step,
        eval_step=jax.jit(eval_step),
        init_opt=jax.jit(functools.partial(init_opt_state, tx)),
    )


def stage_batch(batch: Batch, step: int = 0) -> tuple[Batch, int, Any]:
    """``(batch, real rows, step)`` as the train step takes them; ``step`` (the global step
    number, which the step folds into its dropout key) as an int32 scalar. On an
    accelerator all five arrays are copied to the device in one call (the row count is
    taken first, on the host, so counting never waits for the device). Feed a step staged
    batches only: jit keys its cache on numpy vs JAX array inputs too, so mixing them
    compiles each shape twice."""
    real = int(batch.weights.sum())
    step = np.int32(step)
    if layout() == "accelerator":
        *arrays, step = jax.device_put((batch.in0, batch.in1, batch.labels, batch.weights, step))
        batch = Batch(*arrays)
    return batch, real, step


def staged(batch_iter: Iterator[Batch], first_step: int = 0) -> Iterator[tuple[Batch, int, Any]]:
    """:func:`stage_batch` of each of ``batch_iter``, numbered from ``first_step``; on an
    accelerator built ahead on a worker thread (:func:`buckets.prefetch`) so host batching
    and copies overlap the steps (1.64x on an H200). The main thread then only dispatches
    steps: on an H100's host a dispatch costs ~0.4 ms, and a separate jitted fold_in for
    the key cost another 0.1 ms a step, so the key is folded inside the step. On CPU the
    steps keep both cores busy and the thread only competes with the host's per-step row
    plans for the GIL (~6% slower, measured), so there batches are made inline."""
    numbered = ((batch, first_step + i) for i, batch in enumerate(batch_iter))
    if layout() != "accelerator":
        return itertools.starmap(stage_batch, numbered)
    return prefetch(numbered, depth=2, transform=lambda item: stage_batch(*item))


# --------------------------------------------------------------------------- early stopping

@dataclasses.dataclass
class EarlyStopping:
    """SageMaker's early stopping, reconstructed from its log (spec §4.8).

    No check until ``patience`` epochs are done. Then an epoch is *good* only if its loss
    is below the minimum of the previous ``patience`` losses by at least ``tolerance``; a
    good epoch resets the bad count, a bad one increments it; training stops when the bad
    count exceeds ``patience``. The best epoch is the one with the lowest loss.
    """

    patience: int
    tolerance: float
    losses: list[float] = dataclasses.field(default_factory=list)
    bad: int = 0

    def update(self, loss: float) -> bool:
        """Record an epoch's validation loss; True when training should stop."""
        if len(self.losses) >= self.patience:
            window = self.losses[-self.patience:]
            if min(window) - loss >= self.tolerance:
                self.bad = 0
            else:
                self.bad += 1
        self.losses.append(loss)
        return self.bad > self.patience

    @property
    def best_epoch(self) -> int:
        return int(np.argmin(self.losses))


# --------------------------------------------------------------------------- metric lines

def quality_line(host: str, channel: str, name: str, value: float, epoch: int | None = None) -> str:
    """A ``#quality_metric`` line exactly as SageMaker's HPO regexes expect (spec §6.1)."""
    kind = "score" if name == "accuracy" else "loss"
    where = f"epoch={epoch}, " if epoch is not None else ""
    return f"#quality_metric: host={host}, {where}{channel} {name} <{kind}>={value!r}"


# --------------------------------------------------------------------------- the loop

@dataclasses.dataclass
class TrainResult:
    model_dir: Path
    epochs_run: int
    best_epoch: int  # epoch whose parameters were kept
    history: list[dict[str, Any]]  # per epoch: train_*, validation_*, seconds, records_per_second
    test_metrics: dict[str, float] | None
    stopped_early: bool


def init_params(config: Config, seed: int, pretrained: tuple[Pretrained | None, Pretrained | None]):
    """Build the model, then copy pretrained rows over the default init.

    Returns (graphdef, params, keep) where keep maps a table name to its (V, 1) update
    mask (0 for frozen pretrained rows).
    """
    init_key = jax.random.fold_in(jax.random.key(seed), 0)
    graphdef, _ = abstract_model(config)
    # Initialising under jit compiles all initialisers as one program (seconds faster
    # than running them eagerly one by one).
    params = jax.jit(lambda key: split_params(Object2Vec(config, rngs=nnx_rngs(key)))[1])(init_key)
    keep: dict[str, jax.Array] = {}
    sides = [("embed0", 0)] if config.tied_token_embedding_weight else [("embed0", 0), ("embed1", 1)]
    for name, side in sides:
        pre = pretrained[side]
        if pre is None:
            continue
        table = params[name]["embedding"]
        found = jnp.asarray(pre.found)[:, None]
        params[name]["embedding"] = jnp.where(found, jnp.asarray(pre.vectors, table.dtype), table)
        if config.encoders[side].freeze_pretrained_embedding:
            keep[name] = jnp.where(found, 0.0, 1.0).astype(table.dtype)
    return graphdef, params, keep


def evaluate_params(steps: Steps, params: Params, data: PairData, config: Config) -> dict[str, float]:
    """Metrics of `params` on a labelled dataset (fill rows excluded)."""
    parts = [steps.eval_step(params, b.in0, b.in1, b.labels, b.weights)
             for b in batches(data, config, shuffle_seed=None)]
    sums = {k: float(sum(np.asarray(p[k]) for p in parts)) for k in ("loss", "correct", "count")}
    return finish_metrics(sums, config.is_regression)


def _epoch_seed(seed: int, epoch: int, stream: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0])


def epoch_batches(train_data: PairData, config: Config, seed: int,
                  epoch: int) -> tuple[int, Iterator[Batch]]:
    """One training epoch's host work: ``(records, batches)``, the channel plus this
    epoch's negatives (:func:`~o2v_jax.data.negative_pairs`, when the config samples
    them), batched in this epoch's shuffled order. Depends only on (seed, epoch)."""
    data = train_data
    if config.negative_sampling_rate > 0:
        rng = np.random.default_rng(_epoch_seed(seed, epoch, 1))
        data = negative_pairs(train_data, config.negative_sampling_rate, rng)
    return len(data), batches(data, config, shuffle_seed=_epoch_seed(seed, epoch, 0))


def _progress(total: int, desc: str, enabled: bool | None):
    from tqdm import tqdm

    disable = not sys.stderr.isatty() if enabled is None else not enabled
    return tqdm(total=total, desc=desc, unit="rec", unit_scale=True, leave=False,
                disable=disable, dynamic_ncols=True)


def train(
    config: Config,
    train_data: PairData,
    *,
    model_dir: str | Path,
    validation: PairData | None = None,
    test: PairData | None = None,
    pretrained: tuple[Pretrained | None, Pretrained | None] = (None, None),
    seed: int = 0,
    resume: bool = False,
    host: str = "algo-1",
    emit: Callable[[str], None] = functools.partial(print, flush=True),  # lines reach a pipe as written
    progress: bool | None = None,
    stop_after_epochs: int | None = None,
) -> TrainResult:
    """Train an Object2Vec model and save the kept parameters to ``model_dir``.

    With a validation channel, early stopping (spec §4.8) watches the validation loss and
    the best epoch's parameters are kept; without one, all epochs run and the last is kept.
    The test channel, if given, is scored once with the kept parameters. After each
    epoch the full training state is checkpointed under ``model_dir/training`` so
    ``resume=True`` continues an interrupted run with the same result.

    ``stop_after_epochs`` ends the run early after that many epochs *without* finishing it
    (it simulates an interruption for tests and for time-boxed runs).
    """
    model_dir = Path(model_dir)
    regression = config.is_regression
    graphdef, params, keep = init_params(config, seed, pretrained)
    opt_state = jax.jit(functools.partial(init_opt_state, make_optimizer(config)))(params)
    dropout_root = jax.random.fold_in(jax.random.key(seed), 1)
    stopper = EarlyStopping(config.early_stopping_patience, config.early_stopping_tolerance)
    history: list[dict[str, Any]] = []
    best_params: Params | None = None
    start_epoch, global_step = 0, 0

    if resume:
        def target(info: dict[str, Any]) -> dict[str, Any]:
            # The frozen-row masks are part of the state (so resuming needs no auxiliary
            # channel); states saved before they were have no "frozen_tables".
            saved_keep = {name: np.ones((params[name]["embedding"].shape[0], 1), np.float32)
                          for name in info.get("frozen_tables", ())}
            return {"params": params, "opt_state": opt_state,
                    "best": params if validation is not None else {},
                    **({"keep": saved_keep} if "frozen_tables" in info else {})}

        restored = checkpoint.load_training_state(model_dir, target)
        if restored is None:
            log.warning("--resume: no training state in %s; starting from epoch 0", model_dir)
        else:
            state, info = restored
            if info["hyperparameters"] != config.to_hyperparameters() or info["seed"] != seed:
                raise checkpoint.ModelDirError(
                    f"{model_dir}: the saved training state was made with other "
                    f"hyperparameters or seed; resume needs the same ones")
            params, opt_state = state["params"], state["opt_state"]
            if "keep" in state:
                keep = {name: jnp.asarray(mask) for name, mask in state["keep"].items()}
            elif any(enc.pretrained_embedding_file for enc in config.encoders) and not any(
                    p is not None for p in pretrained):
                raise checkpoint.ModelDirError(
                    f"{model_dir}: this training state predates saved frozen-row masks; "
                    f"resume it with the auxiliary channel it was trained with")
            best_params = state["best"] if validation is not None else None
            start_epoch, global_step = info["epoch"] + 1, info["global_step"]
            history = info["history"]
            stopper = EarlyStopping(config.early_stopping_patience, config.early_stopping_tolerance,
                                    losses=info["losses"], bad=info["bad"])
            log.info("Resuming from epoch %d (global step %d)", start_epoch, global_step)

    steps = build_steps(graphdef, config, keep)

    stopped_early = False
    epochs_done = start_epoch
    for epoch in range(start_epoch, config.epochs):
        if stop_after_epochs is not None and epoch - start_epoch >= stop_after_epochs:
            return TrainResult(model_dir, epoch, -1, history, None, False)
        t0 = time.perf_counter()
        records, epoch_iter = epoch_batches(train_data, config, seed, epoch)
        parts = []
        with _progress(records, f"epoch {epoch}", progress) as bar:
            for batch, real, step in staged(epoch_iter, global_step):
                params, opt_state, sums = steps.train_step(
                    params, opt_state, batch.in0, batch.in1, batch.labels, batch.weights,
                    dropout_root, step)
                parts.append(sums)
                global_step += 1
                bar.update(real)
        parts = jax.device_get(parts)  # one batched copy, not a round trip per step
        totals = {k: float(np.sum([p[k] for p in parts])) for k in ("loss", "correct", "count")}
        seconds = time.perf_counter() - t0
        train_metrics = finish_metrics(totals, regression)
        record: dict[str, Any] = {"epoch": epoch, "seconds": seconds,
                                  "records_per_second": totals["count"] / max(seconds, 1e-9),
                                  **{f"train_{k}": v for k, v in train_metrics.items()}}
        for name, value in train_metrics.items():
            emit(quality_line(host, "train", name, value, epoch))
        stop = False
        if validation is not None:
            val_metrics = evaluate_params(steps, params, validation, config)
            record.update({f"validation_{k}": v for k, v in val_metrics.items()})
            for name, value in val_metrics.items():
                emit(quality_line(host, "validation", name, value, epoch))
            stop = stopper.update(val_metrics[config.validation_metric])
            if stopper.best_epoch == epoch:
                best_params = jax.tree.map(np.array, params)
        history.append(record)
        emit(f"#progress_metric: host={host}, completed {100.0 * (epoch + 1) / config.epochs} % of epochs")
        emit(f"#throughput_metric: host={host}, train throughput={record['records_per_second']:.2f} records/second")
        epochs_done = epoch + 1
        checkpoint.save_training_state(
            model_dir,
            {"params": params, "opt_state": opt_state,
             "best": best_params if validation is not None else {}, "keep": keep},
            {"epoch": epoch, "global_step": global_step, "history": history, "seed": seed,
             "frozen_tables": sorted(keep),
             "losses": stopper.losses, "bad": stopper.bad,
             "hyperparameters": config.to_hyperparameters()})
        if stop:
            emit("Bad epochs exceeded patience. Stopping training early!")
            stopped_early = True
            break

    if validation is not None and best_params is not None:
        best_epoch = stopper.best_epoch
        emit(f"Best model based on epoch {best_epoch}. Best loss: {stopper.losses[best_epoch]:.3f}")
        params = jax.tree.map(jnp.asarray, best_params)
    else:
        best_epoch = epochs_done - 1
    test_metrics = None
    if test is not None:
        test_metrics = evaluate_params(steps, params, test, config)
        for name, value in test_metrics.items():
            emit(quality_line(host, "test", name, value))
    metadata = {
        "best_epoch": best_epoch, "epochs_run": epochs_done, "stopped_early": stopped_early,
        "seed": seed, "history": history, "test_metrics": test_metrics,
        "num_records": {"train": len(train_data),
                        "validation": len(validation) if validation is not None else 0,
                        "test": len(test) if test is not None else 0},
    }
    checkpoint.save_model(model_dir, hyperparameters=config.to_hyperparameters(),
                          params=params, metadata=metadata)
    checkpoint.clear_training_state(model_dir)
    return TrainResult(model_dir, epochs_done, best_epoch, history, test_metrics, stopped_early)


def load_for_evaluation(model_dir: str | Path) -> tuple[Config, Steps, Params]:
    """Rebuild a saved model's config, jitted steps and parameters."""
    config, _ = checkpoint.read_config(model_dir)
    graphdef, params, _ = init_params(config, 0, (None, None))
    _, params, _ = checkpoint.load_model(model_dir, target=jax.tree.map(np.asarray, params))
    params = jax.tree.map(jnp.asarray, params)
    return config, build_steps(graphdef, config, {}), params


def evaluate(model_dir: str | Path, data_path: str | Path) -> dict[str, float]:
    """Metrics of a saved model on a labelled JSON Lines file or directory."""
    from o2v_jax.data import read_channel

    config, steps, params = load_for_evaluation(model_dir)
    data = read_channel(data_path, config, name="evaluation")
    return evaluate_params(steps, params, data, config)
