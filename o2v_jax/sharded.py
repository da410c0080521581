"""Train and eval steps over a device mesh: data parallel, token tables sharded by rows.

The one-device steps (training.py, row_sparse.py) read whole tables. Here a table is split
by rows over the devices (:mod:`o2v_jax.mesh`), so a step never reads it whole:

1. on the host, every process finds the same sorted list R of the rows the global batch
   reads (:func:`batch_rows`; row 0 first, padded with V to ``row_sparse.row_cap``) and
   rewrites the batch's ids as positions in R. Each process feeds its own rows of the
   batch (``P("data")``); R is replicated;
2. ``table.at[R]`` gathers those rows as one replicated (cap, D) array: under GSPMD each
   device gathers what it holds and one all-reduce of (cap, D) sums the parts;
3. the loss and its gradient run data parallel on the gathered rows (the model sees a
   small table and remapped ids): the (cap, D) gradient is one all-reduce, the dense
   parameters' gradients another each;
4. the table update, on each device's own rows only:

   * ``dense``: the (cap, D) gradient is scattered into a zero (V, D) gradient (each
     device writes its block's rows; no communication) and optax updates the whole
     table, as the one-device step does;
   * ``row_sparse``: under ``jax.shard_map`` each device takes the part of R inside its
     block (R is sorted, so that is one contiguous run), maps it to local ids
     ``R - axis_index * V_local`` and runs the same row update as one device
     (``row_sparse.update_rows``: the chunk loop with the native write-back on CPU, one
     shot on an accelerator) on its shard. No collective moves a table or its state.

So the collectives of a step are all-reduces whose sizes depend on the batch (cap, B)
and the dense parameters, never on V (:func:`collectives` reads them from the compiled
program; tests and benchmarks/bench_distributed.py check it). No reduce-scatter is
emitted either: on CPU, gloo's reduce-scatter gives up after ~30 s when a process comes
late (jax issue #40831).

What it costs against one device: every step compiles per (bucket shape, row cap), as
the CPU row_sparse step does, and the host finds the rows of every batch (also for
``dense``); the CPU ``gradient_plan`` of long pooled bags is not used (the gradient is
one (cap, D) scatter-add, slower for Wikipedia-sized bags on CPU); each device updates
only its share of R. Results equal one device's to float rounding: the gradient's
partial sums are added in another order (tolerances in docs/distributed.md).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from o2v_jax import native
from o2v_jax.buckets import Batch
from o2v_jax.config import Config
from o2v_jax.mesh import AXIS, BATCH, REPLICATED, ROWS, Placement
from o2v_jax.model import join_tables, split_tables
from o2v_jax.objectives import PairLoss, loss_for
from o2v_jax.row_sparse import ROW_CHUNK, host_rows, row_cap, table_bags, update_rows

# The model's code shape on a mesh, whatever the platform (o2v_jax.kernels): its bag
# gradient is one scatter per table, which GSPMD turns into one (cap, D) all-reduce. In
# the CPU shape every position's scatter into the replicated (cap, D) gradient would be
# an all-reduce of its own, L of them a side.
MODEL_LAYOUT = "accelerator"
# Above this many table rows per batch token, the rows are found by sorting the batch's
# ids (O(T log T)) instead of marking a vocabulary-sized array (O(V)): the host work per
# step then never grows with V either.
_MARK_MAX_ROWS_PER_TOKEN = 8


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MeshBatch:
    """A batch as the mesh steps take it: ids rewritten as positions in each table's rows.

    ``batch``: in0/in1 as positions (B, L), labels, weights, all split by rows;
    ``rows``: table group -> int32 (cap,) the sorted rows it reads, padded with V;
    ``count``: table group -> int32 () how many of them are real. Both replicated.
    """

    batch: Batch
    rows: dict[str, Any]
    count: dict[str, Any]


def batch_rows(ids: list[np.ndarray], vocab: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """``row_sparse.host_rows``, for any V: the sorted distinct ids of ``ids`` (row 0
    first) padded with V to ``row_cap``, their count, and ``ids`` as positions in them."""
    tokens = sum(a.size for a in ids)
    if vocab <= _MARK_MAX_ROWS_PER_TOKEN * (tokens + 1):
        return host_rows(ids, vocab)
    flat = np.concatenate([np.zeros(1, np.int32)] + [a.ravel() for a in ids])
    rows, inverse = np.unique(flat, return_inverse=True)
    padded = np.full(row_cap(rows.size, min(vocab, tokens + 1)), vocab, np.int32)
    padded[:rows.size] = rows
    remapped, start = [], 1
    for a in ids:
        remapped.append(inverse[start:start + a.size].reshape(a.shape).astype(np.int32))
        start += a.size
    return padded, np.int32(rows.size), remapped


def plan(batch: Batch, tied: bool, vocab: Mapping[str, int]) -> MeshBatch:
    """The host half of a mesh step (numpy, the same on every process)."""
    rows, count, sides = {}, {}, []
    for name, (bags, _) in table_bags(tied, batch.in0, batch.in1).items():
        rows[name], count[name], remapped = batch_rows(bags, vocab[name])
        sides += remapped  # table_bags lists embed0's bags first: in0 (and in1 when tied)
    return MeshBatch(Batch(sides[0], sides[1], batch.labels, batch.weights), rows, count)


def _gathered(params, mb: MeshBatch):
    """The params with each table replaced by its rows ``mb.rows`` (cap, D), replicated."""
    rest, tables = split_tables(params)
    return rest, {name: t.at[mb.rows[name]].get(mode="clip") for name, t in tables.items()}


def _dense_table(tx, table, state, rows, count, g, mask):
    slots = jnp.arange(rows.shape[0])
    idx = jnp.where(slots < count, rows, table.shape[0])  # padding slots dropped
    grad = jnp.zeros_like(table).at[idx].add(g, mode="drop")
    up, state = tx.update(grad, state, table)
    if mask is not None:
        up = up * mask
    return table + up, state


def _local_rows(tx, one_shot, native_rows, table, state, mask, rows, count, g):
    """Inside shard_map: update the rows of R that fall in this device's block."""
    v_local, cap = table.shape[0], rows.shape[0]
    base = jax.lax.axis_index(AXIS).astype(jnp.int32) * v_local
    slots = jnp.arange(cap, dtype=jnp.int32)
    real = slots < count
    first = jnp.sum(real & (rows < base), dtype=jnp.int32)  # R is sorted: the block is one run
    n = jnp.sum(real & (rows >= base) & (rows < base + v_local), dtype=jnp.int32)
    pos = jnp.minimum(first + slots, cap - 1)
    # Distinct out-of-block ids past the real ones keep the list sorted and unique.
    local = jnp.where(slots < n, rows[pos] - base, v_local + slots)
    if one_shot:
        chunk_grad = lambda c: g[pos]  # noqa: E731
    else:
        chunk_grad = lambda c: g.at[jnp.minimum(  # noqa: E731
            first + c * ROW_CHUNK + jnp.arange(ROW_CHUNK), cap - 1)].get()
    return update_rows(tx, table, state, local, n, chunk_grad, mask.get("keep"),
                       one_shot=one_shot, native_rows=native_rows)


