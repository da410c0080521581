"""HTTP media types for inference: names, Content-Type parsing, Accept negotiation.

The request and response types o2v-jax speaks (SageMaker's application/json and
application/jsonlines, with their aliases, and our application/x-npz requests and
application/x-npy responses), the Content-Type parameters SageMaker defines (charset,
infer_max_seqlens, spec §5.4), RFC 9110 content negotiation, and :class:`WireError`,
the 4xx every request-handling module raises. Pure Python: no jax, no numpy.
"""

from __future__ import annotations

import re

JSON = "application/json"
JSONLINES = "application/jsonlines"
# Other names in use for the same newline-delimited format; accepted in Content-Type and
# Accept, answered as JSONLINES.
JSONLINES_ALIASES = ("application/x-jsonlines", "application/jsonl", "application/x-ndjson")
CANONICAL = {JSON: JSON, JSONLINES: JSONLINES, **{a: JSONLINES for a in JSONLINES_ALIASES}}
# A response type beyond SageMaker's documented two (docs/inference.md): the float32
# (N, K) array in NumPy's .npy format, what the SageMaker Python SDK's NumpyDeserializer
# reads. Chosen only when Accept names it; wildcards keep the JSON types.
NPY = "application/x-npy"
# A request type beyond SageMaker's (docs/inference.md): an .npz archive of 2-D integer
# arrays in0 / in1 (o2v_jax.npz decodes it).
NPZ = "application/x-npz"
CHARSETS = ("utf-8", "utf8")
# Spec §5.4: each infer_max_seqlens value is an integer in [1, 5000].
INFER_MAX_SEQLEN_RANGE = (1, 5000)


class WireError(ValueError):
    """A request the wire layer rejects; ``status`` is the HTTP status to answer with.

    Attributes:
        status: 400 bad body, 406 no acceptable response type, 413 body too large,
            415 unsupported Content-Type or charset.
        message: what was wrong and what was expected.
        path: the record path (``$.instances[3].in0[7]``, ``$[line 4].in0``) or None.
    """

    def __init__(self, status: int, message: str, path: str | None = None):
        super().__init__(status, message, path)
        self.status = status
        self.message = message
        self.path = path

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_MEDIA_TYPE = re.compile(rf"({_TOKEN})/({_TOKEN})")
# Commas separate Accept entries, but infer_max_seqlens=10,20 has one inside a value:
# split only where a new "type/subtype" begins.
_ACCEPT_SPLIT = re.compile(rf",\s*(?={_TOKEN}/)")


def parse_media_type(header: str) -> tuple[str, dict[str, str]]:
    """Split ``type/subtype; name=value; ...`` into the lower-cased type and parameters.

    Parameter names are lower-cased, values are stripped and unquoted, case kept.

    Raises:
        WireError(415): the header is not a media type.
    """
    head, *parts = header.split(";")
    media = head.strip().lower()
    if not _MEDIA_TYPE.fullmatch(media):
        raise WireError(415, f"malformed media type {header!r}; expected type/subtype, e.g. {JSON}")
    params = {}
    for part in parts:
        if not part.strip():
            continue
        name, eq, value = part.partition("=")
        name, value = name.strip().lower(), value.strip()
        if not eq or not re.fullmatch(_TOKEN, name):
            raise WireError(415, f"malformed parameter {part.strip()!r} in media type {header!r}; "
                                 "expected name=value")
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        params[name] = value
    return media, params


def request_type(content_type: str | None) -> tuple[str, tuple[int, int] | None]:
    """The canonical request type and the infer_max_seqlens caps, from Content-Type."""
    if content_type is None or not content_type.strip():
        return JSON, None  # documented default: no Content-Type means application/json
    media, params = parse_media_type(content_type)
    if media != NPZ and media not in CANONICAL:
        raise WireError(415, f"unsupported Content-Type {media!r}; send {JSON}, {JSONLINES} or "
                             f"{NPZ}")
    caps = None
    for name, value in params.items():
        if name == "charset":
            if value.lower() not in CHARSETS:
                raise WireError(415, f"unsupported charset {value!r}; request bodies must be utf-8")
        elif name == "infer_max_seqlens":
            caps = _parse_infer_max_seqlens(value)
        else:
            raise WireError(415, f"unsupported Content-Type parameter {name!r}; known parameters are "
                                 "charset and infer_max_seqlens")
    return CANONICAL.get(media, media), caps


def length_caps(caps: tuple[int, int] | None, max_seq_lens: tuple[int, int]) -> tuple[int, int]:
    """Per side, min(infer_max_seqlens, max_seq_len), or max_seq_len without the parameter."""
    return tuple(min(c, m) for c, m in zip(caps or max_seq_lens, max_seq_lens))


def _parse_infer_max_seqlens(value: str) -> tuple[int, int]:
    lo, hi = INFER_MAX_SEQLEN_RANGE
    parts = [p.strip() for p in value.split(",")]
    if len(parts) == 2 and all(re.fullmatch(r"[0-9]+", p) for p in parts):
        caps = (int(parts[0]), int(parts[1]))
        if all(lo <= c <= hi for c in caps):
            return caps
    raise WireError(400, f"invalid infer_max_seqlens={value!r}; expected two integers in [{lo}, {hi}] "
                         "as <in0>,<in1>, e.g. 50,50")


def negotiate(accept: str | None, request_type: str) -> str:
    """Pick the response type from an Accept header (RFC 9110 §12.5.1, q-values honoured).

    No header, ``*/*`` or ``application/*`` answer in the request's own format (NPY for
    an NPZ request); an explicit type wins over a wildcard; on equal q the request's
    format wins. For JSON and JSON Lines requests, NPY is offered only to an Accept that
    names it.

    Args:
        accept: the Accept header or None.
        request_type: the request's media type (JSON, JSONLINES, an alias, or NPZ).

    Returns:
        JSON, JSONLINES or NPY.

    Raises:
        WireError(406): the header allows none of them.
    """
    own = NPY if request_type == NPZ else CANONICAL.get(request_type, JSON)
    if accept is None or not accept.strip():
        return own
    best: dict[str, tuple[int, float]] = {}  # type -> (specificity, q) of its best match
    for entry in _ACCEPT_SPLIT.split(accept.strip()):
        try:
            media, params = parse_media_type(entry)
            q = float(params.get("q", "1"))
        except (WireError, ValueError):
            continue  # a malformed entry is ignored (documented); the others still count
        if not 0.0 <= q <= 1.0:
            continue
        kind, _, sub = media.partition("/")
        for offer in (JSON, JSONLINES, NPY):
            wild = offer != NPY or own == NPY  # NPY answers wildcards for NPZ requests only
            if media == "*/*" and wild:
                spec = 0
            elif kind == "application" and sub == "*" and wild:
                spec = 1
            elif CANONICAL.get(media, media) == offer:
                spec = 2
            else:
                continue
            # The most specific matching entry decides; equally specific ones: highest q.
            if offer not in best or (spec, q) > best[offer]:
                best[offer] = (spec, q)
    ranked = sorted(((q, offer == own, offer) for offer, (_, q) in best.items() if q > 0), reverse=True)
    if not ranked:
        raise WireError(406, f"Accept {accept!r} allows no type this endpoint returns; use {JSON}, "
                             f"{JSONLINES} or {NPY}")
    return ranked[0][2]
