"""Inference wire formats: request bodies in, response bodies out (spec §5).

Pure Python + numpy, msgspec for requests and orjson for JSON responses (no jax): the
server, batch transform and tests share it. This module owns the decoded
:class:`Request` and the JSON and JSON Lines formats; :mod:`o2v_jax.media` holds the
media types, Content-Type parsing, negotiation and :class:`~o2v_jax.media.WireError`;
:mod:`o2v_jax.npz` holds our two NumPy formats (.npz requests, .npy responses), which
:func:`decode_request` and :func:`encode_response` hand over to it.
docs/inference.md shows every request and response shape and the error catalogue.

API::

    Request                              frozen: mode, encoder, in0, in1, media_type,
                                         seq_lens, truncated; len() = instance count
    decode_request(body, content_type, *, vocab_sizes, max_seq_lens,
                   max_bytes=None, first_line=1) -> Request
    encode_response(mode, values, media_type) -> bytes
    encode_lines(mode, values) -> bytes  # JSON Lines, one record per row
    count_records(body, media_type) -> int  # records in an encode_response body
    iter_lines(body, first_line=1) -> Iterator[(line_number, line_bytes)]
    range_error(token, side, vocab, path) -> WireError  # "token id ... is out of range"

Record paths in errors: ``$.instances[3].in0[7]`` for application/json (index from 0,
as msgspec reports them) and ``$[line 4].in0[7]`` for application/jsonlines (line
numbers from 1, counting blank lines, as an editor shows them).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Iterator
from typing import Annotated, Literal

import msgspec
import numpy as np
import orjson

from o2v_jax.media import CANONICAL, JSON, JSONLINES, NPY, NPZ, WireError, length_caps, request_type
from o2v_jax.ragged import Ragged, TokenRangeError, check_tokens, flatten

log = logging.getLogger("o2v_jax")

KEYS = ("in0", "in1")
_BOM = b"\xef\xbb\xbf"

Mode = Literal["scores", "embeddings"]


# --- request types ------------------------------------------------------------------

class Instance(msgspec.Struct, forbid_unknown_fields=True):
    """One instance: ``in0`` and ``in1`` (scores) or exactly one of them (embeddings).

    An empty list is allowed, as in training data (docs/data.md): it embeds as an
    all-padding row.
    """

    in0: list[int] | msgspec.UnsetType = msgspec.UNSET  # token ids for encoder 0
    in1: list[int] | msgspec.UnsetType = msgspec.UNSET  # token ids for encoder 1


class Instances(msgspec.Struct, forbid_unknown_fields=True):
    """An application/json request body."""

    instances: Annotated[list[Instance], msgspec.Meta(min_length=1)]


_JSON_DECODER = msgspec.json.Decoder(Instances)
_LINE_DECODER = msgspec.json.Decoder(Instance)


@dataclasses.dataclass(frozen=True)
class Request:
    """A decoded, validated request; token ids are range-checked and truncated.

    Attributes:
        mode: "scores" (every instance has in0 and in1) or "embeddings" (every instance
            has the same single key).
        encoder: "in0" or "in1" for embeddings, None for scores.
        in0: Ragged int32 sequences for encoder 0 (N of them), None when not sent.
        in1: Ragged int32 sequences for encoder 1, None when not sent.
        media_type: the request's canonical type, JSON, JSONLINES or NPZ.
        seq_lens: (L0, L1) length caps applied: min(infer_max_seqlens, max_seq_len).
        truncated: how many sequences were cut to seq_lens, per side.
    """

    mode: Mode
    encoder: Literal["in0", "in1"] | None
    in0: Ragged | None
    in1: Ragged | None
    media_type: str
    seq_lens: tuple[int, int]
    truncated: tuple[int, int] = (0, 0)

    def __len__(self) -> int:
        return len(self.in0 if self.in0 is not None else self.in1)


# --- response types -----------------------------------------------------------------


class Scores(msgspec.Struct):
    scores: list[float]  # softmax probabilities (num_classes) or [regression value]


class Embeddings(msgspec.Struct):
    embeddings: list[float]  # one encoder's output vector (H)


class ScoresResponse(msgspec.Struct):
    predictions: list[Scores]


class EmbeddingsResponse(msgspec.Struct):
    predictions: list[Embeddings]


# The structs above are the response schema (clients and tests decode with them);
# encode_response writes the same shapes straight from float32 arrays with orjson.
_RECORDS = {"scores": Scores, "embeddings": Embeddings}
_NUMPY = orjson.OPT_SERIALIZE_NUMPY
_LINE = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE


# --- decoding -----------------------------------------------------------------------


def iter_lines(body: bytes, first_line: int = 1) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line_number, line)`` for each non-blank line of a JSON Lines body.

    Line numbers count blank lines too, so they match an editor; ``\\r\\n`` is accepted.
    """
    for n, line in enumerate(body.split(b"\n"), start=first_line):
        if line.strip():
            yield n, line


