"""Inference: embed or score any number of sequences with ahead-of-time compiled buckets.

::

    >>> import o2v_jax
    >>> p = o2v_jax.load("runs/m1")          # reads INFERENCE_PREFERRED_MODE if set
    >>> p.warmup()                           # compile every bucket now (seconds)
    >>> p.embed([[6, 17, 606], [774, 14]], encoder="in0").shape
    (2, 512)
    >>> p.predict([[6, 17]], [[16, 21, 13]]).shape  # softmax probabilities
    (1, 2)

How a call runs: inputs become a :class:`~o2v_jax.ragged.Ragged` (ids range-checked, sequences
longer than max_seq_len truncated like training does), are sorted by length and cut into
batches whose shapes come from two small fixed sets, the model's length ladder
(``buckets.length_ladder``) and a batch-size ladder (``BATCH_SIZES``, capped so rows * L
stays within ``max_batch_tokens``). Each (B, L) shape has one executable compiled ahead of
time (``jax.jit(fn).lower(ShapeDtypeStruct...).compile()``); padding rows are all zero
and dropped; answers come back in the caller's order. ``predict`` encodes each side in
its own buckets and then runs ``model.head`` compiled once per batch size, so pairs
never need an (L0, L1) cross product. Large inputs are processed ``chunk_size``
sequences at a time, so the extra memory stays bounded. bilstm and hcnn sides gather
their first layer's per-token product from a table computed at load
(``model.token_projection``, up to ``PROJECTION_MAX_BYTES`` per side) instead of
multiplying every batch by the first kernel.

After :meth:`Predictor.warmup` no input of any length or count compiles anything
(tests/test_predictor.py counts compilations). docs/inference.md has the details.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from o2v_jax import checkpoint, runtime
from o2v_jax.buckets import batch_plan, length_ladder, pad_sequences
from o2v_jax.config import Config
from o2v_jax.env import DEFAULT_PREFERRED_MODE, PREFERRED_MODES, resolve_preferred_mode
from o2v_jax.model import (ENCODER_GROUPS, HEAD_GROUPS, TABLE_GROUPS, abstract_model,
                           merge_params, side_groups, table_group)
from o2v_jax.progress import bar as progress_bar
from o2v_jax.ragged import Ragged, count_input, from_input, slice_input

log = logging.getLogger("o2v_jax")

BATCH_SIZES = (1, 8, 64, 512)  # rows per call; each length bucket uses those that fit
MAX_BATCH_TOKENS = 32_768  # rows * L cap: bounds activation memory (B, L, D) per call
CHUNK_SIZE = 65_536  # sequences converted, padded and encoded at a time
ENCODERS = ("in0", "in1")
# bilstm and hcnn sides look up their first layer's product per token (model.
# token_projection) instead of multiplying every (B, L, D) batch by its kernel, when
# the table fits in this many bytes (Predictor._add_projections).
PROJECTION_MAX_BYTES = 256 << 20

Key = tuple  # ("encode", side, B, L) or ("head", B)


def _struct(tree: Any) -> Any:
    """ShapeDtypeStructs (with placement) for a tree of arrays."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                        tree)


# --------------------------------------------------------------------------- predictor

@dataclasses.dataclass(frozen=True)
class _Part:
    """Parameters one compiled function reads, and where they (and it) run."""

    params: dict  # top-level group name -> subtree of jax arrays, on `rows`' devices
    rows: jax.sharding.Sharding  # where a batch's rows go: one device, or split over several


