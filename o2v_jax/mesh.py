"""The device mesh of a data-parallel run: which devices, how each array is laid out on
them, and moving host arrays onto it and back (docs/distributed.md).

One 1-D mesh, axis ``"data"``, over the chosen devices of every process, each process's
devices next to each other. Its axis type is Auto, so ordinary jnp code runs unchanged
under GSPMD (with Explicit axes every gather from a sharded table needs an
``out_sharding``). The layout:

* batches: rows split over the devices (``P("data")``); ``mini_batch_size`` is padded
  with weight-0 fill rows to a multiple of the device count (fill rows never count);
* token tables, their optimizer state and their frozen-row masks: rows split over the
  devices (``P("data", None)``), V padded with zero rows to a multiple of the device
  count. No id reads a padding row, so it never gets a gradient and stays exactly zero
  (the checkpoint fingerprints rely on that: they are the same for any padding);
* everything else (encoders, head and their optimizer state, the step count, the row
  lists of a batch): replicated.

One process with one device never gets here: training.py's one-device path is unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from o2v_jax.buckets import Batch
from o2v_jax.config import Config
from o2v_jax.model import join_tables, split_tables, table_group

AXIS = "data"
ROWS = P(AXIS, None)  # a table, its optimizer state, its mask: split by rows
BATCH = P(AXIS)  # a batch's arrays: split by rows
REPLICATED = P()


def local_devices(per_process: int | None) -> list:
    """The first ``per_process`` devices of this process (all of them for None).

    Raises:
      ValueError: more devices asked for than the process has (names ``--devices``).
    """
    local = sorted(jax.local_devices(), key=lambda d: d.id)
    n = len(local) if per_process is None else per_process
    if not 1 <= n <= len(local):
        hint = (" (on CPU, JAX_NUM_CPU_DEVICES=N set before the run splits the CPU into N "
                "devices)" if local[0].platform == "cpu" else "")
        raise ValueError(f"--devices {n}: this process has {len(local)} local "
                         f"{local[0].platform} device(s){hint}")
    return local[:n]


def make_mesh(per_process: int | None) -> Mesh:
    """The 1-D ``"data"`` mesh over the first ``per_process`` devices of every process,
    process by process (so each process's batch rows are one contiguous block)."""
    n = len(local_devices(per_process))
    chosen = []
    for p in range(jax.process_count()):
        mine = sorted((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id)
        chosen += mine[:n]
    return Mesh(np.array(chosen), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a data-parallel run's arrays live (see the module docstring).

    Attributes:
      mesh: the 1-D ``"data"`` mesh.
      vocab: token table group -> its real row count V (the padded count is
        :meth:`padded`).
    """

    mesh: Mesh
    vocab: Mapping[str, int]

    @property
    def devices(self) -> int:
        return self.mesh.size

    @property
    def processes(self) -> int:
        return jax.process_count()

    @property
    def is_main(self) -> bool:
        """Process 0: the one that writes metric lines, manifests and the model."""
        return jax.process_index() == 0

    def describe(self) -> str:
        """``mesh: 4 devices (1 process x 4)``, for the log."""
        p = self.processes
        return (f"mesh: {self.devices} devices ({p} process{'es' if p > 1 else ''} x "
                f"{self.devices // p})")

    def sharding(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    def padded(self, rows: int) -> int:
        """``rows`` rounded up to a multiple of the device count."""
        return -(-rows // self.devices) * self.devices

    # ----------------------------------------------------------------- layouts

    def param_specs(self, params: Any) -> Any:
        """PartitionSpecs of a params tree: tables by rows, the rest replicated."""
        rest, tables = split_tables(params)
        return join_tables(jax.tree.map(lambda _: REPLICATED, rest),
                           {name: ROWS for name in tables})

    def opt_specs(self, opt_state: Any) -> Any:
        """PartitionSpecs of ``train.init_opt_state``'s tree: a table's state leaves
        (Adam's moments, Adagrad's sums) by rows, its scalars (step counts) and the
        dense parameters' state replicated."""
        return {"rest": jax.tree.map(lambda _: REPLICATED, opt_state["rest"]),
                "tables": jax.tree.map(lambda x: ROWS if np.ndim(x) else REPLICATED,
                                       opt_state["tables"])}

    def shardings(self, specs: Any) -> Any:
        return jax.tree.map(self.sharding, specs, is_leaf=lambda x: isinstance(x, P))

    # ----------------------------------------------------------------- host -> mesh

    def put(self, x: np.ndarray, spec: P) -> jax.Array:
        """A global array from ``x``, the same global value on every process; each
        process hands over only the rows its devices hold."""
        x = np.asarray(x)
        sharding = self.sharding(spec)
        if spec == REPLICATED or not x.ndim:
            return jax.make_array_from_process_local_data(sharding, x, x.shape)
        rows = sorted({idx[0].indices(x.shape[0])[:2]
                       for idx in sharding.addressable_devices_indices_map(x.shape).values()})
        lo, hi = rows[0][0], rows[-1][1]  # this process's devices are one block of the mesh
        return jax.make_array_from_process_local_data(sharding, x[lo:hi], x.shape)

    def put_tree(self, tree: Any, specs: Any) -> Any:
        return jax.tree.map(self.put, tree, specs, is_leaf=lambda x: isinstance(x, P))

    def pad_rows(self, x: np.ndarray, rows: int) -> np.ndarray:
        """``x`` with zero rows appended up to ``rows``."""
        x = np.asarray(x)
        if x.shape[0] == rows:
            return x
        return np.concatenate([x, np.zeros((rows - x.shape[0], *x.shape[1:]), x.dtype)])

    def place_params(self, params: Any) -> Any:
        """A one-device params tree (``training.init_params``) on the mesh, tables padded."""
        host = jax.tree.map(np.asarray, params)
        for name in split_tables(host)[1]:
            table = host[name]["embedding"]
            host[name]["embedding"] = self.pad_rows(table, self.padded(table.shape[0]))
        return self.put_tree(host, self.param_specs(host))

    def place_keep(self, keep: Mapping[str, Any]) -> dict[str, jax.Array]:
        """Frozen-row masks (V, 1) on the mesh; padding rows are 0 (frozen): they never move."""
        return {name: self.put(self.pad_rows(mask, self.padded(np.shape(mask)[0])), ROWS)
                for name, mask in keep.items()}

    def init_opt(self, init, params: Any) -> Any:
        """``init(params)`` (the optimizer state) laid out by :meth:`opt_specs`; jit alone
        would put Adam's table-sized moments on one device."""
        specs = self.opt_specs(jax.eval_shape(init, params))
        return jax.jit(init, out_shardings=self.shardings(specs))(params)

    def restore_target(self, tree: Any) -> Any:
        """What ``checkpoint.load_training_state`` restores into for this mesh:
        ShapeDtypeStructs with the arrays' shardings; numpy leaves (frozen-row masks
        built for the target) are laid out by rows, as their tables."""
        def struct(x):
            sharding = x.sharding if isinstance(x, jax.Array) else self.sharding(ROWS)
            return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

        return jax.tree.map(struct, tree)

    def scalar(self, value, dtype=jnp.int32) -> jax.Array:
        return self.put(np.asarray(value, dtype), REPLICATED)

    def batch_rows(self, rows: int) -> int:
        """The rows a batch of ``rows`` gets on the mesh: a multiple of the device count."""
        return self.padded(rows)

    def pad_batch(self, batch: Batch) -> Batch:
        """``batch`` with weight-0 fill rows up to :meth:`batch_rows` (host arrays)."""
        rows = self.batch_rows(batch.weights.shape[0])
        return Batch(*(self.pad_rows(a, rows) for a in (batch.in0, batch.in1, batch.labels,
                                                        batch.weights)))

    # ----------------------------------------------------------------- mesh -> host

    def snapshot(self, tree: Any) -> Any:
        """A copy of ``tree`` on the mesh, same layout (the best epoch's parameters; the
        train step donates the live ones)."""
        return jax.tree.map(lambda x: x.copy(), tree)

    def to_host(self, params: Any) -> Any:
        """A params tree as numpy on every process, tables cut back to V: what
        ``checkpoint.save_model`` writes. A collective when several processes run."""
        from jax.experimental import multihost_utils

        def gather(x):
            if x.is_fully_addressable or x.is_fully_replicated:
                return np.asarray(x)
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))

        host = jax.tree.map(gather, params)
        for name in split_tables(host)[1]:
            host[name]["embedding"] = host[name]["embedding"][:self.vocab[name]]
        return host


def for_training(config: Config, per_process: int | None) -> Placement | None:
    """The placement of a training run on ``per_process`` devices of each process (None:
    all local devices), or None for one process on one device (training.py's one-device
    path, unchanged)."""
    devices = local_devices(per_process)
    if len(devices) == 1 and jax.process_count() == 1:
        return None
    tied = config.tied_token_embedding_weight
    vocab = {table_group(side, tied): config.encoders[side].vocab_size for side in (0, 1)}
    return Placement(make_mesh(per_process), vocab)