def decode_request(body: bytes, content_type: str | None, *, vocab_sizes: tuple[int, int],
                   max_seq_lens: tuple[int, int], max_bytes: int | None = None,
                   first_line: int = 1) -> Request:
    """Decode and validate an inference request body.

    Args:
        body: the raw request body.
        content_type: the Content-Type header (None: application/json); JSON, JSON Lines
            (or an alias) or NPZ.
        vocab_sizes: (V0, V1); token ids must lie in [0, V) of their encoder.
        max_seq_lens: (L0, L1) of the model; longer sequences are truncated to
            min(infer_max_seqlens, max_seq_len).
        max_bytes: body size limit (413 above it); None for no limit.
        first_line: line number of the body's first line (JSON Lines paths), for callers
            that split a file into chunks.

    Returns:
        The Request.

    Raises:
        WireError: 400 bad body, 413 body too large (or an NPZ body whose members expand
            beyond npz.MAX_EXPANDED_BYTES), 415 bad Content-Type or charset.
    """
    media, caps = request_type(content_type)
    if max_bytes is not None and len(body) > max_bytes:
        raise WireError(413, f"request body is {len(body)} bytes; the limit is {max_bytes} bytes")
    if media == NPZ:
        from o2v_jax import npz  # npz builds on this module's types (no import cycle at load)

        return npz.decode(body, vocab_sizes, length_caps(caps, max_seq_lens))
    if body.startswith(_BOM):
        body = body[len(_BOM) :]
    if not body.strip():
        raise WireError(400, f"empty request body; expected {_EXPECTED[media]}")
    if media == JSON:
        instances, lines = _decode_json(body), None
    else:
        lines, instances = _decode_jsonlines(body, first_line)
    return _build(instances, lines, media, caps, vocab_sizes, max_seq_lens)


_EXPECTED = {
    JSON: '{"instances": [{"in0": [...], "in1": [...]}, ...]}',
    JSONLINES: 'one {"in0": [...], "in1": [...]} object per line',
}


def _decode_json(body: bytes) -> list[Instance]:
    try:
        return _JSON_DECODER.decode(body).instances
    except (msgspec.DecodeError, UnicodeDecodeError) as e:  # ValidationError is a DecodeError
        raise _decode_error(e, body, JSON, None) from None


def _decode_jsonlines(body: bytes, first_line: int) -> tuple[list[int], list[Instance]]:
    numbers, instances = [], []
    decode = _LINE_DECODER.decode
    for n, line in iter_lines(body, first_line):
        try:
            instances.append(decode(line))
        except (msgspec.DecodeError, UnicodeDecodeError) as e:
            raise _decode_error(e, line, JSONLINES, n) from None
        numbers.append(n)
    return numbers, instances


_MSGSPEC_PATH = re.compile(r"^(.*?)(?: - at `(\$[^`]*)`)?$", re.S)
_BYTE = re.compile(r"\(byte (\d+)\)")
_TYPE_NAMES = {
    "object": "a JSON object", "array": "a list", "int": "an integer", "str": "a string",
    "float": "a non-integer number", "bool": "a boolean", "null": "null",
}  # fmt: skip
_TOKEN_PATH = re.compile(r"\.in[01]\[\d+\]$")


