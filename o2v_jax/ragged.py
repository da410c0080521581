"""Token sequences as flat arrays: the one path from lists of ids to checked int32 ids.

Training channels, Python inputs, JSON and .npz request bodies all end here:
:func:`flatten` turns lists of ids into int64 ids and lengths, :func:`unpad` does the
same for a 0-padded 2-D array, and :func:`check_tokens` range-checks the ids against a
vocabulary and keeps each sequence's first ``max_len`` of them, giving a
:class:`Ragged`. Errors carry the sequence and position (:class:`TokenRangeError`,
:class:`TokenTypeError`); each caller words them for its input (file:line, record path,
argument name). :func:`from_input` is that caller for a Python argument in any of the
forms the predictor accepts (lists, a Ragged, a 2-D array), with
:func:`count_input` and :func:`slice_input` to take it a chunk at a time.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

_INT64 = np.iinfo(np.int64)
_HASH_MULT = np.uint64(0x100000001B3)  # FNV-1 64-bit prime: odd, so every power is invertible


class TokenRangeError(ValueError):
    """A token id outside [0, vocab): sequence ``row``, position ``position`` holds ``value``.

    ``value`` is clamped to int64; an id beyond it reads back from the caller's input.
    """

    def __init__(self, row: int, position: int, value: int, vocab: int):
        super().__init__(row, position, value, vocab)
        self.row, self.position, self.value, self.vocab = row, position, value, vocab


class TokenTypeError(TypeError):
    """Sequence ``row`` is not a list of ids (``position`` None), or holds a non-integer
    ``value`` at ``position``."""

    def __init__(self, row: int, position: int | None, value: Any):
        super().__init__(row, position, value)
        self.row, self.position, self.value = row, position, value


def offsets(lengths: np.ndarray) -> np.ndarray:
    """int64 (N+1,) offsets for int (N,) lengths."""
    out = np.zeros(lengths.size + 1, np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def positions(offs: np.ndarray) -> np.ndarray:
    """int64 (T,): each token's position within its sequence, for offsets (N+1,)."""
    lengths = np.diff(offs)
    return np.arange(offs[-1], dtype=np.int64) - np.repeat(offs[:-1], lengths)