def _lazy_table(placement, tx, one_shot, native_rows, table, state, rows, count, g, mask):
    state_specs = jax.tree.map(lambda x: ROWS if x.ndim else REPLICATED, state)
    masks = {} if mask is None else {"keep": mask}
    update = jax.shard_map(
        functools.partial(_local_rows, tx, one_shot, native_rows), mesh=placement.mesh,
        in_specs=(ROWS, state_specs, jax.tree.map(lambda _: ROWS, masks), REPLICATED,
                  REPLICATED, REPLICATED),
        out_specs=(ROWS, state_specs),
        # The native write-back is a custom call inside platform_dependent, whose
        # branches the varying-axes check cannot type; every output is laid out as
        # out_specs says (tables by rows, scalar state replicated).
        check_vma=False)
    return update(table, state, masks, rows, count, g)


def _train_step(loss: PairLoss, tx, row_sparse_update: bool, one_shot: bool, native_rows: bool,
                placement: Placement, state, mb: MeshBatch, root, keep):
    from o2v_jax.training import TrainState

    key = jax.random.fold_in(root, state.step)
    rest, sub = _gathered(state.params, mb)
    (_, sums), (g_rest, g_sub) = jax.value_and_grad(
        lambda r, s: loss(join_tables(r, s), mb.batch, key), argnums=(0, 1), has_aux=True)(rest, sub)
    up_rest, st_rest = tx.update(g_rest, state.opt_state["rest"], rest)
    tables, states = {}, {}
    for name, table in split_tables(state.params)[1].items():
        args = (table, state.opt_state["tables"][name], mb.rows[name], mb.count[name], g_sub[name],
                keep.get(name))
        if row_sparse_update:
            tables[name], states[name] = _lazy_table(placement, tx, one_shot, native_rows, *args)
        else:
            tables[name], states[name] = _dense_table(tx, *args)
    params = join_tables(optax.apply_updates(rest, up_rest), tables)
    return TrainState(params, {"rest": st_rest, "tables": states}, state.step + 1), sums