def _decode_error(e: Exception, data: bytes, media: str, line: int | None) -> WireError:
    """Turn a msgspec error into a WireError with a record path and a hint."""
    root = "$" if line is None else f"$[line {line}]"
    whole = None if line is None else root  # a malformed JSON body has no record path
    try:
        data.decode("utf-8")  # a body that is not UTF-8 gets that as its error
    except UnicodeDecodeError as u:
        bad = data[u.start : u.start + 1].hex()
        return WireError(400, f"body is not valid UTF-8: byte 0x{bad} at {_where(data, u.start)}", whole)
    if not isinstance(e, msgspec.ValidationError):
        msg = str(e).removeprefix("JSON is malformed: ")
        m = _BYTE.search(msg)
        if m:
            pos = int(m.group(1))
            if msg.startswith("trailing characters"):
                pos -= 1  # msgspec reports the byte after the first extra character
            msg = f"malformed JSON at {_where(data, pos)}: {_BYTE.sub('', msg).strip()}"
        elif "truncated" in msg:
            msg = "malformed JSON: the input ends early (truncated body?)"
        else:
            msg = f"malformed JSON: {msg}"
        if "trailing characters" in msg:
            msg += ("; JSON Lines needs exactly one instance per line" if media == JSONLINES
                    else f"; a body with one instance per line needs Content-Type: {JSONLINES}")
        return WireError(400, msg, whole)
    m = _MSGSPEC_PATH.match(str(e))
    raw, sub = m.group(1), m.group(2) or "$"
    path = root + sub[1:]
    return WireError(400, _explain(raw, sub, media), path)


def _where(data: bytes, pos: int) -> str:
    line = data.count(b"\n", 0, pos) + 1
    col = pos - (data.rfind(b"\n", 0, pos) + 1) + 1
    return f"line {line}, column {col} (byte {pos})" if b"\n" in data else f"column {col} (byte {pos})"


def _explain(raw: str, sub: str, media: str) -> str:
    """Rephrase msgspec's message for people sending Object2Vec requests."""
    top = sub == "$"
    if m := re.fullmatch(r"Expected `(\w+)`, got `(\w+)`", raw):
        want, got = (_TYPE_NAMES.get(t, t) for t in m.groups())
        if _TOKEN_PATH.search(sub):
            return f"expected an integer token id, got {got}"
        if top and media == JSON:
            hint = (
                f"; a bare list of instances is not accepted: wrap it as {{\"instances\": [...]}}"
                f" or send one instance per line with Content-Type: {JSONLINES}"
                if m.group(2) == "array" else ""
            )  # fmt: skip
            return f"expected a JSON object {_EXPECTED[JSON]}, got {got}{hint}"
        if top:
            return f'expected a JSON object such as {{"in0": [...]}} on each line, got {got}'
        return f"expected {want}, got {got}"
    if raw == "Expected `array` of length >= 1":  # only `instances` has a minimum length
        return "expected at least one instance"
    if m := re.fullmatch(r"Object contains unknown field `(.*)`", raw):
        if top and media == JSON:
            return (f"unknown field `{m.group(1)}`; expected {_EXPECTED[JSON]} (a single instance"
                    f" must be wrapped in \"instances\", or sent as {JSONLINES})")
        if top and m.group(1) == "instances":
            return f'unknown field `instances`; a {{"instances": [...]}} body needs Content-Type: {JSON}'
        return f"unknown field `{m.group(1)}`; an instance has only `in0` and/or `in1`"
    if m := re.fullmatch(r"Object missing required field `(.*)`", raw):
        return f"missing field `{m.group(1)}`; expected {_EXPECTED[media]}"
    return raw[:1].lower() + raw[1:]


def _build(instances, lines, media, caps, vocab_sizes, max_seq_lens) -> Request:
    """Pick the mode, then range-check, truncate and pack each side's sequences.

    ``lines`` holds each instance's line number (JSON Lines) or is None (JSON).
    """

    def path(i: int) -> str:
        return f"$.instances[{i}]" if lines is None else f"$[line {lines[i]}]"

    seqs = [[x.in0 for x in instances], [x.in1 for x in instances]]
    # has[i, side]: which keys each instance carries (one Python step per instance, not per token).
    has = np.array([[s is not msgspec.UNSET for s in side] for side in seqs], dtype=bool).T
    neither = ~has.any(axis=1)
    if neither.any():
        i = int(np.argmax(neither))
        raise WireError(400, "instance has neither `in0` nor `in1`; expected both (scores) or exactly "
                             "one (embeddings)", path(i))
    differ = (has != has[0]).any(axis=1)
    if differ.any():
        i = int(np.argmax(differ))
        raise WireError(400, f"instance has {_keys(has[i])} but {path(0)} has {_keys(has[0])}; every "
                             "instance of a request needs the same keys: all `in0` and `in1` (scores), "
                             "all `in0` or all `in1` (embeddings)", path(i))
    mode = "scores" if has[0].all() else "embeddings"
    encoder = None if mode == "scores" else KEYS[int(np.argmax(has[0]))]
    seq_lens = length_caps(caps, max_seq_lens)
    packed, truncated = [None, None], [0, 0]
    for side in (0, 1):
        if has[0, side]:
            packed[side], truncated[side] = _pack(seqs[side], side, vocab_sizes[side],
                                                  seq_lens[side], path)
    return Request(mode, encoder, packed[0], packed[1], media, seq_lens, tuple(truncated))