class Predictor:
    """A loaded model that embeds and scores with ahead-of-time compiled buckets.

    Build it with :func:`load`. Thread-safe: executables are compiled under a lock and
    calls share nothing else that changes.

    Attributes:
        config: the model's Config.
        enc_dim: H, the embedding width.
        num_outputs: K, columns of :meth:`predict` (num_classes, or 1 for regression).
        vocab_sizes: (V0, V1).
        max_seq_lens: (max length in0, max length in1); longer input is truncated.
        ladders: per side, the padded lengths inputs are bucketed into.
        batch_sizes: the batch-size ladder.
        preferred_mode: "embedding" or "classification" (see :func:`load`).
        model_dir, metadata: where the model came from and what training recorded.
        history: the per-epoch training metrics (metadata's); :meth:`save` copies the
            model directory.
    """

    def __init__(self, config: Config, graphdef: Any, params: dict, *,
                 preferred_mode: str = DEFAULT_PREFERRED_MODE,
                 batch_sizes: Sequence[int] = BATCH_SIZES,
                 max_batch_tokens: int = MAX_BATCH_TOKENS,
                 chunk_size: int = CHUNK_SIZE,
                 model_dir: str | Path | None = None,
                 metadata: dict | None = None,
                 devices: Sequence[Any] | None = None):
        """Place the parameters and build (not yet compile) the functions.

        Args:
            config: the model's configuration.
            graphdef: the model's static structure (``model.abstract_model``).
            params: nested dict of arrays (``model.split_params``), on any device.
            preferred_mode: "embedding" keeps the head (comparator, MLP, output) on the
                host CPU and warms the encoders first; "classification" puts every
                parameter on the accelerator and warms the head first.
            batch_sizes: ascending batch-size ladder.
            max_batch_tokens: a length bucket L uses the sizes B with B * L <= this
                (always at least the smallest size).
            chunk_size: sequences handled at a time (bounds the extra memory).
            devices: devices the encoders run on, data parallel (None: the first
                device). With n of them every encoder batch is n times a ladder size,
                split by rows (each device runs the one-device shapes), the encoders'
                parameters copied to each; the head stays on one device.
        """
        sizes = tuple(int(b) for b in batch_sizes)
        if not sizes or list(sizes) != sorted(set(sizes)) or sizes[0] < 1:
            raise ValueError(f"batch_sizes must be distinct positive ints, ascending; got {batch_sizes}")
        if chunk_size < 1 or max_batch_tokens < 1:
            raise ValueError("chunk_size and max_batch_tokens must be >= 1")
        self.config = config
        self.preferred_mode = resolve_preferred_mode(preferred_mode)
        self.enc_dim = config.enc_dim
        self.num_outputs = config.num_outputs
        self.vocab_sizes = tuple(e.vocab_size for e in config.encoders)
        self.max_seq_lens = tuple(e.max_seq_len for e in config.encoders)
        self.ladders = tuple(length_ladder(n, config.bucket_width) for n in self.max_seq_lens)
        self.batch_sizes = sizes
        self.max_batch_tokens = int(max_batch_tokens)
        self.devices = tuple(devices) if devices else (jax.devices()[0],)
        self.chunk_size = int(chunk_size)
        self.model_dir = None if model_dir is None else Path(model_dir)
        self.metadata = dict(metadata or {})
        self._graphdef = graphdef
        self._abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
        self._parts = self._place(params)
        self._add_projections()
        self._executables: dict[Key, Callable] = {}
        self._lock = threading.Lock()
        self._compile_seconds = 0.0
        self._encode_jit = {side: jax.jit(functools.partial(self._encode_fn, side=side))
                            for side in (0, 1)}
        self._head_jit = jax.jit(self._head_fn)

    # ----------------------------------------------------------------- placement

    def _place(self, params: dict) -> dict[Any, _Part]:
        """Split the parameters into what each compiled function reads, and place them.

        Encoders (token tables and encoder weights, nearly all the memory) always go to
        the accelerator, jax.devices()[0]: both modes need them, since predict encodes
        each side with the embedding executables. Only the small head moves: to the host
        CPU in "embedding" mode, next to the encodings it reads (which come back to the
        host between the two steps anyway).
        """
        accel = self.devices[0]
        try:
            host = jax.devices("cpu")[0]
        except RuntimeError:  # no CPU backend registered: keep everything together
            host = accel
        head_device = host if self.preferred_mode == "embedding" else accel
        single = jax.sharding.SingleDeviceSharding
        if len(self.devices) > 1:  # encoder batches split by rows, parameters copied to all
            mesh = jax.sharding.Mesh(np.array(self.devices), ("data",))
            replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            encoders = (replicated, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
        else:
            encoders = (single(accel), single(accel))
        # Which top-level groups each compiled function reads: model.py's layout. Groups
        # it does not name go to every part, so a new model attribute stays correct.
        known = {*TABLE_GROUPS, *ENCODER_GROUPS, *HEAD_GROUPS}
        shared = [g for g in params if g not in known]

        def part(groups: Sequence[str], where, rows) -> _Part:
            return _Part(jax.device_put({g: params[g] for g in (*groups, *shared) if g in params},
                                        where), rows)

        parts: dict[Any, _Part] = {}
        tied = self.config.tied_token_embedding_weight
        for side in (0, 1):
            parts[side] = part(side_groups(side, tied), *encoders)
        parts["head"] = part(HEAD_GROUPS, single(head_device), single(head_device))
        return parts

    def _add_projections(self) -> None:
        """Give each bilstm or hcnn side its token projection table (model.token_projection).

        With fixed weights, the first layer's product for a token (the LSTM input
        projection, the first conv's taps) depends on the token alone: one (V, D) x (D, W)
        product at load replaces a (B, L, D) x (D, W) product per call. Skipped above
        PROJECTION_MAX_BYTES (large vocabularies), where the table would cost more memory
        than it saves time.
        """
        for side in (0, 1):
            part = self._parts[side]
            project = jax.jit(lambda params, side=side: merge_params(
                self._graphdef, self._full(params)).token_projection(side))
            shape = jax.eval_shape(project, part.params)
            if shape is None or math.prod(shape.shape) * shape.dtype.itemsize > PROJECTION_MAX_BYTES:
                continue
            table = project(part.params)
            # The encode executables no longer read the token table: this part drops its
            # reference (memory is freed unless the other side still uses the table).
            token_table = table_group(side, self.config.tied_token_embedding_weight)
            params = {g: v for g, v in part.params.items() if g != token_table}
            self._parts[side] = dataclasses.replace(part, params={**params, "projection": table})
            log.debug("enc%d: token projection table %s, %.0f MB", side, shape.shape,
                      table.nbytes / 1e6)

    def _full(self, part: dict) -> dict:
        """The whole parameter tree inside a traced function: the part's arrays, zeros
        elsewhere. The zeros are never read, so XLA removes them (no memory, no copy)."""
        return {g: part[g] if g in part else
                jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self._abstract[g])
                for g in self._abstract}

    def _encode_fn(self, part: dict, tokens: jax.Array, *, side: int) -> jax.Array:
        """int32 (B, L) -> float32 (B, H): model.encode, deterministic."""
        return merge_params(self._graphdef, self._full(part)).encode(
            tokens, side, projection=part.get("projection"))

    def _head_fn(self, part: dict, u: jax.Array, v: jax.Array) -> jax.Array:
        """float32 (B, H) x2 -> (B, K): softmax probabilities, or regression values."""
        output, _ = merge_params(self._graphdef, self._full(part)).head(u, v)
        return output if self.config.is_regression else jax.nn.softmax(output, axis=-1)

    # ----------------------------------------------------------------- executables

    def sizes_for(self, length: int) -> tuple[int, ...]:
        """The batch sizes a length bucket's encoder uses: B * length <= max_batch_tokens,
        per device (so n devices take n times each size)."""
        fit = tuple(b for b in self.batch_sizes if b * length <= self.max_batch_tokens)
        return tuple(b * len(self.devices) for b in fit or self.batch_sizes[:1])

    def executable_keys(self, mode: str | None = None) -> list[Key]:
        """Every shape warmup() compiles, the preferred mode's first.

        Args:
            mode: None (all, preferred first), "embedding" (both encoders) or
                "classification" (both encoders and the head).
        """
        encoders = [("encode", side, b, length) for side in (0, 1)
                    for length in self.ladders[side] for b in self.sizes_for(length)]
        head = [("head", b) for b in self.batch_sizes]
        if mode == "embedding":
            return encoders
        if mode == "classification" or self.preferred_mode == "classification":
            return head + encoders
        return encoders + head

    def _executable(self, key: Key) -> Callable:
        fn = self._executables.get(key)
        if fn is None:
            with self._lock:
                fn = self._executables.get(key)
                if fn is None:
                    fn = self._executables[key] = self._compile(key)
        return fn

    def _compile(self, key: Key) -> Callable:
        t0 = time.perf_counter()
        if key[0] == "encode":
            _, side, b, length = key
            part = self._parts[side]
            tokens = jax.ShapeDtypeStruct((b, length), jnp.int32, sharding=part.rows)
            fn = self._encode_jit[side].lower(_struct(part.params), tokens).compile()
        else:
            part = self._parts["head"]
            u = jax.ShapeDtypeStruct((key[1], self.enc_dim), jnp.float32, sharding=part.rows)
            fn = self._head_jit.lower(_struct(part.params), u, u).compile()
        self._compile_seconds += time.perf_counter() - t0
        log.debug("compiled %s in %.3f s", key, time.perf_counter() - t0)
        return fn

    @property
    def num_compiled(self) -> int:
        """How many executables this predictor has compiled so far."""
        return len(self._executables)

    def warmup(self, mode: str | None = None) -> float:
        """Compile every bucket shape now, so no later call compiles; returns seconds.

        Args:
            mode: None compiles everything (preferred mode's executables first);
                "embedding" only the encoders; "classification" everything.
        """
        if mode is not None and mode not in PREFERRED_MODES:
            raise ValueError(f"mode={mode!r}; expected None or one of {PREFERRED_MODES}")
        t0 = time.perf_counter()
        keys = self.executable_keys(mode)
        for key in keys:
            self._executable(key)
        seconds = time.perf_counter() - t0
        log.info("Warm-up: %d executables ready in %.2f s (preferred mode: %s)",
                 len(keys), seconds, self.preferred_mode)
        return seconds

    # ----------------------------------------------------------------- embed / predict

    def embed(self, sequences: Any, encoder: str = "in0", *, lengths: Any = None,
              out: np.ndarray | None = None, progress: bool = False) -> np.ndarray:
        """Embed sequences with one encoder.

        Args:
            sequences: N sequences: a list of token-id lists, a Ragged, or an int array
                (N, L), 0-padded or with ``lengths``.
            encoder: "in0" (enc0) or "in1" (enc1).
            lengths: int (N,) real lengths of an array input's rows (optional).
            out: optional float32 (N, H) array to write into (e.g. a np.memmap).
            progress: show a tqdm progress bar.

        Returns:
            float32 (N, H), row i for sequence i.

        Raises:
            ValueError: a token id outside [0, vocab_size) (names the row and position).
        """
        side = _side(encoder)
        n = count_input(sequences, encoder)
        out = _output(out, n, self.enc_dim)
        with _bar(n, progress, "embed") as bar:
            for start in range(0, n, self.chunk_size):
                stop = min(start + self.chunk_size, n)
                out[start:stop] = self._encode(self._ragged(sequences, lengths, side, start, stop),
                                               side)
                bar.update(stop - start)
        return out

    def predict(self, in0: Any, in1: Any, *, in0_lengths: Any = None, in1_lengths: Any = None,
                progress: bool = False) -> np.ndarray:
        """Score pairs: softmax probabilities (N, num_classes) or regression values (N, 1).

        Args:
            in0, in1: N sequences each, in any form :meth:`embed` accepts.
            in0_lengths, in1_lengths: real lengths for array inputs (optional).
            progress: show a tqdm progress bar.

        Returns:
            float32 (N, K).
        """
        n = count_input(in0, "in0")
        if count_input(in1, "in1") != n:
            raise ValueError(f"in0 has {n} sequences but in1 has "
                             f"{count_input(in1, 'in1')}; predict needs pairs")
        out = np.empty((n, self.num_outputs), np.float32)
        sides = ((in0, in0_lengths), (in1, in1_lengths))
        with _bar(n, progress, "predict") as bar:
            for start in range(0, n, self.chunk_size):
                stop = min(start + self.chunk_size, n)
                u, v = (self._encode(self._ragged(x, lens, side, start, stop), side)
                        for side, (x, lens) in enumerate(sides))
                out[start:stop] = self._head(u, v)
                bar.update(stop - start)
        return out

    def _ragged(self, x: Any, lengths: Any, side: int, start: int, stop: int) -> Ragged:
        """Rows [start, stop) of one side's input, validated and truncated."""
        r, cut = from_input(*slice_input(x, lengths, start, stop), self.vocab_sizes[side],
                            self.max_seq_lens[side], ENCODERS[side], first_row=start,
                            vocab_name=f"enc{side}_vocab_size")
        _log_truncated(cut, ENCODERS[side], self.max_seq_lens[side])
        return r

    def _encode(self, r: Ragged, side: int) -> np.ndarray:
        """float32 (N, H) for N sequences already within max_seq_len."""
        out = np.empty((len(r), self.enc_dim), np.float32)
        ladder = np.asarray(self.ladders[side])
        lengths = r.lengths
        order = np.argsort(lengths, kind="stable")
        # Bucket b holds the sorted rows with ladder[b-1] < length <= ladder[b].
        bounds = np.searchsorted(lengths[order], ladder, side="right")
        params = self._parts[side].params
        pending = []  # dispatch everything first: device work overlaps host padding
        start = 0
        for length, stop in zip(ladder.tolist(), bounds.tolist()):
            if stop == start:
                continue
            idx = order[start:stop]
            plan = batch_plan(idx.size, self.sizes_for(length))
            tokens = pad_sequences(r.take(idx), length, rows=sum(plan))  # int32 (rows, L)
            row = 0
            for b in plan:
                fn = self._executable(("encode", side, b, length))
                pending.append((idx[row:row + b], fn(params, tokens[row:row + b])))
                row += b
            start = stop
        for idx, y in pending:
            out[idx] = np.asarray(y)[:idx.size]
        return out

    def _head(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """float32 (N, H) x2 -> (N, K), through the head in ladder-sized batches."""
        n = u.shape[0]
        out = np.empty((n, self.num_outputs), np.float32)
        plan = batch_plan(n, self.batch_sizes)
        rows = sum(plan)
        if rows > n:  # zero rows fill the last batch; their outputs are dropped
            pad = np.zeros((rows - n, self.enc_dim), np.float32)
            u, v = np.concatenate([u, pad]), np.concatenate([v, pad])
        params = self._parts["head"].params
        pending, row = [], 0
        for b in plan:
            pending.append((row, self._executable(("head", b))(params, u[row:row + b],
                                                                v[row:row + b])))
            row += b
        for row, y in pending:
            out[row:row + y.shape[0]] = np.asarray(y)[:max(0, n - row)]
        return out

    # ----------------------------------------------------------------- the model directory

    @property
    def history(self) -> list[dict[str, Any]]:
        """Per-epoch training metrics, as in the model directory's metrics.jsonl: epoch,
        train_* and validation_* metrics, seconds, records_per_second ([] if unknown)."""
        return [dict(record) for record in self.metadata.get("history", [])]

    def save(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Copy this model's directory to ``directory`` (:func:`checkpoint.copy_model`:
        atomic; an existing model there is replaced only with ``overwrite``)."""
        if self.model_dir is None:
            raise ValueError("this Predictor was built in memory: it has no model directory "
                             "to save")
        return checkpoint.copy_model(self.model_dir, directory, overwrite=overwrite)

    def __repr__(self) -> str:
        nets = "/".join(e.network for e in self.config.encoders)
        return (f"Predictor({nets}, enc_dim={self.enc_dim}, outputs={self.num_outputs}, "
                f"preferred_mode={self.preferred_mode!r}, compiled={self.num_compiled})")


def _side(encoder: str) -> int:
    if encoder not in ENCODERS:
        raise ValueError(f"encoder={encoder!r} is invalid; expected 'in0' (enc0) or 'in1' (enc1)")
    return ENCODERS.index(encoder)


def _output(out: np.ndarray | None, n: int, width: int) -> np.ndarray:
    if out is None:
        return np.empty((n, width), np.float32)
    if out.shape != (n, width) or out.dtype != np.float32:
        raise ValueError(f"out must be float32 ({n}, {width}), got {out.dtype}{out.shape}")
    return out


def _bar(total: int, enabled: bool, desc: str):
    return progress_bar(total, desc, unit="seq", progress=enabled, unit_scale=True, leave=False)


def _log_truncated(count: int, encoder: str, max_len: int) -> None:
    if count:
        log.debug("%d %s sequences longer than max_seq_len=%d were truncated", count, encoder,
                  max_len)


# --------------------------------------------------------------------------- load

def load(model_dir: str | Path, *, preferred_mode: str | None = None,
         compile_cache_dir: str | Path | None = None, warmup: bool = False,
         batch_sizes: Sequence[int] = BATCH_SIZES, max_batch_tokens: int = MAX_BATCH_TOKENS,
         chunk_size: int = CHUNK_SIZE, devices: int | Sequence[Any] | None = None) -> Predictor:
    """Load a model directory written by ``o2v train`` for inference.

    Args:
        model_dir: the model directory.
        preferred_mode: "embedding" or "classification" (spec §5.6); None reads the
            INFERENCE_PREFERRED_MODE environment variable, and without it uses
            "classification" (every parameter on the accelerator).
        compile_cache_dir: use JAX's persistent compilation cache in this directory
            (process-wide), so a second start loads executables instead of compiling.
        warmup: compile every bucket before returning (see :meth:`Predictor.warmup`).
        batch_sizes, max_batch_tokens, chunk_size: see :class:`Predictor`.
        devices: spread encoder batches over devices, data parallel, with the same
            answers: an int n (the first n local devices) or a list of devices; None
            (default) runs on the first device.

    Raises:
        checkpoint.ModelDirError: not a complete model directory.
        ValueError: an invalid preferred mode.
    """
    mode = resolve_preferred_mode(preferred_mode)  # fail before any slow work
    if isinstance(devices, int):
        local = jax.local_devices()
        if not 1 <= devices <= len(local):
            raise ValueError(f"devices={devices}: this process has {len(local)} local device(s)")
        devices = local[:devices]
    if compile_cache_dir is not None:
        runtime.enable_compilation_cache(compile_cache_dir)
    config, _ = checkpoint.read_config(model_dir)
    graphdef, abstract = abstract_model(config)
    # Restore straight into host arrays; Predictor places each part where it runs.
    try:
        cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    except RuntimeError:
        cpu = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=cpu), abstract)
    _, params, metadata = checkpoint.load_model(model_dir, target=target)
    predictor = Predictor(config, graphdef, params, preferred_mode=mode,
                          batch_sizes=batch_sizes, max_batch_tokens=max_batch_tokens,
                          chunk_size=chunk_size, model_dir=model_dir, metadata=metadata,
                          devices=devices)
    if warmup:
        predictor.warmup()
    return predictor