def _eval_step(loss: PairLoss, params, mb: MeshBatch):
    rest, sub = _gathered(params, mb)
    return loss(join_tables(rest, sub), mb.batch, None)[1]


class MeshSteps:
    """train.Steps for a mesh: ``train_step(state, batch, root)`` and
    ``eval_step(params, batch)`` take host batches (``buckets.Batch``), plan their rows
    and feed each process's part themselves.

    ``graphdef`` must be built with ``layout=MODEL_LAYOUT``. The row update per shard
    takes the platform's shape: ROW_CHUNK-row chunks with the native write-back on
    CPU, one shot elsewhere (row_sparse.update_rows).
    """

    def __init__(self, graphdef: Any, config: Config, keep: Mapping[str, jax.Array], *,
                 placement: Placement, native_rows: bool = True):
        from o2v_jax.training import make_optimizer

        self.placement = placement
        self.keep = dict(keep)
        self.tied = config.tied_token_embedding_weight
        loss = loss_for(graphdef, config, MODEL_LAYOUT)
        one_shot = placement.mesh.devices.flat[0].platform != "cpu"
        if config.row_sparse and not one_shot and native_rows:
            native.available()  # build or load the row write-back now, not in the first step
        self._train = functools.partial(_train_step, loss, make_optimizer(config),
                                        config.row_sparse, one_shot, native_rows, placement)
        self._train_jit: Callable | None = None
        self._eval_jit = jax.jit(functools.partial(_eval_step, loss),
                                 out_shardings=placement.sharding(REPLICATED))

    def feed(self, batch: Batch) -> MeshBatch:
        """Plan ``batch``'s rows on the host and put its arrays on the mesh."""
        p = self.placement
        mb = plan(p.pad_batch(batch), self.tied, p.vocab)
        specs = MeshBatch(Batch(BATCH, BATCH, BATCH, BATCH), {k: REPLICATED for k in mb.rows},
                          {k: REPLICATED for k in mb.count})
        return p.put_tree(mb, specs)

    def train_step(self, state, batch: Batch, root: jax.Array):
        if self._train_jit is None:  # the state's layout is the step's (jit alone may pick another)
            layout = jax.tree.map(lambda x: x.sharding, state)
            self._train_jit = jax.jit(self._train, donate_argnames="state", out_shardings=(
                layout, self.placement.sharding(REPLICATED)))
        return self._train_jit(state, self.feed(batch), root, self.keep)

    def eval_step(self, params, batch: Batch):
        return self._eval_jit(params, self.feed(batch))

    def lower(self, state, mb: MeshBatch, root):
        """The train step lowered for abstract inputs (ShapeDtypeStructs with shardings):
        what :func:`collectives` inspects without running a step."""
        layout = jax.tree.map(lambda x: x.sharding, state)
        return jax.jit(self._train, donate_argnames="state", out_shardings=(
            layout, self.placement.sharding(REPLICATED))).lower(state, mb, root, self.keep)


