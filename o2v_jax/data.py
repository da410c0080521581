"""Channels -> compact arrays: JSON Lines training, validation and test records.

A channel (spec §3.1) is a JSON Lines file or a directory of them, one record per line:
``{"label": 1, "in0": [6, 17, 606], "in1": [16, 21]}`` (spec §3.2). :func:`read_channel`
turns it into a :class:`PairData` whose token ids live in flat int32 arrays
(:class:`~o2v_jax.ragged.Ragged`), never in lists of lists, so a million-record channel
costs little more memory than its tokens. Bad input stops the read with a
:class:`DataError` naming the file, the line, the field and what was expected.
docs/data.md has the rules and the reasons for each choice. The auxiliary channel is
:mod:`o2v_jax.pretrained`; negative sampling is :mod:`o2v_jax.sampling`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import msgspec
import numpy as np

from o2v_jax.config import Config
from o2v_jax.ragged import Ragged, TokenRangeError, check_tokens, flatten, offsets

log = logging.getLogger("o2v_jax")

_CHUNK_BYTES = 1 << 20  # decode ~1 MiB of lines at a time: bounded memory, cache friendly
_BOM = b"\xef\xbb\xbf"


class DataError(ValueError):
    """Bad input: the message names file:line (or the file), the field and what was expected."""


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



# --------------------------------------------------------------------------- channels


class Record(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """One record (spec §3.2). ``float`` also accepts JSON integers. Records from Python
    are converted to it too (:mod:`o2v_jax.records`), so both get the same type checks."""

    label: float
    in0: list[int]
    in1: list[int]


class _PairRecord(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A record of a retrieval pairs file: the label may be left out (= 1, relevant)."""

    in0: list[int]
    in1: list[int]
    label: float = 1.0


_RECORD = msgspec.json.Decoder(Record)
_PAIR_RECORD = msgspec.json.Decoder(_PairRecord)
_AT_PATH = re.compile(r"(.*) - at `\$(.*)`")


def read_channel(path: str | Path, config: Config, *, name: str = "train",
                 pairs: bool = False) -> PairData:
    """Read a JSON Lines channel: a file, or every regular file under a directory.

    Files are read in sorted path order; hidden files and directories (``.name``) are
    skipped, as are blank lines. Sequences longer than the encoder's max_seq_len keep
    their first max_seq_len tokens.

    Args:
        path: the channel file or directory (e.g. ``/opt/ml/input/data/train``).
        config: gives num_classes/output_layer (label rules), vocab_size and max_seq_len.
        name: the channel name, for messages.
        pairs: read a retrieval pairs file instead (``o2v evaluate --retrieval``): every
            record still needs ``in0`` and ``in1``, but its label may be left out, which
            reads as 1 (relevant), and a label must be 1 or 0 (a candidate only)
            whatever the output layer. Training channels keep the strict format.

    Returns:
        The records, in file order.

    Raises:
        DataError: on the first bad record, naming file:line, the field and what was expected.
    """
    start = time.perf_counter()
    files = _channel_files(Path(path), name)
    acc = Columns()
    with gc_paused():
        for file in files:
            _read_file(file, config, acc, pairs)
    if not acc.labels.size:
        raise DataError(f"channel {name}: no records in {path}")
    data = acc.build(str(path))
    log.info("%s: read %s records from %d file(s) in %.1f s (%s in0 tokens, %s in1 tokens)",
             name, f"{len(data):,}", len(files), time.perf_counter() - start,
             f"{data.in0.tokens.size:,}", f"{data.in1.tokens.size:,}")
    log_truncated(data, config, name)
    return data


def log_truncated(data: PairData, config: Config, name: str) -> None:
    """Warn once per channel when sequences were cut to max_seq_len."""
    if any(data.truncated):
        # Same opening words as SageMaker's log line (spec §3.2), then the counts.
        log.warning("One or more sequences have been truncated because they exceeded max_seq_len: "
                    "%s: %s in0 sequences (enc0 max_seq_len=%d), %s in1 sequences "
                    "(enc1 max_seq_len=%d)", name, f"{data.truncated[0]:,}",
                    config.enc0.max_seq_len, f"{data.truncated[1]:,}", config.enc1.max_seq_len)


@contextlib.contextmanager
def gc_paused():
    """Pause the cyclic GC: decoding allocates millions of short-lived lists (no cycles), and
    the collections they trigger would scan them all for nothing."""
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

    Large blocks are mmapped, so an outgrown block goes straight back to the OS; a list of
    per-chunk arrays instead left them stranded in malloc's heap (a peak RSS well above
    the result's size). Unused capacity is never touched, so it never becomes resident.
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


# Per side: ids int64 (T,), lengths int64 (n,), and the caller's lists (or None).
Sides = tuple[np.ndarray, np.ndarray, "Sequence[Sequence[int]] | None"]


