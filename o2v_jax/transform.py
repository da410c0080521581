"""Batch transform: score or embed whole files offline, as SageMaker batch transform does.

``o2v transform --model-dir M --input PATH --output DIR`` reads each input file line by
line (SageMaker's ``SplitType=Line``), groups lines into mini-batches of at most
``--max-payload`` MB (``MultiRecord``) or sends one line at a time (``SingleRecord``),
answers them through :func:`o2v_jax.app.respond`, the server's request path (a
mini-batch that cannot be one request is decoded line by line and answered one model
call per kind, :mod:`o2v_jax.batcher`), and writes ``<name>.out`` with exactly one
output line per input line, in order (``AssembleWith=Line``). Files stream:
memory holds one mini-batch, never a whole file. Output goes to ``<name>.out.tmp`` and
is renamed when complete, so a ``.out`` file is never partial.

Input and output per line (docs/inference.md, "Batch transform"):

* ``application/jsonlines`` (default): a line is one instance, ``{"in0": [...], "in1":
  [...]}`` or ``{"in0": [...]}``; its output line is ``{"scores": [...]}`` or
  ``{"embeddings": [...]}``. With ``--accept application/json`` the output line is
  ``{"predictions": [{...}]}`` instead (one record each).
* ``application/json``: a line is a whole request ``{"instances": [...]}``; its output
  line is the response ``{"predictions": [...]}``.
* A blank input line gives a blank output line. A bad line stops the run with
  ``file:line`` in the message; with ``--skip-bad-lines`` its output line is
  ``{"error": "...", "line": N}`` and the run goes on.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec

from o2v_jax import app, batcher, media, wire
from o2v_jax.data import DataError
from o2v_jax.env import BATCH_STRATEGIES, MAX_PAYLOAD_MB, batch_strategy
from o2v_jax.progress import bar as progress_bar

log = logging.getLogger("o2v_jax")

DEFAULT_MAX_PAYLOAD_MB = 6.0  # SageMaker's default MaxPayloadInMB
MB = 1 << 20
OUT_SUFFIX = ".out"

_ENCODER = msgspec.json.Encoder()
_BOM = b"\xef\xbb\xbf"
# A small valid body per request type: decoding it checks a Content-Type (charset,
# infer_max_seqlens) once before any file is read, so a bad flag is not a "bad line".
_PROBES = {media.JSON: b'{"instances": [{"in0": [0]}]}', media.JSONLINES: b'{"in0": [0]}'}


class TransformError(DataError):
    """A bad input line (the message starts with file:line) or bad transform settings."""


@dataclasses.dataclass
class TransformStats:
    """What a transform did."""

    files: int = 0  # input files transformed
    lines: int = 0  # input lines read (= output lines written)
    records: int = 0  # instances answered
    bad_lines: int = 0  # lines written as {"error": ...} (--skip-bad-lines)
    bytes: int = 0  # input bytes read
    seconds: float = 0.0

    def add(self, other: TransformStats) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclasses.dataclass(frozen=True)
class Settings:
    """Validated transform settings (the request and response formats, batching)."""

    content_type: str  # the Content-Type sent with each mini-batch (may carry parameters)
    request_type: str  # media.JSON or media.JSONLINES
    response_type: str  # media.JSON or media.JSONLINES
    strategy: str  # env.BATCH_STRATEGIES: MULTI_RECORD | SINGLE_RECORD
    max_payload: int  # bytes per mini-batch
    skip_bad_lines: bool


def strategy_name(strategy: str) -> str:
    """SageMaker's API spelling of a batch strategy, as the CLI shows it: MULTI_RECORD ->
    MultiRecord (the container variable spells it the other way; both are accepted)."""
    return strategy.title().replace("_", "")


def settings(predictor, *, content_type: str = media.JSONLINES, accept: str | None = None,
             strategy: str = "MultiRecord", max_payload_mb: float = DEFAULT_MAX_PAYLOAD_MB,
             skip_bad_lines: bool = False) -> Settings:
    """Check the transform options once, before any file is read.

    ``strategy`` takes any of SageMaker's spellings (MultiRecord, MULTI_RECORD, any case).

    Raises:
        TransformError: an unsupported content type, accept, strategy or payload size.
    """
    chosen = batch_strategy(str(strategy))
    if chosen is None:
        raise TransformError(f"strategy {strategy!r} is invalid; expected one of "
                             f"{', '.join(map(strategy_name, BATCH_STRATEGIES))}")
    if not 0 < max_payload_mb <= MAX_PAYLOAD_MB:
        raise TransformError(f"max payload {max_payload_mb} MB is invalid; expected a number in "
                             f"(0, {MAX_PAYLOAD_MB:g}] (SageMaker's MaxPayloadInMB)")
    try:
        given = media.parse_media_type(content_type)[0]
        request_type = media.JSONLINES if given in media.JSONLINES_ALIASES else given
        probe = _PROBES.get(request_type)
        if probe is None:
            raise media.WireError(415, f"unsupported content type {given!r}; use {media.JSONLINES} "
                                       f"(one instance per line) or {media.JSON}")
        app.decode(probe, content_type, predictor)
        response_type = media.negotiate(accept, request_type)
    except media.WireError as e:
        raise TransformError(str(e)) from None
    if response_type == media.NPY:
        raise TransformError(
            f"--accept {media.NPY} is for one response per request (o2v serve, "
            f"o2v_jax.app.respond); batch transform writes one JSON line per input line: use "
            f"{media.JSONLINES} or {media.JSON}")
    if request_type == media.JSON and response_type == media.JSONLINES:
        raise TransformError(
            f"--accept {media.JSONLINES} needs --content-type {media.JSONLINES}: with {media.JSON} "
            f"input a line holds several instances, and its answer must stay one line "
            f"({{\"predictions\": [...]}})")
    return Settings(content_type, request_type, response_type, chosen,
                    int(max_payload_mb * MB), skip_bad_lines)


# --------------------------------------------------------------------------- one file

def transform_file(predictor, input_path: str | Path, output_path: str | Path, *,
                   content_type: str = media.JSONLINES, accept: str | None = None,
                   strategy: str = "MultiRecord", max_payload_mb: float = DEFAULT_MAX_PAYLOAD_MB,
                   skip_bad_lines: bool = False, progress=None,
                   options: Settings | None = None) -> TransformStats:
    """Transform one file: one output line per input line, written atomically.

    Args:
        predictor: a loaded :class:`o2v_jax.predictor.Predictor`.
        input_path: JSON Lines input (``content_type`` says what a line holds).
        output_path: the output file (written as ``<output_path>.tmp``, then renamed).
        content_type, accept, strategy, max_payload_mb, skip_bad_lines: as the CLI flags.
        progress: a tqdm bar to advance by input bytes, or None.
        options: already validated settings (overrides the keyword options).

    Returns:
        TransformStats for this file.

    Raises:
        TransformError: a bad line (``file:line: path: message``) when not skipping.
    """
    opts = options or settings(predictor, content_type=content_type, accept=accept,
                               strategy=strategy, max_payload_mb=max_payload_mb,
                               skip_bad_lines=skip_bad_lines)
    input_path, output_path = Path(input_path), Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_path.with_name(output_path.name + ".tmp")
    stats = TransformStats(files=1)
    t0 = time.perf_counter()
    try:
        with open(input_path, "rb") as src, open(tmp, "wb") as dst:
            for first, lines in _mini_batches(src, opts):
                out = _answer(predictor, input_path, first, lines, opts, stats)
                dst.write(b"\n".join(out) + b"\n")
                size = sum(map(len, lines))
                stats.lines += len(lines)
                stats.bytes += size
                if progress is not None:
                    progress.update(size)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, output_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    stats.seconds = time.perf_counter() - t0
    return stats


def _mini_batches(src, opts: Settings) -> Iterator[tuple[int, list[bytes]]]:
    """(first line number, raw lines) groups of at most max_payload bytes (MultiRecord)
    or of one line (SingleRecord). A line longer than the payload is a group alone
    (reported as bad later)."""
    lines: list[bytes] = []
    first, size = 1, 0
    for number, line in enumerate(src, start=1):
        if number == 1 and line.startswith(_BOM):
            line = line[len(_BOM):]  # so "blank" means the same here as in wire.iter_lines
        if lines and (opts.strategy == "SINGLE_RECORD" or size + len(line) > opts.max_payload):
            yield first, lines
            lines, size = [], 0
        if not lines:
            first = number
        lines.append(line)
        size += len(line)
    if lines:
        yield first, lines


def _answer(predictor, path: Path, first: int, lines: list[bytes], opts: Settings,
            stats: TransformStats) -> list[bytes]:
    """Output lines (no newlines) for one mini-batch of input lines."""
    out = [b""] * len(lines)  # blank input lines stay blank
    if opts.request_type == media.JSONLINES and max(map(len, lines)) <= opts.max_payload:
        # Fast path: the whole mini-batch as one request, as SageMaker would send it,
        # answered as JSON Lines: one record per non-blank input line.
        try:
            body, _ = app.respond(b"".join(lines), opts.content_type, media.JSONLINES, predictor,
                                  first_line=first)
        except media.WireError:
            pass  # find the bad line(s) (or mixed modes) one line at a time, below
        else:
            records = body.split(b"\n")[:-1]
            if opts.response_type == media.JSON:  # the bytes encode_response(mode, row, JSON) gives
                records = [b'{"predictions":[' + r + b"]}" for r in records]
            filled = [i for i, line in enumerate(lines) if line.strip()]
            for i, record in zip(filled, records):
                out[i] = record
            stats.records += len(records)
            return out
    # One request per line; lines of the same kind are still answered with one call.
    groups: dict[tuple, list[tuple[int, wire.Request]]] = {}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        number = first + i
        try:
            if len(line) > opts.max_payload:
                raise media.WireError(413, f"line is {len(line)} bytes, more than the max payload "
                                          f"of {opts.max_payload} bytes")
            request = app.decode(line, opts.content_type, predictor, first_line=number)
        except media.WireError as e:
            if not opts.skip_bad_lines:
                raise TransformError(f"{path}:{number}: {e}") from None
            out[i] = _ENCODER.encode({"error": str(e), "line": number})
            stats.bad_lines += 1
            continue
        groups.setdefault(batcher.kind(request), []).append((i, request))
    for (mode, _), items in groups.items():
        requests = [r for _, r in items]
        values = app.compute(predictor, batcher.merge(requests))
        for (i, request), rows in zip(items, batcher.split(values, requests)):
            # JSON input: the line's whole response; JSON Lines input: its one record.
            out[i] = wire.encode_response(mode, rows, opts.response_type).removesuffix(b"\n")
            stats.records += len(request)
    return out


# --------------------------------------------------------------------------- files and dirs

def input_files(input_path: str | Path) -> list[tuple[Path, Path]]:
    """(input file, path relative to the input root) for a file or a directory tree.

    A directory is walked recursively in sorted order; hidden files and directories
    (names starting with ".") are skipped, as are ``.out`` and ``.out.tmp`` files.
    """
    root = Path(input_path)
    if root.is_file():
        return [(root, Path(root.name))]
    if not root.is_dir():
        raise TransformError(f"{root}: input not found (expected a file or a directory)")
    found = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or any(part.startswith(".") for part in rel.parts) \
                or path.name.endswith((OUT_SUFFIX, OUT_SUFFIX + ".tmp")):
            continue
        found.append((path, rel))
    if not found:
        raise TransformError(f"{root}: no input files in this directory")
    return found


def transform(predictor, input_path: str | Path, output_dir: str | Path, *,
              progress: bool = False, **options) -> TransformStats:
    """Transform a file or every file under a directory into ``output_dir``.

    ``output_dir/<relative path>.out`` per input file; the options are those of
    :func:`transform_file`.
    """
    opts = settings(predictor, **options)
    files = input_files(input_path)
    output_dir = Path(output_dir)
    total = TransformStats()
    t0 = time.perf_counter()
    with progress_bar(sum(p.stat().st_size for p, _ in files), "transform", unit="B",
                      progress=progress, unit_scale=True) as bar:
        for path, rel in files:
            out = output_dir / rel.with_name(rel.name + OUT_SUFFIX)
            stats = transform_file(predictor, path, out, options=opts, progress=bar)
            log.info("%s -> %s: %d lines, %d records, %d bad", path, out, stats.lines,
                     stats.records, stats.bad_lines)
            total.add(stats)
    total.seconds = time.perf_counter() - t0
    return total