def _keys(row: np.ndarray) -> str:
    return "`in0` and `in1`" if row.all() else f"only `{KEYS[int(np.argmax(row))]}`"


def _pack(seqs: list[list[int]], side: int, vocab: int, cap: int, path: Callable) -> tuple[Ragged, int]:
    """Flatten N sequences, check ids against [0, vocab), truncate to cap.

    Returns:
        (Ragged with int32 tokens (T,) and int64 offsets (N+1,), number truncated).
    """
    try:
        return check_tokens(*flatten(seqs), vocab, cap)
    except TokenRangeError as e:  # the value from the request: flatten clamps ids beyond int64
        raise range_error(seqs[e.row][e.position], side, vocab,
                          f"{path(e.row)}.{KEYS[side]}[{e.position}]") from None


def range_error(token: int, side: int, vocab: int, path: str) -> WireError:
    """The 400 for a token id outside [0, vocab) of encoder ``side`` (npz words it the same)."""
    expected = f"an integer in [0, {vocab - 1}] (enc{side}_vocab_size={vocab})"
    return WireError(400, f"token id {token} is out of range; expected {expected}", path)


# --- encoding -----------------------------------------------------------------------


def encode_response(mode: str, values: np.ndarray, media_type: str) -> bytes:
    """Encode N rows of scores or embeddings as documented in docs/inference.md.

    Args:
        mode: "scores" or "embeddings".
        values: float32 (N, K): softmax probabilities or [regression value] (K = 1)
            per row for scores, embeddings (K = H) otherwise.
        media_type: JSON (``{"predictions": [...]}``), JSONLINES (one record per line,
            each ending in a newline; aliases accepted) or NPY (the (N, K) float32
            array as a .npy file).

    Returns:
        The response body. JSON floats print as their shortest float32 round-trip
        decimals; NaN and inf (a model bug) print as null in JSON, stay as they are in
        NPY, and are logged.
    """
    media = NPY if media_type == NPY else CANONICAL.get(media_type)
    if media is None:
        raise WireError(406, f"cannot encode a response as {media_type!r}; use {JSON}, "
                             f"{JSONLINES} or {NPY}")
    if mode not in _RECORDS:
        raise ValueError(f"mode must be 'scores' or 'embeddings', got {mode!r}")
    values = np.asarray(values)
    if values.ndim != 2:
        raise ValueError(f"values must be 2-D (N, K), got shape {values.shape}")
    x = np.ascontiguousarray(values, dtype=np.float32)
    bad = ~np.isfinite(x)
    if bad.any():
        log.warning("%d non-finite %s values (rows %s...) encoded as %s", bad.sum(), mode,
                    np.flatnonzero(bad.any(axis=1))[:5].tolist(),
                    "they are (.npy)" if media == NPY else "null")  # fmt: skip
    if media == NPY:
        from o2v_jax import npz  # npz builds on this module's types (no import cycle at load)

        return npz.encode_npy(x)
    # orjson writes float32 arrays in C with the shortest float32 digits (Ryu), NaN and
    # inf as null; the rows are views, so no Python float is ever made.
    records = [{mode: row} for row in x]
    if media == JSON:
        return orjson.dumps({"predictions": records}, option=_NUMPY)
    return b"".join([orjson.dumps(r, option=_LINE) for r in records])


def encode_lines(mode: str, values: np.ndarray) -> bytes:
    """JSON Lines records for batch transform: one ``{"<mode>": [...]}`` per row, each + newline."""
    return encode_response(mode, values, JSONLINES)


def count_records(body: bytes, media_type: str) -> int:
    """Records in a body :func:`encode_response` wrote (the server's access log counts them).

    Compact JSON ``{"predictions":[{"scores":[...]},...]}`` has one ``{"`` per record plus
    the outer one; JSON Lines has one line per record; a .npy body has one row per
    record, which its header gives.
    """
    media = media_type.partition(";")[0].strip().lower()
    if media == JSON:
        return body.count(b'{"') - 1
    if media == NPY:
        from o2v_jax import npz  # npz builds on this module's types (no import cycle at load)

        return npz.npy_rows(body)
    return body.count(b"\n")
