"""Length and batch ladders: fixed-shape, 0-padded, masked batches.

Every batch has exactly ``mini_batch_size`` rows and an (L0, L1) shape taken from two
short length ladders, so each jitted step compiles once per bucket, not once per batch.
A bucket's last batch is filled with masked rows (weight 0) instead of SageMaker's
replicated records (spec §3.5), so no record is counted twice. docs/data.md explains
the ladders.
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import jax
import numpy as np

from o2v_jax.config import Config
from o2v_jax.data import PairData
from o2v_jax.ragged import Ragged
from o2v_jax.sampling import Pairs

DEFAULT_LADDER_START = 8  # bucket_width=0: powers of two from here, then max_seq_len
T = TypeVar("T")


def length_ladder(max_seq_len: int, bucket_width: int) -> tuple[int, ...]:
    """The padded lengths one encoder's sequences can get, ascending, last == max_seq_len.

    ``bucket_width > 0``: bucket_width, 2*bucket_width, ... below max_seq_len, then
    max_seq_len (SageMaker/Sockeye, spec §3.6). ``bucket_width == 0``: 8, 16, 32, ... below
    max_seq_len, then max_seq_len, instead of padding everything to the maximum.
    """
    if max_seq_len < 1 or bucket_width < 0:
        raise ValueError(f"need max_seq_len >= 1 and bucket_width >= 0, got {max_seq_len}, "
                         f"{bucket_width}")
    if bucket_width:
        steps = range(bucket_width, max_seq_len, bucket_width)
    else:
        powers = (DEFAULT_LADDER_START << i for i in itertools.count())
        steps = itertools.takewhile(lambda x: x < max_seq_len, powers)
    return (*steps, max_seq_len)


@jax.tree_util.register_dataclass  # a pytree: the jitted train and eval steps take it whole
@dataclasses.dataclass(frozen=True)
class Batch:
    """One fixed-shape batch; rows with weight 0 are padding and never enter a loss or metric."""

    in0: np.ndarray  # int32 (B, L0), 0-padded
    in1: np.ndarray  # int32 (B, L1), 0-padded
    labels: np.ndarray  # float32 (B,), 0 on padding rows
    weights: np.ndarray  # float32 (B,): 1 real row, 0 padding row


def pad_sequences(r: Ragged, length: int, rows: int | None = None) -> np.ndarray:
    """Right-pad sequences with id 0 into an int32 (rows, length) matrix.

    Args:
        r: N sequences, none longer than ``length``.
        length: L, the padded length.
        rows: number of rows (>= N, default N); rows beyond N are all zero (masked rows).

    Raises:
        ValueError: a sequence is longer than ``length`` or ``rows < N``.
    """
    return _padded(r, np.arange(len(r)), length, rows)


def _padded(r: Ragged, idx: np.ndarray, length: int, rows: int | None) -> np.ndarray:
    """pad_sequences(r.take(idx), ...) without building the intermediate Ragged."""
    n = idx.size
    rows = n if rows is None else rows
    starts = r.offsets[idx]
    lengths = r.offsets[idx + 1] - starts
    if rows < n or (n and int(lengths.max()) > length):
        raise ValueError(f"cannot pad {n} sequences of length up to {int(lengths.max(initial=0))} "
                         f"into ({rows}, {length})")
    out = np.zeros((rows, length), np.int32)
    if n and r.tokens.size:
        # Read L tokens from each start (past a sequence's end: its neighbours' tokens,
        # clipped at the array's end), then zero what lies past each length: dense ops
        # only, cheaper than scattering through a boolean mask (benchmarks/RESULTS.md).
        cols = np.arange(length)
        np.take(r.tokens, starts[:, None] + cols, out=out[:n], mode="clip")
        out[:n] *= cols < lengths[:, None]
    return out


def batch_plan(n: int, sizes: Sequence[int]) -> list[int]:
    """Batch sizes (from ``sizes``) that cover ``n`` rows with little padding.

    Full batches of the largest size; the rest goes into the smallest size that fits
    when that is at least half full, otherwise into full batches of the next size down,
    and so on. So every batch but the last is full and the last is over half full
    (or the smallest size).

    Args:
        n: rows to cover (>= 0).
        sizes: allowed batch sizes, ascending.
    """
    plan: list[int] = []
    while n > 0:
        fit = next((b for b in sizes if b >= n), None)
        if fit is not None and (2 * n >= fit or fit == sizes[0]):
            plan.append(fit)
            break
        big = max(b for b in sizes if b <= n)
        plan += [big] * (n // big)
        n %= big
    return plan


def _bucket_keys(pairs: Pairs,
                 config: Config) -> tuple[np.ndarray, tuple[int, ...], tuple[int, ...]]:
    """int64 (N,) bucket id b0 * len(ladder1) + b1 per record, and the two ladders."""
    ladders = [length_ladder(enc.max_seq_len, config.bucket_width) for enc in config.encoders]
    sides = ((pairs.data.in0, pairs.i0), (pairs.data.in1, pairs.i1))
    index = []
    for side, ((ragged, which), ladder) in enumerate(zip(sides, ladders)):
        # Smallest ladder entry >= the length; == len(ladder) means longer than max_seq_len.
        b = np.searchsorted(np.asarray(ladder), ragged.lengths[which], side="left")
        if b.size and int(b.max()) == len(ladder):
            raise ValueError(f"{pairs.source}: in{side} has a sequence longer than "
                             f"max_seq_len={ladder[-1]}; read it with this config")
        index.append(b)
    return index[0] * len(ladders[1]) + index[1], ladders[0], ladders[1]


def count_batches(data: PairData | Pairs, config: Config) -> int:
    """How many batches :func:`batches` yields for ``data`` (any seed)."""
    keys, _, _ = _bucket_keys(_as_pairs(data), config)
    b = config.mini_batch_size
    return int(((np.bincount(keys) + b - 1) // b).sum())


def _as_pairs(data: PairData | Pairs) -> Pairs:
    return data if isinstance(data, Pairs) else Pairs.of(data)


def batches(data: PairData | Pairs, config: Config, *,
            shuffle_seed: int | None) -> Iterator[Batch]:
    """Fixed-shape batches covering every record exactly once.

    Records are grouped by (L0, L1) bucket and cut into batches of ``mini_batch_size``;
    each bucket's last batch is topped up with masked rows.

    Args:
        data: the records (sequences already within max_seq_len, as read_channel gives
            them), or an epoch's :class:`~o2v_jax.data.Pairs` from negative sampling.
        config: gives mini_batch_size, bucket_width and each encoder's max_seq_len.
        shuffle_seed: None keeps file order within each bucket and visits buckets in
            ascending (L0, L1) order (validation/test); an int shuffles records within
            buckets and the order of all batches, reproducibly (train: one seed per epoch).

    Yields:
        Batches with in0 (B, L0), in1 (B, L1), labels (B,), weights (B,), B = mini_batch_size.
    """
    pairs = _as_pairs(data)
    keys, ladder0, ladder1 = _bucket_keys(pairs, config)
    size = config.mini_batch_size
    if shuffle_seed is None:
        rng, order = None, np.argsort(keys, kind="stable")
    else:
        rng = np.random.default_rng(shuffle_seed)
        perm = rng.permutation(len(keys))
        order = perm[np.argsort(keys[perm], kind="stable")]  # buckets, shuffled inside
    sorted_keys = keys[order]
    bucket_starts = np.flatnonzero(np.diff(sorted_keys, prepend=-1)).tolist()
    bucket_ends = [*bucket_starts[1:], len(order)]
    spans = [(start, min(start + size, end)) for begin, end in zip(bucket_starts, bucket_ends)
             for start in range(begin, end, size)]
    if rng is not None:
        spans = [spans[i] for i in rng.permutation(len(spans))]
    for start, end in spans:
        key = int(sorted_keys[start])
        yield _make_batch(pairs, order[start:end], ladder0[key // len(ladder1)],
                          ladder1[key % len(ladder1)], size)


def _make_batch(pairs: Pairs, idx: np.ndarray, len0: int, len1: int, size: int) -> Batch:
    labels = np.zeros(size, np.float32)
    weights = np.zeros(size, np.float32)
    labels[:idx.size] = pairs.labels[idx]
    weights[:idx.size] = 1.0
    return Batch(_padded(pairs.data.in0, pairs.i0[idx], len0, size),
                 _padded(pairs.data.in1, pairs.i1[idx], len1, size), labels, weights)


def prefetch(items: Iterable[T], depth: int = 2,
             transform: Callable[[T], Any] | None = None) -> Iterator[Any]:
    """Yield ``items`` (each through ``transform``) as they come, made by a worker thread.

    The next ``depth`` items are built while the caller works on the current one: host
    batching overlaps the dispatch of jitted steps (numpy and JAX's dispatch release the
    GIL for most of their work). Same items, same order; an exception in the worker is
    raised here, at the item where it happened. Closing the generator early (``break``,
    an exception in the caller) stops the worker.
    """
    done = object()
    q: queue.Queue = queue.Queue(maxsize=max(depth, 1))
    stop = threading.Event()

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put((transform(item) if transform else item, None)):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put((None, e))
            return
        put((done, None))

    worker = threading.Thread(target=work, name="o2v-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item, error = q.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()
        if not sys.is_finalizing():  # a generator collected at exit: threading is half gone
            worker.join(timeout=5)
