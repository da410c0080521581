"""Wire formats: JSON and JSON Lines request decoding, modes, error paths, Accept
negotiation, response encoding and float printing (.npz/.npy: test_npz.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import msgspec
import numpy as np
import pytest

from o2v_jax import media, wire
from o2v_jax.wire import JSON, JSONLINES, WireError

LIMITS = {"vocab_sizes": (50, 40), "max_seq_lens": (8, 6)}

# The AWS "Encoder Embeddings for Object2Vec" page's examples, verbatim. The page prints
# the JSON Lines request and response with the records run together on one line; here
# they are split back into the three (two) lines they stand for.
SEED_JSON_REQUEST = b'{ "instances" : [ {"in0": [6, 17, 606, 19, 53, 67, 52, 12, 5, 10, 15, 10178, 7, 33, 652, 80, 15, 69, 821, 4]}, {"in0": [22, 1016, 32, 13, 25, 11, 5, 64, 573, 45, 5, 80, 15, 67, 21, 7, 9, 107, 4]}, {"in0": [774, 14, 21, 206]} ] }'  # noqa: E501
SEED_JSONLINES_REQUEST = (
    b'{"in0": [6, 17, 606, 19, 53, 67, 52, 12, 5, 10, 15, 10178, 7, 33, 652, 80, 15, 69, 821, 4]}\n'
    b'{"in0": [22, 1016, 32, 13, 25, 11, 5, 64, 573, 45, 5, 80, 15, 67, 21, 7, 9, 107, 4]}\n'
    b'{"in0": [774, 14, 21, 206]}\n'
)
SEED_SEQUENCES = [
    [6, 17, 606, 19, 53, 67, 52, 12, 5, 10, 15, 10178, 7, 33, 652, 80, 15, 69, 821, 4],
    [22, 1016, 32, 13, 25, 11, 5, 64, 573, 45, 5, 80, 15, 67, 21, 7, 9, 107, 4],
    [774, 14, 21, 206],
]
SEED_JSON_RESPONSE = b'{ "predictions": [ {"embeddings":[0.057368703186511,0.030703511089086,0.099890425801277,0.063688032329082,0.026327300816774,0.003637571120634,0.021305780857801,0.004316598642617,0.0,0.003397724591195,0.0,0.000378780066967,0.0,0.0,0.0,0.007419463712722]}, {"embeddings":[0.150190666317939,0.05145975202322,0.098204270005226,0.064249359071254,0.056249320507049,0.01513972133398,0.047553978860378,0.0,0.0,0.011533712036907,0.011472506448626,0.010696629062294,0.0,0.0,0.0,0.008508535102009]} ] }'  # noqa: E501
SEED_JSONLINES_RESPONSE = (
    b'{"embeddings":[0.057368703186511,0.030703511089086,0.099890425801277,0.063688032329082,0.026327300816774,0.003637571120634,0.021305780857801,0.004316598642617,0.0,0.003397724591195,0.0,0.000378780066967,0.0,0.0,0.0,0.007419463712722]}\n'  # noqa: E501
    b'{"embeddings":[0.150190666317939,0.05145975202322,0.098204270005226,0.064249359071254,0.056249320507049,0.01513972133398,0.047553978860378,0.0,0.0,0.011533712036907,0.011472506448626,0.010696629062294,0.0,0.0,0.0,0.008508535102009]}\n'  # noqa: E501
)
SEED_LIMITS = {"vocab_sizes": (20000, 20000), "max_seq_lens": (100, 100)}


def body_for(instances: list[dict], media_type: str) -> bytes:
    if media_type == JSON:
        return json.dumps({"instances": instances}).encode()
    return "".join(json.dumps(i) + "\n" for i in instances).encode()


def decode(body: bytes, content_type: str | None = JSON, **kw) -> wire.Request:
    return wire.decode_request(body, content_type, **{**LIMITS, **kw})


def response_records(body: bytes, media_type: str, mode: str) -> list[list[float]]:
    """Decode a response with the typed response Structs (strict: unknown keys fail)."""
    record = wire.Scores if mode == "scores" else wire.Embeddings
    if media_type == JSON:
        typ = wire.ScoresResponse if mode == "scores" else wire.EmbeddingsResponse
        records = msgspec.json.decode(body, type=typ, strict=True).predictions
    else:
        assert body.endswith(b"\n") or body == b""
        records = [msgspec.json.decode(line, type=record) for line in body.splitlines()]
    return [getattr(r, mode) for r in records]


# --- round trips --------------------------------------------------------------------

CASES = {
    "scores": [{"in0": [1, 2, 3], "in1": [4]}, {"in0": [49], "in1": [0, 39, 7]}],
    "in0": [{"in0": [1, 2, 3]}, {"in0": [49, 0]}, {"in0": [5]}],
    "in1": [{"in1": [39]}, {"in1": [1, 2, 3, 4, 5, 6]}],
}


@pytest.mark.parametrize("media_type", [JSON, JSONLINES])
@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_every_mode_and_content_type(case, media_type):
    instances = CASES[case]
    req = decode(body_for(instances, media_type), media_type)
    assert req.media_type == media_type
    assert len(req) == len(instances)
    if case == "scores":
        assert (req.mode, req.encoder) == ("scores", None)
    else:
        assert (req.mode, req.encoder) == ("embeddings", case)
    for key, got in (("in0", req.in0), ("in1", req.in1)):
        if key in instances[0]:
            assert got.tokens.dtype == np.int32 and got.offsets.dtype == np.int64
            assert got.to_lists() == [i[key] for i in instances]
        else:
            assert got is None

    mode = req.mode
    width = 3 if mode == "scores" else 16
    values = np.random.default_rng(0).random((len(instances), width), dtype=np.float32)
    out = wire.encode_response(mode, values, media.negotiate(None, req.media_type))
    rows = response_records(out, media_type, mode)
    np.testing.assert_array_equal(np.array(rows, dtype=np.float32), values)


def test_response_shapes_are_the_documented_ones():
    values = np.float32([[0.25, 0.75], [1.0, 0.0]])
    assert wire.encode_response("scores", values, JSON) == (
        b'{"predictions":[{"scores":[0.25,0.75]},{"scores":[1.0,0.0]}]}'
    )
    assert wire.encode_lines("embeddings", values) == (
        b'{"embeddings":[0.25,0.75]}\n{"embeddings":[1.0,0.0]}\n'
    )
    assert wire.encode_response("scores", np.zeros((0, 3), np.float32), JSON) == b'{"predictions":[]}'
    assert wire.encode_lines("scores", np.zeros((0, 3), np.float32)) == b""
    # Aliases answer in the one JSON Lines format.
    assert wire.encode_response("scores", values[:1], "application/x-ndjson") == b'{"scores":[0.25,0.75]}\n'


# --- the AWS page's examples ----------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "media_type"),
    [(SEED_JSON_REQUEST, JSON), (SEED_JSONLINES_REQUEST, JSONLINES)],
    ids=["json", "jsonlines"],
)
def test_seed_requests_decode(body, media_type):
    req = wire.decode_request(body, media_type, **SEED_LIMITS)
    assert (req.mode, req.encoder, req.in1) == ("embeddings", "in0", None)
    assert req.in0.to_lists() == SEED_SEQUENCES


def test_seed_jsonlines_as_printed_on_one_line_is_rejected_with_a_hint():
    one_line = SEED_JSONLINES_REQUEST.rstrip(b"\n").replace(b"\n", b" ")
    with pytest.raises(WireError) as e:
        wire.decode_request(one_line, JSONLINES, **SEED_LIMITS)
    assert e.value.path == "$[line 1]"
    column = one_line.index(b"} {") + 3  # the second record's "{", counting from 1
    assert f"column {column} " in e.value.message and "one instance per line" in e.value.message


def test_seed_response_shapes_match_ours():
    # The page's responses decode with our strict response types ...
    for body, media_type in ((SEED_JSON_RESPONSE, JSON), (SEED_JSONLINES_RESPONSE, JSONLINES)):
        rows = response_records(body, media_type, "embeddings")
        assert [len(r) for r in rows] == [16, 16]
    # ... and a (3, 16) array encodes to the same shapes, 16 numbers per embedding.
    values = np.random.default_rng(1).random((3, 16), dtype=np.float32)
    values[:, 8] = 0.0
    out_json = wire.encode_response("embeddings", values, JSON)
    out_lines = wire.encode_response("embeddings", values, JSONLINES)
    doc = json.loads(out_json)
    assert list(doc) == ["predictions"]
    assert [list(p) for p in doc["predictions"]] == [["embeddings"]] * 3
    assert [len(p["embeddings"]) for p in doc["predictions"]] == [16] * 3
    lines = out_lines.decode().splitlines()
    assert [list(json.loads(line)) for line in lines] == [["embeddings"]] * 3
    assert [json.loads(line) for line in lines] == doc["predictions"]
    assert b'"embeddings":[' in out_json and b", " not in out_json  # compact, like the page


def test_seed_response_values_print_as_pinned_bytes():
    # The page's two vectors, as the float32 a model would hold: the exact bytes we print
    # (shortest float32 decimals, compact separators) in both formats.
    doc = json.loads(SEED_JSON_RESPONSE)
    values = np.float32([p["embeddings"] for p in doc["predictions"]])
    records = [
        b'{"embeddings":[0.057368703,0.030703511,0.099890426,0.06368803,0.0263273,0.0036375711,'
        b'0.02130578,0.0043165986,0.0,0.0033977246,0.0,0.00037878007,0.0,0.0,0.0,0.0074194637]}',
        b'{"embeddings":[0.15019067,0.051459752,0.09820427,0.06424936,0.05624932,0.015139721,'
        b'0.04755398,0.0,0.0,0.011533712,0.011472506,0.010696629,0.0,0.0,0.0,0.008508535]}',
    ]
    assert wire.encode_response("embeddings", values, JSON) == b'{"predictions":[' + b",".join(records) + b"]}"
    assert wire.encode_response("embeddings", values, JSONLINES) == b"".join(r + b"\n" for r in records)
    assert wire.count_records(wire.encode_response("embeddings", values, JSON), JSON) == 2


# --- errors, with record paths ---------------------------------------------------------

JL, IMS = JSONLINES, "application/jsonlines; infer_max_seqlens="
ERRORS = [
    # (id, body, content type, status, path, fragment of the message)
    ("mixed keys", b'{"instances": [{"in0": [1]}, {"in0": [1], "in1": [2]}]}', JSON, 400,
     "$.instances[1]", "same keys"),
    ("mixed in0/in1", b'{"in1": [1]}\n{"in1": [2]}\n{"in0": [3]}\n', JL, 400,
     "$[line 3]", "only `in0` but $[line 1] has only `in1`"),
    ("neither key", b'{"instances": [{"in0": [1]}, {"in0": [1]}, {}]}', JSON, 400,
     "$.instances[2]", "neither `in0` nor `in1`"),
    ("unknown field", b'{"instances": [{"in0": [1], "label": 1}]}', JSON, 400,
     "$.instances[0]", "unknown field `label`"),
    ("unknown top-level", b'{"instances": [{"in0": [1]}], "x": 1}', JSON, 400,
     "$", "unknown field `x`"),
    ("string id", b'{"instances": [{"in0": [1, 2]}, {"in0": [1, 2, 3, "7"]}]}', JSON, 400,
     "$.instances[1].in0[3]", "expected an integer token id, got a string"),
    ("float id", b'{"in0": [1, 2.0]}', JL, 400,
     "$[line 1].in0[1]", "got a non-integer number"),
    ("negative id", b'{"instances": [{"in1": [1]}, {"in1": [3, -2]}]}', JSON, 400,
     "$.instances[1].in1[1]",
     "token id -2 is out of range; expected an integer in [0, 39] (enc1_vocab_size=40)"),
    ("id >= vocab",
     b'{"instances": [{"in0": [1], "in1": [2]}, {"in0": [4, 5, 6, 7, 8, 9, 10, 50], "in1": [1]}]}',
     JSON, 400, "$.instances[1].in0[7]", "token id 50 is out of range; expected an integer in [0, 49]"),
    ("id >= vocab, jsonlines", b'\n{"in1": [39]}\n\n{"in1": [40]}\n', JL, 400,
     "$[line 4].in1[0]", "token id 40"),
    ("id beyond int64", b'{"in0": [1, 123456789012345678901234567890]}', JL, 400,
     "$[line 1].in0[1]", "out of range"),
    ("null sequence", b'{"instances": [{"in0": null}]}', JSON, 400,
     "$.instances[0].in0", "got null"),
    ("bare list (#824)", b'[{"in0": [863], "in1": [882]}]', JSON, 400,
     "$", "bare list of instances"),
    ("single instance as json", b'{"in0": [1]}', JSON, 400,
     "$", 'wrapped in "instances"'),
    ("jsonlines sent as json", b'{"in0": [1]}\n{"in0": [2]}\n', JSON, 400,
     "$", "or sent as application/jsonlines"),
    ("json body as jsonlines", b'{"instances": [{"in0": [1]}]}', JL, 400,
     "$[line 1]", "needs Content-Type: application/json"),
    ("missing instances", b"{}", JSON, 400,
     "$", "missing field `instances`"),
    ("empty instances", b'{"instances": []}', JSON, 400,
     "$.instances", "at least one instance"),
    ("empty body", b"", JSON, 400,
     None, "empty request body"),
    ("blank jsonlines body", b"\n \r\n\n", JL, 400,
     None, "empty request body"),
    ("invalid JSON", b'{"instances": [\n  {"in0": [1]},\n  {"in0": [1]]\n}', JSON, 400,
     None, "malformed JSON at line 3, column 14 (byte 45)"),
    ("invalid JSON line", b'{"in0": [1]}\n{"in0": [1}\n', JL, 400,
     "$[line 2]", "malformed JSON at column 11 (byte 10)"),
    ("truncated JSON", b'{"instances": [{"in0": [1', JSON, 400,
     None, "ends early"),
    ("two json bodies", b'{"instances": [{"in0": [1]}]}\n{"instances": [{"in0": [2]}]}', JSON, 400,
     None, "at line 2, column 1 (byte 30): trailing characters; a body with one instance per line"
     " needs Content-Type: " + JL),
    ("not UTF-8", b'{"instances": [{"in0": [1]}], "\xff": 1}', JSON, 400,
     None, "not valid UTF-8: byte 0xff"),
    ("not UTF-8 line", b'{"in0": [1]}\n{"in\xe90": [1]}\n', JL, 400,
     "$[line 2]", "not valid UTF-8"),
    ("UTF-16", '{"in0": [1]}'.encode("utf-16"), JL, 400,
     "$[line 1]", "not valid UTF-8"),
    ("bad charset", b'{"in0": [1]}', "application/jsonlines; charset=latin-1", 415,
     None, "charset 'latin-1'"),
    ("bad infer_max_seqlens: one value", b'{"in0": [1]}', IMS + "5", 400,
     None, "infer_max_seqlens='5'; expected two integers in [1, 5000]"),
    ("bad infer_max_seqlens: zero", b'{"in0": [1]}', IMS + "0,5", 400,
     None, "infer_max_seqlens"),
    ("bad infer_max_seqlens: too big", b'{"in0": [1]}', IMS + "5,5001", 400,
     None, "[1, 5000]"),
    ("bad infer_max_seqlens: not a number", b'{"in0": [1]}', IMS + '"a,b"', 400,
     None, "infer_max_seqlens"),
    ("unknown parameter", b'{"in0": [1]}', "application/jsonlines; infer_max_seqlen=5,5", 415,
     None, "parameter 'infer_max_seqlen'"),
    ("unsupported type", b'{"in0": [1]}', "text/csv", 415,
     None, "unsupported Content-Type 'text/csv'"),
    ("curl -d default", b'{"in0": [1]}', "application/x-www-form-urlencoded", 415,
     None, "unsupported Content-Type"),
    ("malformed type", b'{"in0": [1]}', "json", 415,
     None, "malformed media type"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "ctype", "status", "path", "fragment"), [e[1:] for e in ERRORS],
                         ids=[e[0] for e in ERRORS])  # fmt: skip
def test_errors_name_the_record_path_and_what_was_expected(body, ctype, status, path, fragment):
    with pytest.raises(WireError) as e:
        decode(body, ctype)
    err = e.value
    assert (err.status, err.path) == (status, path)
    assert fragment in err.message
    assert isinstance(err, ValueError)
    assert str(err) == (f"{path}: {err.message}" if path else err.message)


def test_body_over_the_limit_is_413():
    with pytest.raises(WireError) as e:
        decode(b'{"in0": [1, 2, 3]}', JSONLINES, max_bytes=10)
    assert e.value.status == 413 and "18 bytes; the limit is 10" in e.value.message
    assert len(decode(b'{"in0": [1, 2, 3]}', JSONLINES, max_bytes=18)) == 1


def test_first_line_offsets_jsonlines_paths():
    with pytest.raises(WireError) as e:
        decode(b'{"in0": [1]}\n{"in0": [99]}\n', JSONLINES, first_line=1001)
    assert e.value.path == "$[line 1002].in0[0]"


def test_iter_lines_numbers_lines_like_an_editor():
    body = b'{"in0": [1]}\r\n\n   \n{"in0": [2]}'
    got = [(n, line.strip()) for n, line in wire.iter_lines(body)]
    assert got == [(1, b'{"in0": [1]}'), (4, b'{"in0": [2]}')]
    assert [n for n, _ in wire.iter_lines(body, first_line=10)] == [10, 13]


def test_missing_content_type_means_json_and_bom_and_charset_are_accepted():
    body = b'{"instances": [{"in0": [1]}]}'
    assert decode(body, None).media_type == JSON
    assert decode(body, "").media_type == JSON
    assert decode(b"\xef\xbb\xbf" + body, "Application/JSON; Charset=UTF-8").in0.to_lists() == [[1]]
    assert decode(b'{"in0": [1]}', 'application/jsonlines; charset="utf8"').media_type == JSONLINES
    for alias in media.JSONLINES_ALIASES:
        assert decode(b'{"in0": [1]}', alias).media_type == JSONLINES


def test_parse_media_type():
    assert media.parse_media_type('Application/JSONLines ; CHARSET=UTF-8; infer_max_seqlens="10,20"') == (
        "application/jsonlines",
        {"charset": "UTF-8", "infer_max_seqlens": "10,20"},
    )
    assert media.parse_media_type("application/json;") == ("application/json", {})
    with pytest.raises(WireError) as e:
        media.parse_media_type("application/json; charset")
    assert e.value.status == 415


# --- infer_max_seqlens and truncation -------------------------------------------------


def test_infer_max_seqlens_truncates_to_the_smaller_of_it_and_max_seq_len():
    instances = [{"in0": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], "in1": [1, 2, 3, 4, 5, 6, 7]},
                 {"in0": [11, 12], "in1": [9]},
                 {"in0": [21, 22, 23, 24], "in1": [8, 7, 6, 5]}]  # fmt: skip
    body = body_for(instances, JSONLINES)
    # No parameter: the model's max_seq_lens (8, 6) apply.
    req = decode(body, JSONLINES)
    assert req.seq_lens == (8, 6) and req.truncated == (1, 1)
    assert req.in0.to_lists() == [[1, 2, 3, 4, 5, 6, 7, 8], [11, 12], [21, 22, 23, 24]]
    assert req.in1.to_lists() == [[1, 2, 3, 4, 5, 6], [9], [8, 7, 6, 5]]
    # The parameter caps further; a value above max_seq_len is held to it.
    req = decode(body, "application/jsonlines; infer_max_seqlens=3, 5000")
    assert req.seq_lens == (3, 6) and req.truncated == (2, 1)
    assert req.in0.to_lists() == [[1, 2, 3], [11, 12], [21, 22, 23]]
    assert req.in1.to_lists() == [[1, 2, 3, 4, 5, 6], [9], [8, 7, 6, 5]]
    assert req.in0.offsets.tolist() == [0, 3, 5, 8]


def test_empty_sequences_are_allowed_as_in_training_data():
    req = decode(b'{"in0": [], "in1": [3]}\n{"in0": [1, 2], "in1": []}\n', JSONLINES)
    assert req.mode == "scores"
    assert req.in0.to_lists() == [[], [1, 2]] and req.in1.to_lists() == [[3], []]


def test_ids_past_the_truncation_point_are_still_checked():
    with pytest.raises(WireError) as e:
        decode(b'{"in0": [1, 2, 3, 4, 5, 6, 7, 8, 9, 99]}', JSONLINES)
    assert e.value.path == "$[line 1].in0[9]"


def test_unsupported_content_type_names_all_three_request_types():
    with pytest.raises(WireError) as e:
        decode(b"1,2", "text/csv")
    assert e.value.status == 415
    assert f"send {JSON}, {JSONLINES} or {media.NPZ}" in e.value.message


# --- Accept negotiation -----------------------------------------------------------------

NEGOTIATION = [
    # (Accept, request type, response type or 406)
    (None, JSON, JSON),
    (None, JSONLINES, JSONLINES),
    ("", JSONLINES, JSONLINES),
    ("*/*", JSON, JSON),
    ("*/*", JSONLINES, JSONLINES),
    ("application/*", JSONLINES, JSONLINES),
    ("application/json", JSONLINES, JSON),
    ("application/jsonlines", JSON, JSONLINES),
    ("Application/JSON; charset=utf-8", JSONLINES, JSON),
    ("application/x-jsonlines", JSON, JSONLINES),
    ("application/jsonl", JSON, JSONLINES),
    ("application/jsonlines;q=0.9, application/json", JSONLINES, JSON),
    ("application/json;q=0.5, application/jsonlines;q=0.6", JSON, JSONLINES),
    ("application/json, application/jsonlines", JSONLINES, JSONLINES),  # tie: request's own format
    ("text/html, */*;q=0.1", JSON, JSON),
    ("*/*, application/json;q=0", JSON, JSONLINES),  # the specific entry beats the wildcard
    ("application/json;q=0", JSON, 406),
    ("text/html", JSON, 406),
    ("text/*", JSONLINES, 406),
    ("*/*;q=0", JSON, 406),
    ("application/json;q=abc", JSON, 406),  # malformed entries are ignored
    ("application/json;q=abc, application/jsonlines", JSON, JSONLINES),
    # The .npy extension only when named: wildcards keep SageMaker's JSON types.
    ("application/x-npy", JSON, media.NPY),
    ("application/x-npy", JSONLINES, media.NPY),
    ("application/json;q=0.5, application/x-npy", JSON, media.NPY),
    ("application/x-npy;q=0.5, */*", JSONLINES, JSONLINES),
    ("application/x-npy;q=0", JSON, 406),
    # An .npz request (binary in) answers .npy unless Accept asks for a JSON type.
    (None, media.NPZ, media.NPY),
    ("*/*", media.NPZ, media.NPY),
    ("application/*", media.NPZ, media.NPY),
    ("application/json", media.NPZ, JSON),
    ("application/jsonlines", media.NPZ, JSONLINES),
    ("application/json, application/x-npy", media.NPZ, media.NPY),  # tie: the binary type
    ("text/html", media.NPZ, 406),
]


@pytest.mark.parametrize(("accept", "request_type", "expected"), NEGOTIATION)
def test_accept_negotiation(accept, request_type, expected):
    if expected == 406:
        with pytest.raises(WireError) as e:
            media.negotiate(accept, request_type)
        assert e.value.status == 406
        assert "use application/json, application/jsonlines or application/x-npy" in e.value.message
    else:
        assert media.negotiate(accept, request_type) == expected


# --- float printing -------------------------------------------------------------------


def _special_floats() -> np.ndarray:
    tiny = np.finfo(np.float32).smallest_subnormal
    return np.float32([
        0.0, -0.0, 0.1, -0.1, 1 / 3, 0.5, 1.0, 2.0, 1024.0, 0.3, 1e-4, 9.99999e-5, 1e-13, 1e13,
        16777216.0, 16777217.0, 123456789.0, 3.4028235e38, -3.4028235e38, 1.17549435e-38,
        tiny, 2 * tiny, 1e-45, 7e-45, 65504.0, 8388607.5, 8388608.0, 1e6, 0.057368703186511,
    ])  # fmt: skip


def test_printed_floats_are_the_shortest_float32_decimals():
    rng = np.random.default_rng(0)
    bit_patterns = rng.integers(0, 2**32, 50_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    with np.errstate(over="ignore"):  # a few overflow to inf and are dropped below
        scaled = (rng.standard_normal(50_000) * 10.0 ** rng.integers(-46, 39, 50_000)).astype(np.float32)
    normal = (rng.standard_normal(50_000) * 0.1).astype(np.float32)
    powers_of_two = np.ldexp(np.float32(1), np.arange(-149, 128)).astype(np.float32)
    # The neighbours of short decimals, and every power of two (lopsided rounding interval).
    near_short = np.nextafter(np.float32([0.3, 0.7, 1.1, 2.5e-3, 12.5]), np.float32(1))
    x = np.concatenate([bit_patterns, scaled, normal, powers_of_two, near_short, _special_floats()])
    x = x[np.isfinite(x)]
    x = np.resize(x, (x.size // 64, 64))
    body = wire.encode_response("embeddings", x, JSONLINES)
    # numpy's float32 str is the shortest round-trip decimal (Dragon4, the nearest of the
    # shortest): the printed numbers must be those decimals, read as doubles ...
    printed = [re.findall(rb"-?[0-9][-+0-9.e]*", line) for line in body.splitlines()]
    assert [len(p) for p in printed] == [x.shape[1]] * x.shape[0]
    np.testing.assert_array_equal(np.array(printed).astype(np.float64), x.astype(str).astype(np.float64))

    # ... with no more significant digits than numpy's (the exponent may be spelt otherwise).
    def digits(number: bytes) -> int:
        return len(number.split(b"e")[0].lstrip(b"-").replace(b".", b"").strip(b"0"))

    ours = np.array([digits(t) for row in printed for t in row])
    theirs = np.array([digits(s.encode()) for s in x.astype(str).ravel()])
    assert (ours <= theirs).all()


def test_printed_floats_round_trip_exactly_through_float32():
    rng = np.random.default_rng(1)
    scaled = rng.standard_normal(4000) * 10.0 ** rng.integers(-30, 30, 4000)
    x = np.concatenate([scaled.astype(np.float32),
                        rng.integers(0, 2**32, 4000, dtype=np.uint64).astype(np.uint32).view(np.float32),
                        _special_floats()])  # fmt: skip
    x = x[np.isfinite(x)]
    x = np.resize(x, (x.size // 16, 16))
    for media_type in (JSON, JSONLINES):
        body = wire.encode_response("embeddings", x, media_type)
        # A JSON parser (msgspec here, the stdlib below) reads doubles; cast to float32
        # they are the same bits that went in.
        rows = response_records(body, media_type, "embeddings")
        back = np.array(rows, dtype=np.float64).astype(np.float32)
        np.testing.assert_array_equal(back.view(np.uint32), x.view(np.uint32))
    doc = json.loads(wire.encode_response("embeddings", x, JSON))
    rows = [p["embeddings"] for p in doc["predictions"]]
    np.testing.assert_array_equal(np.array(rows).astype(np.float32).view(np.uint32), x.view(np.uint32))


def test_floats_print_short_not_as_widened_doubles():
    values = np.float32([[0.1, 0.2, 1 / 3, 1e-7, 0.0, -0.0, 3.0, 123456.79, 1e20, -2.5e-30]])
    body = wire.encode_response("embeddings", values, JSONLINES)
    assert body == b'{"embeddings":[0.1,0.2,0.33333334,1e-7,0.0,-0.0,3.0,123456.79,1e+20,-2.5e-30]}\n'
    # What float32 -> float64 -> JSON would have printed instead:
    assert b"0.10000000149011612" in msgspec.json.encode(values.astype(np.float64).tolist())


def test_non_finite_values_print_as_null_and_are_logged(caplog):
    values = np.float32([[0.5, np.nan], [np.inf, -np.inf]])
    with caplog.at_level("WARNING", logger="o2v_jax"):
        body = wire.encode_response("scores", values, JSON)
    assert body == b'{"predictions":[{"scores":[0.5,null]},{"scores":[null,null]}]}'
    assert "3 non-finite scores values" in caplog.text


def test_encode_response_rejects_bad_arguments():
    with pytest.raises(WireError) as e:
        wire.encode_response("scores", np.zeros((1, 2), np.float32), "text/csv")
    assert e.value.status == 406
    with pytest.raises(ValueError, match="2-D"):
        wire.encode_response("scores", np.zeros(3, np.float32), JSON)
    with pytest.raises(ValueError, match="mode"):
        wire.encode_response("labels", np.zeros((1, 2), np.float32), JSON)


def test_wire_does_not_import_jax_or_flax():
    code = "import sys, o2v_jax.wire; sys.exit(bool({'jax', 'flax'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