def flatten(seqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """N sequences of Python ints -> (int64 ids (T,), int64 lengths (N,)).

    Ids beyond int64 (which no vocabulary holds) are clamped to it, so a range check
    still finds them; read the real value back from ``seqs``.

    Raises:
        TokenTypeError: a sequence without a length, or an id that is not a number.
    """
    try:
        lengths = np.fromiter(map(len, seqs), np.int64, count=len(seqs))
    except TypeError:
        row = next(i for i, s in enumerate(seqs) if not hasattr(s, "__len__"))
        raise TokenTypeError(row, None, seqs[row]) from None
    try:
        # fromiter over a chain: one pass in C, no per-sequence arrays.
        tokens = np.fromiter(itertools.chain.from_iterable(seqs), np.int64, count=int(lengths.sum()))
    except OverflowError:
        tokens = np.array([min(max(t, _INT64.min), _INT64.max) for s in seqs for t in s], np.int64)
    except (TypeError, ValueError) as e:  # a string, a nested list, None
        bad = next(((r, j, t) for r, s in enumerate(seqs) for j, t in enumerate(s)
                    if not isinstance(t, (int, np.integer))), None)
        if bad is None:
            raise
        raise TokenTypeError(*bad) from e
    return tokens, lengths


def unpad(arr: np.ndarray, lengths: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """The real ids of a 2-D integer (N, L) array, row after row, and each row's length.

    Without ``lengths`` the rows are 0-padded on the right (id 0 is padding): a row runs to
    its last non-zero id. ``lengths`` (N,) gives the real lengths instead.

    Returns:
        (ids (T,) in ``arr``'s dtype, int64 lengths (N,)).

    Raises:
        TypeError: ``arr`` is not a 2-D integer array.
        ValueError: ``lengths`` is not N integers in [0, L].
    """
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"an array input must be 2-D integer (N, L), got {arr.dtype}{arr.shape}")
    if lengths is None and arr.shape[1] == 0:  # rows of no ids: empty sequences
        lens = np.zeros(arr.shape[0], np.int64)
    elif lengths is None:
        nonzero = arr != 0
        lens = np.where(nonzero.any(axis=1), arr.shape[1] - np.argmax(nonzero[:, ::-1], axis=1), 0)
    else:
        lens = np.asarray(lengths)
        if lens.shape != (arr.shape[0],) or not np.issubdtype(lens.dtype, np.integer) \
                or (lens < 0).any() or (lens > arr.shape[1]).any():
            raise ValueError(f"lengths must be {arr.shape[0]} integers in [0, {arr.shape[1]}], "
                             f"got {lens.dtype}{lens.shape}")
    tokens = arr[np.arange(arr.shape[1]) < lens[:, None]]  # row-major = sequence order
    return tokens, lens.astype(np.int64, copy=False)


def check_tokens(tokens: np.ndarray, lengths: np.ndarray, vocab: int,
                 max_len: int) -> tuple[Ragged, int]:
    """Range-check ids against [0, vocab), then keep each sequence's first ``max_len`` ids.

    Args:
        tokens: (T,) integer ids of N sequences, one after another.
        lengths: int64 (N,) sequence lengths, summing to T.

    Returns:
        (the int32 Ragged, how many sequences were truncated).

    Raises:
        TokenRangeError: the first id out of range.
    """
    offs = offsets(lengths)
    bad = (tokens < 0) | (tokens >= vocab)
    if bad.any():
        first = int(np.argmax(bad))
        row = int(np.searchsorted(offs, first, side="right")) - 1
        raise TokenRangeError(row, first - int(offs[row]), int(tokens[first]), vocab)
    over = lengths > max_len
    if over.any():  # keep the first max_len ids of each sequence (spec §3.2)
        tokens = tokens[positions(offs) < max_len]
        np.cumsum(np.minimum(lengths, max_len), out=offs[1:])
    return Ragged(tokens.astype(np.int32, copy=False), offs), int(over.sum())


@dataclasses.dataclass(frozen=True)
class Ragged:
    """N variable-length int32 sequences, flat: sequence i is tokens[offsets[i]:offsets[i+1]]."""

    tokens: np.ndarray  # int32 (T,)
    offsets: np.ndarray  # int64 (N+1,), offsets[0] == 0, offsets[-1] == T, non-decreasing

    def __post_init__(self) -> None:
        t, o = self.tokens, self.offsets
        if t.dtype != np.int32 or t.ndim != 1 or o.dtype != np.int64 or o.ndim != 1 or o.size < 1:
            raise ValueError(f"Ragged needs int32 (T,) tokens and int64 (N+1,) offsets, got "
                             f"{t.dtype}{t.shape} and {o.dtype}{o.shape}")
        if o[0] != 0 or o[-1] != t.size or (o.size > 1 and (np.diff(o) < 0).any()):
            raise ValueError("Ragged offsets must start at 0, end at len(tokens) and not decrease")

    @property
    def lengths(self) -> np.ndarray:
        """int64 (N,): the length of each sequence."""
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return self.offsets.size - 1

    def take(self, indices: np.ndarray | Sequence[int]) -> Ragged:
        """The sequences at ``indices`` (int positions or a bool mask (N,)), in that order."""
        idx = np.asarray(indices)
        idx = np.flatnonzero(idx) if idx.dtype == bool else idx.astype(np.int64, copy=False)
        starts = self.offsets[:-1][idx]
        lens = self.offsets[1:][idx] - starts  # O(len(idx)), not self.lengths: O(N)
        offs = offsets(lens)
        # Position j of the output reads tokens[start of its source sequence + its rank in it].
        src = np.arange(offs[-1]) + np.repeat(starts - offs[:-1], lens)
        return Ragged(self.tokens[src], offs)

    def slice(self, start: int, stop: int) -> Ragged:
        """Sequences [start, stop), sharing this Ragged's token memory."""
        o = self.offsets[start:stop + 1]
        return Ragged(self.tokens[o[0]:o[-1]], o - o[0])

    @functools.cached_property
    def content_hash(self) -> np.ndarray:
        """uint64 (N,): equal sequences hash equal; sequences that differ in one token never
        collide. Computed once per Ragged (negative sampling asks for it every epoch)."""
        lengths = self.lengths
        powers = np.cumprod(np.full(int(lengths.max(initial=0)) + 1, _HASH_MULT))  # wraps mod 2^64
        terms = (self.tokens.astype(np.uint64) + np.uint64(1)) * powers[positions(self.offsets)]
        sums = np.zeros(self.tokens.size + 1, np.uint64)
        np.cumsum(terms, out=sums[1:])
        return (sums[self.offsets[1:]] - sums[self.offsets[:-1]]) ^ (lengths.astype(np.uint64) * _HASH_MULT)

    @classmethod
    def from_lists(cls, seqs: Sequence[Sequence[int]]) -> Ragged:
        tokens, lengths = flatten(seqs)
        if tokens.size and (tokens.min() < np.iinfo(np.int32).min or
                            tokens.max() > np.iinfo(np.int32).max):
            raise ValueError("Ragged.from_lists: a token id does not fit in int32")
        return cls(tokens.astype(np.int32), offsets(lengths))

    @classmethod
    def concat(cls, parts: Sequence[Ragged]) -> Ragged:
        """The sequences of all ``parts``, one after another."""
        return cls(np.concatenate([p.tokens for p in parts]).astype(np.int32, copy=False),
                   offsets(np.concatenate([p.lengths for p in parts])))

    def to_lists(self) -> list[list[int]]:
        tokens = self.tokens.tolist()
        return [tokens[a:b] for a, b in itertools.pairwise(self.offsets.tolist())]


# --------------------------------------------------------------------------- Python inputs

def count_input(x: Any, name: str) -> int:
    """N, the number of sequences of an input, without converting anything."""
    if isinstance(x, Ragged) or isinstance(x, Sequence) and not isinstance(x, (str, bytes)):
        return len(x)
    if hasattr(x, "shape"):
        return int(x.shape[0]) if len(x.shape) else 0
    raise TypeError(f"{name}: expected a list of token-id lists, a Ragged or a 2-D int "
                    f"array, got {type(x).__name__}")


def slice_input(x: Any, lengths: Any, start: int, stop: int) -> tuple[Any, Any]:
    """Rows [start, stop) of an input and its lengths (views where possible)."""
    if isinstance(x, Ragged):
        return x.slice(start, stop), None
    return x[start:stop], None if lengths is None else np.asarray(lengths)[start:stop]


def from_input(x: Any, lengths: Any, vocab: int, max_len: int, name: str, *, vocab_name: str,
               first_row: int = 0) -> tuple[Ragged, int]:
    """Validate and convert sequences; returns (Ragged truncated to max_len, # truncated).

    Args:
        x: list of lists of Python ints (or of 1-D int arrays), a Ragged, or an integer array
            (N, L) that is 0-padded or comes with ``lengths``.
        lengths: int (N,) real lengths of a 2-D array's rows, or None.
        vocab: ids must be in [0, vocab).
        max_len: longer sequences keep their first ``max_len`` ids (as training does).
        name: the argument's name ("in0" or "in1"), for messages.
        vocab_name: the hyperparameter that sets ``vocab`` (e.g. "enc0_vocab_size"), for messages.
        first_row: index of x's first row in the caller's input, for messages.

    Raises:
        TypeError: not one of the accepted forms, or an id that is not an integer.
        ValueError: an id out of range (names the sequence and position), bad ``lengths``.
    """
    if isinstance(x, Ragged):
        if lengths is not None:
            raise TypeError(f"{name}: lengths= is only for 2-D arrays, not a Ragged")
        tokens, lens = x.tokens, x.lengths
    elif isinstance(x, np.ndarray) or hasattr(x, "__array__") and getattr(x, "ndim", 0) == 2:
        try:
            tokens, lens = unpad(np.asarray(x), lengths)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{name}: {e}") from None
    else:
        if lengths is not None:
            raise TypeError(f"{name}: lengths= is only for 2-D arrays")
        if isinstance(x, (str, bytes)) or not isinstance(x, Sequence):
            raise TypeError(f"{name}: expected a list of token-id lists, a Ragged or a 2-D "
                            f"int array, got {type(x).__name__}")
        try:
            tokens, lens = flatten(x)
        except TokenTypeError as e:
            if e.position is None:
                raise TypeError(f"{name}[{first_row + e.row}]: expected a list of token ids, got "
                                f"{type(e.value).__name__} (pass [[...], ...], one list per "
                                f"sequence)") from None
            raise TypeError(f"{name} sequence {first_row + e.row}, position {e.position}: expected "
                            f"an integer token id, got {type(e.value).__name__} "
                            f"{e.value!r:.40}") from e
    try:
        return check_tokens(tokens, lens.astype(np.int64, copy=False), vocab, max_len)
    except TokenRangeError as e:
        value = x[e.row][e.position] if isinstance(x, Sequence) else e.value
        raise ValueError(f"{name} sequence {first_row + e.row}, position {e.position}: "
                         f"token id {value} is out of range; expected an integer in "
                         f"[0, {vocab - 1}] ({vocab_name}={vocab})") from None