class Columns:
    """The channel's arrays, grown chunk by chunk; :meth:`add` checks each chunk."""

    def __init__(self) -> None:
        self.tokens = (_Buffer(np.int32), _Buffer(np.int32))
        self.lengths = (_Buffer(np.int64), _Buffer(np.int64))
        self.labels = _Buffer(np.float32)
        self.truncated = [0, 0]

    def build(self, source: str) -> PairData:
        sides = [Ragged(self.tokens[s].view(), offsets(self.lengths[s].view())) for s in (0, 1)]
        return PairData(sides[0], sides[1], self.labels.view(), source,
                        (self.truncated[0], self.truncated[1]))

    def add(self, labels: np.ndarray, sides: Sequence[Sides], config: Config,
            where: Callable[[int], str], pairs: bool = False) -> None:
        """Check one chunk of records and append it.

        Args:
            labels: float64 (n,).
            sides: per side, ``(ids int64 (T,), lengths int64 (n,), seqs)`` where ``seqs``
                are the caller's lists (to read an id beyond int64 back) or None.
            config: label rules, vocab_size and max_seq_len.
            where: record index within the chunk -> its place, for messages
                ("file:line", or a record path like "train[3]").
            pairs: the labels of a retrieval pairs file (1 or 0, read_channel).

        Raises:
            DataError: for the chunk's first record (in order) with a bad label or id,
                as ``"<where>: field "<name>": <what was expected>"``.
        """
        problems: list[tuple[int, str]] = []  # (record, message); the smallest record is reported
        bad, expected = _bad_pair_label(labels) if pairs else _bad_label(labels, config)
        if bad is not None:
            problems.append((bad, f'field "label": expected {expected}, got {_num(labels[bad])}'))
        checked = []
        for side, (enc, (tokens, lengths, seqs)) in enumerate(zip(config.encoders, sides)):
            try:
                # Sequences longer than max_seq_len keep their first max_seq_len ids (spec §3.2).
                checked.append(check_tokens(tokens, lengths, enc.vocab_size, enc.max_seq_len))
            except TokenRangeError as e:
                value = e.value if seqs is None else seqs[e.row][e.position]
                problems.append((e.row, f'field "in{side}[{e.position}]": '
                                        f'{_vocab_message(value, side, config)}'))
        if problems:
            rec, message = min(problems)
            raise DataError(f"{where(rec)}: {message}")
        for side, (ids, cut) in enumerate(checked):
            self.truncated[side] += cut
            self.tokens[side].append(ids.tokens)
            self.lengths[side].append(ids.lengths)
        self.labels.append(labels)


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


def _read_file(file: Path, config: Config, acc: Columns, pairs: bool = False) -> None:
    decoder = _PAIR_RECORD if pairs else _RECORD
    with open(file, "rb") as f:
        for first_line, chunk in _line_chunks(f):
            lines = chunk.split(b"\n")
            where = functools.partial(_where, file, first_line, lines)
            try:
                # _is_record inlined: this is the per-line hot loop of a channel read.
                records = [decoder.decode(line) for line in lines if line and not line.isspace()]
            except (msgspec.MsgspecError, UnicodeDecodeError):  # a bad key's UTF-8: the latter
                records, error = _decode_until_error(file, first_line, lines, decoder)
                add_records(records, config, acc, where, pairs)  # an earlier line's problem comes first
                raise error from None
            if records:
                add_records(records, config, acc, where, pairs)


def add_records(records: Sequence[Record], config: Config, acc: Columns,
                where: Callable[[int], str], pairs: bool = False) -> None:
    """Check and append decoded records (:meth:`Columns.add`); ``where(i)`` places record i."""
    labels = np.fromiter((r.label for r in records), np.float64, count=len(records))
    sides = []
    for side in (0, 1):
        seqs = [r.in1 if side else r.in0 for r in records]
        sides.append((*flatten(seqs), seqs))  # msgspec checked the types: flatten cannot fail
    acc.add(labels, sides, config, where, pairs)


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


def _bad_pair_label(labels: np.ndarray) -> tuple[int | None, str]:
    """The first label of a retrieval pairs file that is neither 1 nor 0."""
    ok = (labels == 0) | (labels == 1)
    return (None if ok.all() else int(np.argmin(ok))), \
        "1 (relevant) or 0 (a candidate only), or no label (relevant)"


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


def _decode_until_error(file: Path, first_line: int, lines: list[bytes],
                        decoder: msgspec.json.Decoder = _RECORD) -> tuple[list[Record], DataError]:
    """The records before the chunk's first undecodable line, and the error for that line."""
    records = []
    for k, line in enumerate(lines):
        if not _is_record(line):
            continue
        try:
            records.append(decoder.decode(line))
        except msgspec.MsgspecError as e:
            return records, DataError(f"{file}:{first_line + k}: "
                                      f"{describe(e, pairs=decoder is _PAIR_RECORD)}")
        except UnicodeDecodeError:  # in an object key (msgspec's position is the key's)
            return records, DataError(f"{file}:{first_line + k}: {utf8_problem(line)}")
    raise AssertionError("chunk failed to decode but every line decodes")


def utf8_error_at(data: bytes) -> int:
    """The offset of the first byte that is not UTF-8 (len(data) if there is none)."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start
    return len(data)


def utf8_problem(line: bytes) -> str:
    """Where a line stops being UTF-8, as a message."""
    at = utf8_error_at(line)
    if at == len(line):
        return "not valid UTF-8"
    return f"not valid UTF-8: byte 0x{line[at]:02x} at column {at + 1}"


def describe(error: msgspec.MsgspecError, pairs: bool = False) -> str:
    """msgspec's message in our words: the field and what was expected."""
    text = str(error)
    if not isinstance(error, msgspec.ValidationError):  # (a subclass of DecodeError)
        if text == "Input data was truncated":
            return "malformed JSON: the line ends inside the record"
        return f"malformed JSON: {text.removeprefix('JSON is malformed: ')}"
    fields = '"label", "in0" and "in1"'
    if pairs:  # retrieval: in0 queries rank in1 candidates
        fields = '"in0" (the query) and "in1" (a candidate), and optionally "label"'
    if m := re.fullmatch(r"Object missing required field `(.*)`", text):
        return f'field "{m[1]}": missing (every record needs {fields})'
    if m := re.fullmatch(r"Object contains unknown field `(.*)`", text):
        return f'field "{m[1]}": unknown field (a record has {"" if pairs else "exactly "}{fields})'
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

