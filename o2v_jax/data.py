"""Channels -> compact arrays; auxiliary vocab and GloVe files; negative sampling.

A channel (spec §3.1) is a JSON Lines file or a directory of them, one record per line:
``{"label": 1, "in0": [6, 17, 606], "in1": [16, 21]}`` (spec §3.2). :func:`read_channel`
turns it into a :class:`PairData` whose token ids live in flat int32 arrays
(:class:`Ragged`), never in lists of lists, so a million-record channel costs little more
memory than its tokens. Bad input stops the read with a :class:`DataError` naming the
file, the line, the field and what was expected. docs/data.md has the rules and the
reasons for each choice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import itertools
import logging
import re
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from o2v_jax.config import Config

log = logging.getLogger("o2v_jax")

_CHUNK_BYTES = 1 << 20  # decode ~1 MiB of lines at a time: bounded memory, cache friendly
_BOM = b"\xef\xbb\xbf"


class DataError(ValueError):
    """Bad input: the message names file:line (or the file), the field and what was expected."""


# --------------------------------------------------------------------------- containers


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
        offsets = _offsets(lens)
        # Position j of the output reads tokens[start of its source sequence + its rank in it].
        src = np.arange(offsets[-1]) + np.repeat(starts - offsets[:-1], lens)
        return Ragged(self.tokens[src], offsets)

    @functools.cached_property
    def content_hash(self) -> np.ndarray:
        """uint64 (N,): equal sequences hash equal; sequences that differ in one token never
        collide. Computed once per Ragged (negative sampling asks for it every epoch)."""
        return _content_hash(self)

    @classmethod
    def from_lists(cls, seqs: Sequence[Sequence[int]]) -> Ragged:
        lens = np.fromiter(map(len, seqs), np.int64, count=len(seqs))
        tokens = np.fromiter(itertools.chain.from_iterable(seqs), np.int64, count=int(lens.sum()))
        if tokens.size and (tokens.min() < np.iinfo(np.int32).min or
                            tokens.max() > np.iinfo(np.int32).max):
            raise ValueError("Ragged.from_lists: a token id does not fit in int32")
        return cls(tokens.astype(np.int32), _offsets(lens))

    @classmethod
    def concat(cls, parts: Sequence[Ragged]) -> Ragged:
        """The sequences of all ``parts``, one after another."""
        return cls(np.concatenate([p.tokens for p in parts]).astype(np.int32, copy=False),
                   _offsets(np.concatenate([p.lengths for p in parts])))

    def to_lists(self) -> list[list[int]]:
        tokens = self.tokens.tolist()
        return [tokens[a:b] for a, b in itertools.pairwise(self.offsets.tolist())]


def _offsets(lengths: np.ndarray) -> np.ndarray:
    """int64 (N+1,) offsets for int (N,) lengths."""
    out = np.zeros(lengths.size + 1, np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


# ------------------------------------------------------------------ inference inputs
# Shared by Predictor (Python lists and arrays) and the wire layer (JSON, .npz bodies).


class TokenRangeError(ValueError):
    """A token id outside [0, vocab): sequence ``row``, position ``position`` holds ``value``."""

    def __init__(self, row: int, position: int, value: int, vocab: int):
        super().__init__(row, position, value, vocab)
        self.row, self.position, self.value, self.vocab = row, position, value, vocab


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
    offsets = _offsets(lengths)
    bad = (tokens < 0) | (tokens >= vocab)
    if bad.any():
        first = int(np.argmax(bad))
        row = int(np.searchsorted(offsets, first, side="right")) - 1
        raise TokenRangeError(row, first - int(offsets[row]), int(tokens[first]), vocab)
    over = lengths > max_len
    if over.any():  # keep the first max_len ids of each sequence (spec §3.2)
        rank = np.arange(tokens.size) - np.repeat(offsets[:-1], lengths)
        tokens = tokens[rank < max_len]
        np.cumsum(np.minimum(lengths, max_len), out=offsets[1:])
    return Ragged(tokens.astype(np.int32, copy=False), offsets), int(over.sum())


@dataclasses.dataclass(frozen=True)
class PairData:
    """The records of one channel: in0 -> enc0, in1 -> enc1, one label each."""

    in0: Ragged
    in1: Ragged
    labels: np.ndarray  # float32 (N,): class index for softmax, target value for regression
    source: str  # the channel path, for messages
    truncated: tuple[int, int] = (0, 0)  # sequences cut to max_seq_len when read, per side

    def __post_init__(self) -> None:
        if self.labels.ndim != 1 or not len(self.in0) == len(self.in1) == self.labels.shape[0]:
            raise ValueError(f"PairData sides disagree: {len(self.in0)} in0, {len(self.in1)} in1, "
                             f"labels {self.labels.shape}")
        if self.labels.dtype != np.float32:
            raise ValueError(f"PairData labels must be float32, got {self.labels.dtype}")

    def __len__(self) -> int:
        return len(self.in0)

    def take(self, indices: np.ndarray | Sequence[int]) -> PairData:
        """The records at ``indices`` (source and truncation counts are kept)."""
        idx = np.asarray(indices)
        idx = np.flatnonzero(idx) if idx.dtype == bool else idx.astype(np.int64, copy=False)
        return PairData(self.in0.take(idx), self.in1.take(idx), self.labels[idx],
                        self.source, self.truncated)


@dataclasses.dataclass(frozen=True)
class Pairs:
    """Records named by index into a :class:`PairData`, no tokens copied: record i pairs
    ``data.in0[i0[i]]`` with ``data.in1[i1[i]]`` under ``labels[i]``.

    What :func:`negative_pairs` returns for an epoch. :func:`o2v_jax.buckets.batches` reads
    it as it reads a PairData, so a negative's tokens are copied once, into its batch
    (materialising an epoch first cost 0.2-0.35 s per 250,000 records on 2 CPU cores).
    """

    data: PairData
    i0: np.ndarray  # int64 (N,): which data.in0
    i1: np.ndarray  # int64 (N,): which data.in1
    labels: np.ndarray  # float32 (N,)

    def __post_init__(self) -> None:
        n = self.labels.shape[0] if self.labels.ndim == 1 else -1
        if self.i0.shape != (n,) or self.i1.shape != (n,) or self.labels.dtype != np.float32:
            raise ValueError(f"Pairs needs (N,) i0, i1 and float32 labels, got {self.i0.shape}, "
                             f"{self.i1.shape} and {self.labels.dtype}{self.labels.shape}")

    @classmethod
    def of(cls, data: PairData) -> Pairs:
        """Every record of ``data`` once, in order."""
        every = np.arange(len(data), dtype=np.int64)
        return cls(data, every, every, data.labels)

    @property
    def source(self) -> str:
        return self.data.source

    def __len__(self) -> int:
        return self.labels.shape[0]

    def materialize(self) -> PairData:
        """The records as a PairData of their own (tokens copied)."""
        return PairData(self.data.in0.take(self.i0), self.data.in1.take(self.i1), self.labels,
                        self.data.source, self.data.truncated)


# --------------------------------------------------------------------------- channels


class _Record(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """One JSON Lines record (spec §3.2). ``float`` also accepts JSON integers."""

    label: float
    in0: list[int]
    in1: list[int]


_RECORD = msgspec.json.Decoder(_Record)
_AT_PATH = re.compile(r"(.*) - at `\$(.*)`")


def read_channel(path: str | Path, config: Config, *, name: str = "train") -> PairData:
    """Read a JSON Lines channel: a file, or every regular file under a directory.

    Files are read in sorted path order; hidden files and directories (``.name``) are
    skipped, as are blank lines. Sequences longer than the encoder's max_seq_len keep
    their first max_seq_len tokens.

    Args:
        path: the channel file or directory (e.g. ``/opt/ml/input/data/train``).
        config: gives num_classes/output_layer (label rules), vocab_size and max_seq_len.
        name: the channel name, for messages.

    Returns:
        The records, in file order.

    Raises:
        DataError: on the first bad record, naming file:line, the field and what was expected.
    """
    start = time.perf_counter()
    files = _channel_files(Path(path), name)
    acc = _Columns()
    with _gc_paused():
        for file in files:
            _read_file(file, config, acc)
    if not acc.labels.size:
        raise DataError(f"channel {name}: no records in {path}")
    data = acc.build(str(path))
    log.info("%s: read %s records from %d file(s) in %.1f s (%s in0 tokens, %s in1 tokens)",
             name, f"{len(data):,}", len(files), time.perf_counter() - start,
             f"{data.in0.tokens.size:,}", f"{data.in1.tokens.size:,}")
    if any(data.truncated):
        # Same opening words as SageMaker's log line (spec §3.2), then the counts.
        log.warning("One or more sequences have been truncated because they exceeded max_seq_len: "
                    "%s: %s in0 sequences (enc0 max_seq_len=%d), %s in1 sequences "
                    "(enc1 max_seq_len=%d)", name, f"{data.truncated[0]:,}",
                    config.enc0.max_seq_len, f"{data.truncated[1]:,}", config.enc1.max_seq_len)
    return data


@contextlib.contextmanager
def _gc_paused():
    """Pause the cyclic GC: decoding allocates millions of short-lived lists (no cycles), and
    collections triggered by them cost ~30% of the read time."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _channel_files(path: Path, name: str) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"channel {name}: {path} does not exist")
    files = sorted(p for p in path.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise DataError(f"channel {name}: no files in directory {path}")
    return files


class _Buffer:
    """An append-only 1-D array that doubles its capacity.

    Large blocks are mmapped, so an outgrown block goes straight back to the OS; keeping
    a list of ~1 MiB chunk arrays instead left them stranded in malloc's heap (peak RSS
    2x the result). Unused capacity is never touched, so it never becomes resident.
    """

    def __init__(self, dtype) -> None:
        self.array = np.empty(1 << 16, dtype)
        self.size = 0

    def append(self, values: np.ndarray) -> None:
        end = self.size + values.size
        if end > self.array.size:
            grown = np.empty(max(end, 2 * self.array.size), self.array.dtype)
            grown[:self.size] = self.array[:self.size]
            self.array = grown
        self.array[self.size:end] = values  # casts, e.g. int64 -> int32 ids
        self.size = end

    def view(self) -> np.ndarray:
        return self.array[:self.size]


class _Columns:
    """The channel's arrays, grown chunk by chunk."""

    def __init__(self) -> None:
        self.tokens = (_Buffer(np.int32), _Buffer(np.int32))
        self.lengths = (_Buffer(np.int64), _Buffer(np.int64))
        self.labels = _Buffer(np.float32)
        self.truncated = [0, 0]

    def build(self, source: str) -> PairData:
        sides = [Ragged(self.tokens[s].view(), _offsets(self.lengths[s].view())) for s in (0, 1)]
        return PairData(sides[0], sides[1], self.labels.view(), source,
                        (self.truncated[0], self.truncated[1]))


def _line_chunks(f) -> Iterator[tuple[int, bytes]]:
    """Yield (number of the first line, bytes of whole lines) about _CHUNK_BYTES at a time."""
    line_no, rest = 1, b""
    block = f.read(_CHUNK_BYTES).removeprefix(_BOM)  # editors on Windows add one
    while block:
        buf = rest + block
        cut = buf.rfind(b"\n") + 1
        if cut:
            yield line_no, buf[:cut]
            line_no += buf.count(b"\n", 0, cut)
        rest = buf[cut:]
        block = f.read(_CHUNK_BYTES)
    if rest:
        yield line_no, rest


def _is_record(line: bytes) -> bool:
    return bool(line) and not line.isspace()


def _read_file(file: Path, config: Config, acc: _Columns) -> None:
    with open(file, "rb") as f:
        for first_line, chunk in _line_chunks(f):
            lines = chunk.split(b"\n")
            where = functools.partial(_where, file, first_line, lines)
            try:
                # Inline _is_record: a function call per line costs ~5% of the read.
                records = [_RECORD.decode(line) for line in lines if line and not line.isspace()]
            except (msgspec.MsgspecError, UnicodeDecodeError):  # a bad key's UTF-8: the latter
                records, error = _decode_until_error(file, first_line, lines)
                _add_chunk(records, config, acc, where)  # an earlier line's problem comes first
                raise error from None
            if records:
                _add_chunk(records, config, acc, where)


def _add_chunk(records: list[_Record], config: Config, acc: _Columns, where) -> None:
    """Check and append one chunk; ``where(i)`` gives "file:line" of record i of the chunk.

    Raises:
        DataError: for the chunk's first record (in file order) with a bad label or id.
    """
    n = len(records)
    problems: list[tuple[int, str]] = []  # (record, message); the smallest record is reported
    labels = np.fromiter((r.label for r in records), np.float64, count=n)
    bad, expected = _bad_label(labels, config)
    if bad is not None:
        problems.append((bad, f'field "label": expected {expected}, got {_num(labels[bad])}'))
    for side, enc in enumerate(config.encoders):
        seqs = [r.in1 if side else r.in0 for r in records]
        lengths = np.fromiter(map(len, seqs), np.int64, count=n)
        try:
            tokens = np.fromiter(itertools.chain.from_iterable(seqs), np.int64,
                                 count=int(lengths.sum()))
        except OverflowError:  # an id beyond int64: certainly out of range, find it in Python
            tokens = None
        bad_id = _first_bad_id(seqs, tokens, lengths, enc.vocab_size)
        if bad_id is not None:
            rec, pos, value = bad_id
            message = _vocab_message(value, side, config)
            problems.append((rec, f'field "in{side}[{pos}]": {message}'))
            continue
        over = lengths > enc.max_seq_len
        if over.any():  # keep each sequence's first max_seq_len tokens (spec §3.2)
            rank = np.arange(tokens.size) - np.repeat(_offsets(lengths)[:-1], lengths)
            tokens = tokens[rank < enc.max_seq_len]
            lengths = np.minimum(lengths, enc.max_seq_len)
            acc.truncated[side] += int(over.sum())
        acc.tokens[side].append(tokens)
        acc.lengths[side].append(lengths)
    if problems:
        rec, message = min(problems)
        raise DataError(f"{where(rec)}: {message}")
    acc.labels.append(labels)


def _bad_label(labels: np.ndarray, config: Config) -> tuple[int | None, str]:
    """Index of the first label that breaks the output layer's rule, and the rule."""
    if config.is_regression:
        with np.errstate(over="ignore"):
            ok = np.isfinite(labels.astype(np.float32))
        expected = "a number within float32 range (output_layer=mean_squared_error)"
    else:
        c = config.num_classes
        # Integral floats (1.0) are class 1: exports from pandas write labels that way.
        ok = (labels >= 0) & (labels < c) & (labels == np.floor(labels))
        expected = f"a class index in 0..{c - 1} (output_layer=softmax, num_classes={c})"
    return (None if ok.all() else int(np.argmin(ok))), expected


def _first_bad_id(seqs, tokens, lengths, vocab_size) -> tuple[int, int, int] | None:
    """(record, position, id) of the first token id outside [0, vocab_size), or None."""
    if tokens is not None:
        if not tokens.size or (tokens.min() >= 0 and tokens.max() < vocab_size):
            return None
        i = int(np.flatnonzero((tokens < 0) | (tokens >= vocab_size))[0])
        ends = np.cumsum(lengths)
        rec = int(np.searchsorted(ends, i, side="right"))
        return rec, i - int(ends[rec] - lengths[rec]), int(tokens[i])
    for rec, seq in enumerate(seqs):
        for pos, value in enumerate(seq):
            if not 0 <= value < vocab_size:
                return rec, pos, value
    return None


def _vocab_message(value: int, side: int, config: Config) -> str:
    vocab = config.encoders[side].vocab_size
    # Issue #834: enc1 silently inheriting enc0's vocab_size is the classic trap; say so.
    setting = ("enc0_vocab_size, which enc1 inherits because enc1_network=enc0"
               if side == 1 and config.enc1_is_enc0 else f"enc{side}_vocab_size")
    problem = "is negative" if value < 0 else f"is not less than vocab_size={vocab}"
    return f'Vocab id "{value}" {problem} ({setting}; ids must be in [0, {vocab}), 0 is padding)'


def _where(file: Path, first_line: int, lines: list[bytes], record: int) -> str:
    """ "file:line" of the record-th non-blank line of a chunk."""
    rank = -1
    for k, line in enumerate(lines):
        rank += _is_record(line)
        if rank == record:
            return f"{file}:{first_line + k}"
    raise AssertionError("record index beyond chunk")


def _decode_until_error(file: Path, first_line: int,
                        lines: list[bytes]) -> tuple[list[_Record], DataError]:
    """The records before the chunk's first undecodable line, and the error for that line."""
    records = []
    for k, line in enumerate(lines):
        if not _is_record(line):
            continue
        try:
            records.append(_RECORD.decode(line))
        except msgspec.MsgspecError as e:
            return records, DataError(f"{file}:{first_line + k}: {_describe(e)}")
        except UnicodeDecodeError:  # in an object key (msgspec's position is the key's)
            return records, DataError(f"{file}:{first_line + k}: {_utf8_problem(line)}")
    raise AssertionError("chunk failed to decode but every line decodes")


def _utf8_error_at(data: bytes) -> int:
    """The offset of the first byte that is not UTF-8 (len(data) if there is none)."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start
    return len(data)


def _utf8_problem(line: bytes) -> str:
    """Where a line stops being UTF-8, as a message."""
    at = _utf8_error_at(line)
    if at == len(line):
        return "not valid UTF-8"
    return f"not valid UTF-8: byte 0x{line[at]:02x} at column {at + 1}"


def _describe(error: msgspec.MsgspecError) -> str:
    """msgspec's message in our words: the field and what was expected."""
    text = str(error)
    if not isinstance(error, msgspec.ValidationError):  # (a subclass of DecodeError)
        if text == "Input data was truncated":
            return "malformed JSON: the line ends inside the record"
        return f"malformed JSON: {text.removeprefix('JSON is malformed: ')}"
    fields = '"label", "in0" and "in1"'
    if m := re.fullmatch(r"Object missing required field `(.*)`", text):
        return f'field "{m[1]}": missing (every record needs {fields})'
    if m := re.fullmatch(r"Object contains unknown field `(.*)`", text):
        return f'field "{m[1]}": unknown field (a record has exactly {fields})'
    m = _AT_PATH.fullmatch(text)
    message, field = (m[1], m[2].lstrip(".")) if m else (text, "")
    got = re.fullmatch(r"Expected `.*`, got `(.*)`", message)
    if got is None:
        return f'field "{field}": {message}' if field else message
    if field == "":
        expected = f"a JSON object with {fields}"
    elif field == "label":
        expected = "a number"
    elif field in ("in0", "in1"):
        expected = "array of integers"
    else:
        expected = "an integer token id"
    return (f'field "{field}": ' if field else "") + f"expected {expected}, got {got[1]}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


# --------------------------------------------------------------------------- auxiliary


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """Pretrained token vectors for one encoder, aligned to its token ids."""

    vectors: np.ndarray  # float32 (V, D): the file's vector where found, 0 elsewhere
    found: np.ndarray  # bool (V,): rows initialised from the file (others keep the default init)


def read_auxiliary(aux_dir: str | Path | None,
                   config: Config) -> tuple[Pretrained | None, Pretrained | None]:
    """Load each encoder's pretrained embeddings from the auxiliary channel (spec §3.4).

    An encoder gets vectors when ``encX_pretrained_embedding_file`` is set; its
    ``encX_vocab_file`` (token -> id JSON) aligns the file's rows with token ids. Encoders
    naming the same files (e.g. ``enc1_network=enc0``) share one loaded object.

    Raises:
        DataError: missing channel or file, pretrained file without vocab file, vocab id
            outside [0, vocab_size), or a vector whose size is not token_embedding_dim.
    """
    loaded: dict[tuple, Pretrained] = {}
    out: list[Pretrained | None] = []
    for side, enc in enumerate(config.encoders):
        prefix = "enc0" if side == 1 and config.enc1_is_enc0 else f"enc{side}"
        if not enc.pretrained_embedding_file:
            if enc.vocab_file and prefix == f"enc{side}":
                log.info("%s_vocab_file=%s is only used to align %s_pretrained_embedding_file, "
                         "which is not set; ignoring it", prefix, enc.vocab_file, prefix)
            out.append(None)
            continue
        key = (enc.vocab_file, enc.pretrained_embedding_file, enc.vocab_size,
               enc.token_embedding_dim)
        if key not in loaded:
            loaded[key] = _load_pretrained(aux_dir, f"enc{side}", prefix, enc)
        out.append(loaded[key])
    return out[0], out[1]


def _aux_file(aux_dir: str | Path | None, setting: str, file_name: str) -> Path:
    if aux_dir is None:
        raise DataError(f"{setting}={file_name} needs the auxiliary channel, but none was given")
    path = Path(aux_dir) / file_name
    if not path.is_file():
        present = sorted(p.name for p in Path(aux_dir).iterdir()) if Path(aux_dir).is_dir() else []
        raise DataError(f"auxiliary channel {aux_dir}: {setting}={file_name} not found "
                        f"(files present: {', '.join(present) or 'none'})")
    return path


def _load_pretrained(aux_dir, encoder: str, prefix: str, enc) -> Pretrained:
    if not enc.vocab_file:
        raise DataError(f"{prefix}_pretrained_embedding_file={enc.pretrained_embedding_file} "
                        f"needs {prefix}_vocab_file (token -> id JSON) to align its rows with ids")
    vocab_path = _aux_file(aux_dir, f"{prefix}_vocab_file", enc.vocab_file)
    vectors_path = _aux_file(aux_dir, f"{prefix}_pretrained_embedding_file",
                             enc.pretrained_embedding_file)
    vocab = _load_vocab(vocab_path, enc.vocab_size, prefix)
    result, matched = _load_vectors(vectors_path, vocab, enc.vocab_size, enc.token_embedding_dim,
                                    prefix)
    log.info("%s: %s of %s vocab tokens found in %s (%.1f%%)", encoder, f"{matched:,}",
             f"{len(vocab):,}", vectors_path.name, 100.0 * matched / max(len(vocab), 1))
    return result


def _load_vocab(path: Path, vocab_size: int, prefix: str) -> dict[bytes, int]:
    """token -> id JSON as {utf-8 token: id}, every id checked against vocab_size."""
    data = path.read_bytes()
    try:
        vocab = msgspec.json.decode(data, type=dict[str, int])
    except msgspec.MsgspecError as e:
        raise DataError(f"{path}: expected a JSON object mapping token -> integer id "
                        f"({e})") from None
    except UnicodeDecodeError:  # in a key: msgspec does not wrap it
        lines = data.split(b"\n")
        line = data.count(b"\n", 0, _utf8_error_at(data))  # from 0
        raise DataError(f"{path}:{line + 1}: tokens must be UTF-8; "
                        f"{_utf8_problem(lines[line])}") from None
    # Clamp before converting so that ids beyond int64 still reach the range message.
    ids = np.fromiter((min(max(i, -1), vocab_size) for i in vocab.values()), np.int64,
                      count=len(vocab))
    bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
    if bad.size:
        token, value = next(itertools.islice(vocab.items(), int(bad[0]), None))
        raise DataError(f'{path}: token "{token}": id {value} is not in [0, {vocab_size}) '
                        f"({prefix}_vocab_size={vocab_size})")
    return {token.encode(): i for token, i in vocab.items()}


def _load_vectors(path: Path, vocab: dict[bytes, int], vocab_size: int, dim: int,
                  prefix: str) -> tuple[Pretrained, int]:
    """Parse a GloVe/word2vec text file, keeping only rows of vocab tokens (first wins)."""
    setting = f"{prefix}_token_embedding_dim={dim}"
    ids, rows, line_nos = [], [], []
    seen: set[bytes] = set()
    # A line is parsed further only if its first word is a vocab token or the first word
    # of one ("new" for "new york": glove.840B has tokens with spaces).
    heads = set(vocab).union(token.split(b" ", 1)[0] for token in vocab if b" " in token)
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if line_no == 1:
                fields = line.split()
                if len(fields) == 2 and all(x.isdigit() for x in fields):  # word2vec "count dim"
                    if int(fields[1]) != dim:
                        raise DataError(f"{path}:1: header says {int(fields[1])} dimensions, "
                                        f"expected {setting}")
                    continue
                if len(fields) - 1 != dim:  # fail fast even when no token of line 1 matches
                    raise DataError(f"{path}:1: {len(fields) - 1} values after the token, "
                                    f"expected {setting}")
            space = line.find(b" ")
            if space < 0:  # a bare token (or a blank line): no values to keep
                space = len(line)
            word = line[:space].rstrip()
            if word not in heads:  # most lines: one set probe, no float parsing
                continue
            rest = line[space + 1:]
            if rest.count(b" ") != dim - 1:  # odd spacing or a token containing spaces
                values = rest.split()
                if len(values) < dim:
                    raise DataError(f"{path}:{line_no}: {len(values)} values after the token, "
                                    f"expected {setting}")
                word = b" ".join([word, *values[:-dim]])
                rest = b" ".join(values[-dim:])
            if word not in vocab or word in seen:
                continue
            seen.add(word)
            ids.append(vocab[word])
            rows.append(rest)
            line_nos.append(line_no)
    vectors = np.zeros((vocab_size, dim), np.float32)
    found = np.zeros(vocab_size, bool)
    if rows:
        matrix = _parse_rows(path, rows, line_nos, dim)
        bad = ~np.isfinite(matrix).all(axis=1)
        if bad.any():
            raise DataError(f"{path}:{line_nos[int(np.argmax(bad))]}: expected finite numbers")
        vectors[ids] = matrix
        found[ids] = True
    return Pretrained(vectors, found), len(seen)


def _parse_rows(path: Path, rows: list[bytes], line_nos: list[int], dim: int) -> np.ndarray:
    """float32 (R, dim) from R lines of ``dim`` space-separated numbers, in one C parse."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # numpy < 2.3 only warns on junk
        try:
            flat = np.fromstring(b" ".join(rows), dtype=np.float32, sep=" ")
        except (ValueError, DeprecationWarning):
            flat = None
        if flat is None or flat.size != len(rows) * dim:
            for row, line_no in zip(rows, line_nos):
                try:
                    ok = np.fromstring(row, dtype=np.float32, sep=" ").size == dim
                except (ValueError, DeprecationWarning):
                    ok = False
                if not ok:
                    raise DataError(f"{path}:{line_no}: expected {dim} numbers after the token")
            raise AssertionError("rows failed to parse together but each parses")
    return flat.reshape(len(rows), dim)


# --------------------------------------------------------------------------- negative sampling

_MAX_REDRAWS = 50
_HASH_MULT = np.uint64(0x100000001B3)  # FNV-1 64-bit prime: odd, so every power is invertible


def negative_sample(data: PairData, k: int, rng: np.random.Generator) -> PairData:
    """:func:`negative_pairs` with the tokens copied out: ``data`` itself when nothing is
    sampled, else a PairData of the records followed by their negatives."""
    pairs = negative_pairs(data, k, rng)
    return data if len(pairs) == len(data) else pairs.materialize()


def negative_pairs(data: PairData, k: int, rng: np.random.Generator) -> Pairs:
    """The records plus ``k`` negatives (label 0) per positive (label 1) record (spec §3.7).

    A negative keeps its anchor's in0 and takes the in1 of a record drawn uniformly from
    the whole channel, never the anchor itself and, when the data allows, never a record
    whose in1 equals the anchor's in1. Records with a label other than 1 pass through
    unchanged and are not anchors. Call once per epoch with a fresh ``rng``.

    Returns:
        ``len(data) + k * n_positive`` records, as indices into ``data``: the input, then
        the negatives.
    """
    if k < 0:
        raise ValueError(f"negative sampling rate must be >= 0, got {k}")
    anchors = np.repeat(np.flatnonzero(data.labels == 1), k)
    if anchors.size == 0:
        if k:
            log.warning("negative sampling: %s has no records with label 1; nothing to sample",
                        data.source)
        return Pairs.of(data)
    n = len(data)
    if n < 2:
        raise ValueError("negative sampling needs at least 2 records")
    # Uniform over the n-1 other records: draw in [0, n-1) and skip over the anchor.
    draw = rng.integers(0, n - 1, anchors.size)
    draw += draw >= anchors
    # The same in1 object as the anchor's own would be a false negative: redraw those.
    content = data.in1.content_hash
    for attempt in range(_MAX_REDRAWS + 1):
        same = np.flatnonzero(content[draw] == content[anchors])
        if same.size == 0:
            break
        if attempt == _MAX_REDRAWS:
            log.warning("negative sampling: %s of %s negatives share their anchor's in1 (too "
                        "few distinct in1 objects to avoid it)", f"{same.size:,}",
                        f"{anchors.size:,}")
            break
        redraw = rng.integers(0, n - 1, same.size)
        draw[same] = redraw + (redraw >= anchors[same])
    every = np.arange(n, dtype=np.int64)
    labels = np.concatenate([data.labels, np.zeros(anchors.size, np.float32)])
    return Pairs(data, np.concatenate([every, anchors]), np.concatenate([every, draw]), labels)


def _content_hash(r: Ragged) -> np.ndarray:
    """uint64 (N,) content hash: equal sequences hash equal; sequences that differ in one
    token never collide."""
    lengths = r.lengths
    rank = np.arange(r.tokens.size) - np.repeat(r.offsets[:-1], lengths)
    powers = np.cumprod(np.full(int(lengths.max(initial=0)) + 1, _HASH_MULT))  # wraps mod 2^64
    terms = (r.tokens.astype(np.uint64) + np.uint64(1)) * powers[rank]
    sums = np.zeros(r.tokens.size + 1, np.uint64)
    np.cumsum(terms, out=sums[1:])
    return (sums[r.offsets[1:]] - sums[r.offsets[:-1]]) ^ (lengths.astype(np.uint64) * _HASH_MULT)