# --------------------------------------------------------------------------- HLO

def abstract_inputs(config: Config, placement: Placement, graphdef_params: Any, *,
                    lengths: tuple[int, int], cap: int):
    """``(state, batch, root)`` of a train step as ShapeDtypeStructs with their
    shardings: enough to lower and compile the step (:meth:`MeshSteps.lower`) for any V
    without allocating a table.

    Args:
      graphdef_params: ``model.abstract_model(config, layout)[1]``.
      lengths: the bucket's (L0, L1).
      cap: the row count of every table's row list.
    """
    from o2v_jax.training import TrainState, init_opt_state, make_optimizer

    def struct(shape, dtype, spec):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=placement.sharding(spec))

    params = jax.tree.map(lambda x: x, graphdef_params)
    for name in split_tables(params)[1]:
        v, d = params[name]["embedding"].shape
        params[name]["embedding"] = jax.ShapeDtypeStruct((placement.padded(v), d), jnp.float32)
    opt = jax.eval_shape(functools.partial(init_opt_state, make_optimizer(config)), params)
    specs = TrainState(placement.param_specs(params), placement.opt_specs(opt), REPLICATED)
    state = jax.tree.map(lambda x, spec: struct(x.shape, x.dtype, spec),
                         TrainState(params, opt, jax.ShapeDtypeStruct((), jnp.int32)), specs,
                         is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    rows = placement.batch_rows(config.mini_batch_size)
    batch = Batch(struct((rows, lengths[0]), jnp.int32, BATCH),
                  struct((rows, lengths[1]), jnp.int32, BATCH),
                  struct((rows,), jnp.float32, BATCH), struct((rows,), jnp.float32, BATCH))
    tables = split_tables(params)[1]
    mb = MeshBatch(batch, {k: struct((cap,), jnp.int32, REPLICATED) for k in tables},
                   {k: struct((), jnp.int32, REPLICATED) for k in tables})
    return state, mb, jax.random.key(0)



_COLLECTIVE = re.compile(
    r"=\s*(?P<shape>\(.*?\)|\S+)\s+(?P<op>all-reduce|all-gather|reduce-scatter|"
    r"collective-permute|all-to-all|ragged-all-to-all)(?:-start)?\(")
_ARRAY = re.compile(r"(pred|s8|u8|s16|u16|f16|bf16|s32|u32|f32|s64|u64|f64)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")


class Collective(NamedTuple):
    op: str  # "all-reduce", "all-gather", ...
    bytes: int  # of its result
    in_loop: bool  # inside a while loop: it runs once per iteration, not once per step


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective of a compiled HLO module (``compiled.as_text()``), with the
    bytes of its result and whether it sits in a loop body (then a static sum of the
    sizes undercounts a step)."""
    bodies: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = bodies.setdefault(header.group(1), [])
        elif current is not None:
            current.append(line)
    calls = {name: {ref for line in lines for ref in re.findall(r"%([\w.\-]+)", line)
                    if ref in bodies and ref != name} for name, lines in bodies.items()}
    looping = {ref for lines in bodies.values() for line in lines
               for ref in re.findall(r"(?:body|condition)=%?([\w.\-]+)", line)}
    todo = list(looping)
    while todo:
        for ref in calls.get(todo.pop(), ()):
            if ref not in looping:
                looping.add(ref)
                todo.append(ref)
    out = []
    for name, lines in bodies.items():
        for line in lines:
            m = _COLLECTIVE.search(line)
            if m:
                size = sum(_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
                           for dtype, dims in _ARRAY.findall(m.group("shape")))
                out.append(Collective(m.group("op"), size, name in looping))
    return out
