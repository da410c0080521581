"""Training channels from Python: a path, records or arrays -> ``PairData``.

:func:`o2v_jax.train` and :func:`o2v_jax.evaluate` take each channel in any of three
forms (:func:`pair_data`):

* a path: a JSON Lines file or a directory of them (:func:`o2v_jax.data.read_channel`);
* an iterable of records ``{"in0": [ids], "in1": [ids], "label": number}``, the JSON
  Lines record as a Python mapping (NumPy arrays and scalars are fine);
* arrays ``(in0, in1, labels)``: each side a 2-D integer array (N, L) 0-padded on the
  right (id 0 is padding, as everywhere), a list of token-id lists, or a ``Ragged``;
  ``labels`` N numbers.

Records and arrays get the file channel's checks and messages: types through the same
``msgspec`` type (:class:`o2v_jax.data.Record`), labels, vocabulary ids and truncation
through :meth:`o2v_jax.data.Columns.add`. Where a file's error says ``file:line``, these
say the record path: ``train[3]: field "in0[2]": Vocab id "50" is not less than ...``.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec
import numpy as np

from o2v_jax.config import Config
from o2v_jax.data import (Columns, DataError, PairData, Record, add_records, describe,
                          gc_paused, log_truncated, read_channel)
from o2v_jax.ragged import Ragged, flatten, unpad

log = logging.getLogger("o2v_jax")

_CHUNK = 65_536  # records converted and checked at a time: bounded extra memory
_RECORDS = list[Record]
_SEQS = list[list[int]]
_LABELS = list[float]
_AT = re.compile(r"Expected `(.*)`, got `(.*)` - at `\$\[(\d+)\](.*)`")

Channel = Any  # str | os.PathLike | Iterable[Mapping] | tuple(in0, in1, labels) | PairData


def pair_data(channel: Channel, config: Config, *, name: str) -> PairData:
    """Any channel form -> PairData, checked against ``config``.

    Args:
        channel: a path, an iterable of record mappings, ``(in0, in1, labels)``, or a
            PairData (returned as it is).
        config: label rules, vocab_size and max_seq_len.
        name: the channel's name ("train", "validation", ...), the root of record paths.

    Raises:
        DataError: a bad record, naming its path (or file:line), field and what was expected.
        TypeError: ``channel`` is none of the forms.
    """
    if isinstance(channel, PairData):
        return channel
    if isinstance(channel, (str, os.PathLike)):
        return read_channel(channel, config, name=name)
    if isinstance(channel, tuple) and channel and not isinstance(channel[0], Mapping):
        if len(channel) != 3:
            raise TypeError(f"{name}: arrays come as (in0, in1, labels); got a tuple of "
                            f"{len(channel)}")
        return from_arrays(*channel, config, name=name)
    if isinstance(channel, (Mapping, bytes)) or not isinstance(channel, Iterable):
        raise TypeError(f"{name}: expected a path, an iterable of records "
                        f'{{"in0": [...], "in1": [...], "label": ...}} or arrays (in0, in1, '
                        f"labels); got {type(channel).__name__}")
    return from_records(channel, config, name=name)


# --------------------------------------------------------------------------- records

def from_records(records: Iterable[Mapping[str, Any]], config: Config, *, name: str) -> PairData:
    """Records ``{"in0": [...], "in1": [...], "label": ...}`` -> PairData, a chunk at a time.

    Raises:
        DataError: the first bad record, as ``name[i]: field "...": ...``.
    """
    acc, it, start = Columns(), iter(records), 0
    with gc_paused():  # as for files: many small lists, no cycles
        while chunk := list(itertools.islice(it, _CHUNK)):
            decoded, error = _convert(chunk, start, name)

            def where(i: int, first: int = start) -> str:
                return f"{name}[{first + i}]"

            if decoded:  # an earlier record's problem comes first, as in a file
                add_records(decoded, config, acc, where)
            if error is not None:
                raise error
            start += len(chunk)
    if not start:
        raise DataError(f"channel {name}: no records")
    return _finish(acc, config, name, "records")


def _convert(chunk: list, start: int, name: str) -> tuple[list[Record], DataError | None]:
    """The chunk as Records, and the error of its first record that is not one (or None)."""
    try:
        return msgspec.convert(chunk, _RECORDS), None  # one C call when all is well
    except msgspec.ValidationError:
        pass
    decoded = []
    for k, record in enumerate(chunk):
        try:
            decoded.append(msgspec.convert(_plain_record(record), Record))
        except msgspec.ValidationError as e:
            return decoded, DataError(f"{name}[{start + k}]: {describe(e)}")
    return decoded, None


def _plain_record(record: Any) -> Any:
    """A mapping with NumPy values as plain Python ones (msgspec takes only those)."""
    if not isinstance(record, Mapping):
        return record
    return {key: _plain(value) for key, value in record.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------- arrays

def from_arrays(in0: Any, in1: Any, labels: Any, config: Config, *, name: str) -> PairData:
    """``(in0, in1, labels)`` -> PairData.

    Args:
        in0, in1: N sequences each: a 2-D integer array (N, L) 0-padded on the right, a
            list of token-id lists, or a Ragged.
        labels: N numbers (class indices, or regression targets).

    Raises:
        DataError: wrong shapes or types, or a bad label or id (``name[i]: field ...``).
    """
    sides = [_side(x, side, name) for side, x in enumerate((in0, in1))]
    n = sides[0][1].size
    label_array = _labels(labels, name)
    if not (sides[1][1].size == n == label_array.size):
        raise DataError(f"{name}: in0 has {n} rows, in1 {sides[1][1].size} and labels "
                        f"{label_array.size}; expected one of each per pair")
    if not n:
        raise DataError(f"channel {name}: no records")
    acc = Columns()
    acc.add(label_array, sides, config, lambda i: f"{name}[{i}]")
    return _finish(acc, config, name, "arrays")


def _side(x: Any, side: int, name: str) -> tuple[np.ndarray, np.ndarray, Sequence | None]:
    """One side as (ids, int64 lengths (N,), the checked lists or None)."""
    field = f"in{side}"
    if isinstance(x, Ragged):
        return x.tokens, x.lengths, None
    if isinstance(x, np.ndarray) or hasattr(x, "__array__") and not isinstance(x, Sequence):
        arr = np.asarray(x)
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
            raise DataError(f'{name}: field "{field}": expected a 2-D integer array (N, L), '
                            f"0-padded on the right, got {arr.dtype}{arr.shape}")
        return *unpad(arr), None
    if isinstance(x, (str, bytes)) or not isinstance(x, Sequence):
        raise DataError(f'{name}: field "{field}": expected a 2-D integer array or a list of '
                        f"token-id lists, got {type(x).__name__}")
    seqs = _int_lists(x, field, name)
    return *flatten(seqs), seqs


def _int_lists(seqs: Sequence, field: str, name: str) -> list[list[int]]:
    """``seqs`` checked as lists of ints by the type records use (no bools, floats or
    strings, as in a file)."""
    try:
        return msgspec.convert(seqs, _SEQS)
    except msgspec.ValidationError:
        pass
    try:
        return msgspec.convert([_plain(s) for s in seqs], _SEQS)
    except msgspec.ValidationError as e:
        m = _AT.fullmatch(str(e))
        if m is None:  # not a sequence at all
            raise DataError(f'{name}: field "{field}": expected a list of token-id lists') from None
        row, position, got = int(m[3]), m[4], m[2]
        expected = "an integer token id" if position else "array of integers"
        raise DataError(f'{name}[{row}]: field "{field}{position}": expected {expected}, '
                        f"got {got}") from None


def _labels(labels: Any, name: str) -> np.ndarray:
    """float64 (N,) labels; the rule each must meet is checked with the records."""
    if isinstance(labels, np.ndarray) or hasattr(labels, "__array__") and not isinstance(labels, Sequence):
        arr = np.asarray(labels)
        if arr.ndim != 1 or arr.dtype.kind not in "iuf":
            raise DataError(f'{name}: field "label": expected a 1-D integer or float array (N,), '
                            f"one label per pair, got {arr.dtype}{arr.shape}")
        return arr.astype(np.float64)
    if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence):
        raise DataError(f'{name}: field "label": expected a 1-D array or a list of numbers, got '
                        f"{type(labels).__name__}")
    try:  # a list: each a number, as in a record (no bools or strings)
        return np.asarray(msgspec.convert(_plain(labels), _LABELS), np.float64)
    except msgspec.ValidationError as e:
        m = _AT.fullmatch(str(e))
        where = f"{name}[{m[3]}]" if m else name
        raise DataError(f'{where}: field "label": expected a number, got {m[2] if m else e}') from None


# --------------------------------------------------------------------------- both

def _finish(acc: Columns, config: Config, name: str, form: str) -> PairData:
    data = acc.build(f"{name} ({form} from Python)")
    log.info("%s: %s records from Python %s (%s in0 tokens, %s in1 tokens)", name,
             f"{len(data):,}", form, f"{data.in0.tokens.size:,}", f"{data.in1.tokens.size:,}")
    log_truncated(data, config, name)
    return data
