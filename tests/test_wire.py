"""Wire formats: request decoding, modes, error paths, Accept negotiation, float printing."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import zipfile

import msgspec
import numpy as np
import pytest

from o2v_jax import wire
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


def body_for(instances: list[dict], media: str) -> bytes:
    if media == JSON:
        return json.dumps({"instances": instances}).encode()
    return "".join(json.dumps(i) + "\n" for i in instances).encode()


def decode(body: bytes, content_type: str | None = JSON, **kw) -> wire.Request:
    return wire.decode_request(body, content_type, **{**LIMITS, **kw})


def response_records(body: bytes, media: str, mode: str) -> list[list[float]]:
    """Decode a response with the typed response Structs (strict: unknown keys fail)."""
    record = wire.Scores if mode == "scores" else wire.Embeddings
    if media == JSON:
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


@pytest.mark.parametrize("media", [JSON, JSONLINES])
@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_every_mode_and_content_type(case, media):
    instances = CASES[case]
    req = decode(body_for(instances, media), media)
    assert req.media_type == media
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
    out = wire.encode_response(mode, values, wire.negotiate(None, req.media_type))
    rows = response_records(out, media, mode)
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


def test_npy_responses_are_the_float32_array_bit_for_bit():
    # The .npy extension (Accept: application/x-npy): what numpy.load (and the SageMaker
    # SDK's NumpyDeserializer) reads back is exactly the array, NaN and all.
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 7)).astype(np.float32)
    x[1, 2] = np.nan
    for mode in ("scores", "embeddings"):
        body = wire.encode_response(mode, x, wire.NPY)
        back = np.load(io.BytesIO(body), allow_pickle=False)
        assert back.dtype == np.float32 and back.shape == (5, 7)
        np.testing.assert_array_equal(back.view(np.uint32), x.view(np.uint32))
        assert wire.npy_rows(body) == 5
        saved = io.BytesIO()
        np.save(saved, x)
        assert body == saved.getvalue()  # byte for byte what numpy.save writes
    empty = wire.encode_response("embeddings", np.zeros((0, 4), np.float32), wire.NPY)
    assert np.load(io.BytesIO(empty)).shape == (0, 4) and wire.npy_rows(empty) == 0
    with pytest.raises(WireError) as e:
        wire.encode_response("embeddings", x, "application/x-npz")
    assert e.value.status == 406


# --- the AWS page's examples ----------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "media"),
    [(SEED_JSON_REQUEST, JSON), (SEED_JSONLINES_REQUEST, JSONLINES)],
    ids=["json", "jsonlines"],
)
def test_seed_requests_decode(body, media):
    req = wire.decode_request(body, media, **SEED_LIMITS)
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
    for body, media in ((SEED_JSON_RESPONSE, JSON), (SEED_JSONLINES_RESPONSE, JSONLINES)):
        rows = response_records(body, media, "embeddings")
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
    for alias in wire.JSONLINES_ALIASES:
        assert decode(b'{"in0": [1]}', alias).media_type == JSONLINES


def test_parse_media_type():
    assert wire.parse_media_type('Application/JSONLines ; CHARSET=UTF-8; infer_max_seqlens="10,20"') == (
        "application/jsonlines",
        {"charset": "UTF-8", "infer_max_seqlens": "10,20"},
    )
    assert wire.parse_media_type("application/json;") == ("application/json", {})
    with pytest.raises(WireError) as e:
        wire.parse_media_type("application/json; charset")
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


# --- application/x-npz requests ---------------------------------------------------------


def npz(compressed: bool = False, **arrays) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def padded(seqs: list[list[int]], width: int | None = None, dtype=np.int32) -> np.ndarray:
    out = np.zeros((len(seqs), width or max(map(len, seqs))), dtype)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s
    return out


@pytest.mark.parametrize("compressed", [False, True], ids=["savez", "savez_compressed"])
@pytest.mark.parametrize("case", list(CASES))
def test_npz_requests_decode_like_the_same_json_request(case, compressed):
    # Trailing zeros are padding in an array: [49, 0] arrives as [49]. Both embed alike,
    # since id 0 is padding in the model too; interior zeros stay.
    instances = CASES[case]
    want = decode(body_for(instances, JSON), JSON)
    arrays = {k: padded([i[k] for i in instances], width=7) for k in ("in0", "in1")
              if k in instances[0]}
    req = decode(npz(compressed, **arrays), wire.NPZ)
    assert (req.mode, req.encoder, req.media_type) == (want.mode, want.encoder, wire.NPZ)
    for side in ("in0", "in1"):
        got, exp = getattr(req, side), getattr(want, side)
        assert (got is None) == (exp is None)
        if got is not None:
            assert got.to_lists() == [s[:max((j + 1 for j, t in enumerate(s) if t), default=0)]
                                      for s in exp.to_lists()]  # trailing zeros dropped
            assert got.tokens.dtype == np.int32


@pytest.mark.parametrize("dtype", [np.int8, np.uint16, np.int64, np.uint64, ">i4"])
def test_npz_accepts_any_integer_dtype_byte_order_and_fortran_layout(dtype):
    seqs = [[3, 0, 5], [7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]  # interior 0 kept; 10 ids > L0 = 8
    arr = padded(seqs, dtype=dtype)
    for a in (arr, np.asfortranarray(arr)):
        req = decode(npz(in0=a), wire.NPZ)
        assert req.in0.to_lists() == [[3, 0, 5], [7], [1, 2, 3, 4, 5, 6, 7, 8]]
        assert req.truncated == (1, 0)


def test_npz_rows_of_zeros_or_no_columns_are_empty_sequences():
    # As an empty JSON list: allowed, embeds as an all-padding row.
    assert decode(npz(in0=np.zeros((2, 3), int)), wire.NPZ).in0.to_lists() == [[], []]
    assert decode(npz(in1=np.zeros((2, 0), int)), wire.NPZ).in1.to_lists() == [[], []]


def test_npz_lengths_members_keep_trailing_zeros_and_caps_apply():
    arr = np.array([[4, 0, 0, 9], [5, 6, 0, 0]], np.int64)
    req = decode(npz(in0=arr, in0_lengths=np.array([2, 3])), wire.NPZ)
    assert req.in0.to_lists() == [[4, 0], [5, 6, 0]]
    req = decode(npz(in0=arr, in1=arr), f"{wire.NPZ}; infer_max_seqlens=1,3")
    assert req.mode == "scores" and req.seq_lens == (1, 3) and req.truncated == (2, 1)
    assert req.in0.to_lists() == [[4], [5]] and req.in1.to_lists() == [[4, 0, 0], [5, 6]]


def _zip_of(compression: int = zipfile.ZIP_STORED, **members: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression) as z:
        for name, data in members.items():
            z.writestr(f"{name}.npy", data)
    return out.getvalue()


def _cd_version(body: bytes, version: int) -> bytes:
    """``body`` with its first central-directory entry's "version needed" set."""
    at = body.index(b"PK\x01\x02") + 6
    return body[:at] + bytes([version, 0]) + body[at + 2:]


def _lying_header() -> bytes:
    """A valid archive whose in0.npy header claims (9999999, 64) ids but holds 2 x 64."""
    npy = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        npy, {"descr": "<i4", "fortran_order": False, "shape": (9_999_999, 64)})
    npy.write(np.ones((2, 64), np.int32).tobytes())
    return _zip_of(in0=npy.getvalue())


NPZ_ERRORS = [
    # (id, body, status, path, message fragment)
    ("empty", b"", 400, None, "empty request body; expected an .npz archive"),
    ("not a zip", b'{"instances": []}', 400, None, "body is not a readable zip archive"),
    ("unknown member", npz(in0=np.ones((1, 2), int), label=np.ones(1)), 400, None,
     "unknown member 'label.npy'"),
    ("float ids", npz(in0=np.ones((1, 2))), 400, "$.in0", "expected integer ids, got dtype float64"),
    ("bool ids", npz(in0=np.ones((1, 2), bool)), 400, "$.in0", "got dtype bool"),
    ("object ids", npz(in0=np.array([[1, None]], object)), 400, "$.in0", "got dtype object"),
    ("1-D", npz(in0=np.ones(3, int)), 400, "$.in0", "expected a 2-D (N, L) array, got shape (3,)"),
    ("0-D", npz(in1=np.int64(3)), 400, "$.in1", "got shape ()"),
    ("no rows", npz(in0=np.zeros((0, 4), int)), 400, "$.in0", "at least one instance"),
    ("neither", npz(in0_lengths=np.ones(1, int)), 400, "$.in0_lengths", "in0_lengths without in0"),
    ("nothing", npz(), 400, None, "neither in0 nor in1"),
    ("rows differ", npz(in0=np.ones((2, 2), int), in1=np.ones((3, 2), int)), 400, "$.in1",
     "in1 has 3 rows but in0 has 2"),
    ("out of range", npz(in0=np.array([[1, 2], [3, 50]])), 400, "$.in0[1][1]",
     "token id 50 is out of range; expected an integer in [0, 49] (enc0_vocab_size=50)"),
    ("negative", npz(in1=np.array([[0, 3, -2]])), 400, "$.in1[0][2]", "token id -2 is out of range"),
    ("bad lengths", npz(in0=np.ones((2, 3), int), in0_lengths=np.array([1, 4])), 400,
     "$.in0_lengths", "lengths must be 2 integers in [0, 3]"),
    ("float lengths", npz(in0=np.ones((2, 3), int), in0_lengths=np.ones(2)), 400, "$.in0_lengths",
     "expected integer ids, got dtype float64"),
    ("truncated", npz(in0=np.ones((4, 8), int))[:-40], 400, None, "not a readable zip archive"),
    ("zip version", _cd_version(npz(in0=np.ones((1, 2), int)), 0xFF), 400, None,
     "zip file version 25.5"),
    ("lying header", _lying_header(), 400, "$.in0", "header promises"),
    ("not .npy", _zip_of(in1=b"in0,in1\n1,2\n"), 400, "$.in1", "does not start with the .npy magic"),
    ("not .npy, compressed", _zip_of(zipfile.ZIP_DEFLATED, in0=b"\x93NUMPY"), 400, "$.in0",
     "not a readable .npy array"),
]


@pytest.mark.parametrize(("body", "status", "path", "fragment"), [e[1:] for e in NPZ_ERRORS],
                         ids=[e[0] for e in NPZ_ERRORS])  # fmt: skip
def test_npz_errors_name_the_member_row_and_column(body, status, path, fragment):
    with pytest.raises(WireError) as e:
        decode(body, wire.NPZ)
    assert (e.value.status, e.value.path) == (status, path)
    assert fragment in e.value.message


def test_npz_mutated_bodies_get_a_wire_error_never_another_exception():
    # Seeded byte flips, cuts and deletions of valid archives (stored and deflated):
    # whatever zipfile, zlib or numpy raise inside must come out as a 4xx WireError.
    rng = np.random.default_rng(11)
    bases = [npz(in0=np.arange(40).reshape(4, 10) % 7, in1=np.ones((4, 3), np.int64)),
             npz(True, in0=np.arange(40).reshape(4, 10) % 7),
             npz(in1=np.arange(1, 13, dtype=np.uint16).reshape(3, 4), in1_lengths=np.array([1, 2, 3]))]
    statuses = set()
    for i in range(3000):
        body = bytearray(bases[i % 3])
        for _ in range(rng.integers(1, 4)):
            if not body:
                break
            at = int(rng.integers(len(body)))
            if rng.random() < 0.7:
                body[at] = int(rng.integers(256))
            else:
                del body[at:at + int(rng.integers(1, 50))]
        try:
            decode(bytes(body), wire.NPZ)
            statuses.add(200)
        except WireError as e:
            statuses.add(e.status)
    assert statuses <= {200, 400, 413} and 400 in statuses


def test_npz_corrupt_data_fails_its_checksum():
    body = bytearray(npz(in0=np.arange(1, 41).reshape(4, 10)))
    body[200] ^= 0xFF  # inside the member's data
    with pytest.raises(WireError) as e:
        decode(bytes(body), wire.NPZ)
    assert (e.value.status, e.value.path) == (400, "$.in0") and "CRC" in e.value.message


def test_npz_members_that_expand_too_far_are_413(monkeypatch):
    body = npz(True, in0=np.zeros((1000, 100), np.int64) + 1)  # 800 kB of ids, ~1 kB compressed
    assert len(body) < 10_000
    monkeypatch.setattr(wire, "NPZ_MAX_EXPANDED_BYTES", 100_000)
    with pytest.raises(WireError) as e:
        decode(body, wire.NPZ, vocab_sizes=(50, 40), max_seq_lens=(100, 100))
    assert e.value.status == 413 and "expand to more than 100000 bytes" in e.value.message
    monkeypatch.setattr(wire, "NPZ_MAX_EXPANDED_BYTES", 1_000_000)
    assert len(decode(body, wire.NPZ, max_seq_lens=(100, 100))) == 1000


def _zeros_npz(**shapes: tuple[int, int]) -> bytes:
    """A deflated .npz of int8 zero arrays, written 1 MiB at a time: tens of MiB of ids
    in a body of tens of KiB, without holding the arrays in memory."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name, shape in shapes.items():
            with z.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(
                    f, {"descr": "|i1", "fortran_order": False, "shape": shape})
                left, block = shape[0] * shape[1], bytes(1 << 20)
                while left:
                    f.write(block[:min(left, len(block))])
                    left -= min(left, len(block))
    return out.getvalue()


@pytest.mark.parametrize("shapes", [{"in0": ((64 << 10) + 1, 1024)},
                                    {"in0": (1025, 1024), "in1": (63 << 10, 1024)}],
                         ids=["one member", "two members"])
def test_npz_members_expanding_past_64_mib_are_413_before_they_are_inflated(shapes):
    # The real cap, not a patched one: 64 MiB of ids, counted over all members together
    # (here each of the two is under it), refused from the archive's directory before
    # the member that passes it is inflated.
    import tracemalloc

    assert wire.NPZ_MAX_EXPANDED_BYTES == 64 << 20
    body = _zeros_npz(**shapes)
    assert len(body) < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(WireError) as e:
            decode(body, wire.NPZ, vocab_sizes=(50, 50), max_seq_lens=(1024, 1024))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert e.value.status == 413
    assert e.value.message == f"the archive's members expand to more than {64 << 20} bytes"
    assert peak < 8 << 20, f"{peak} bytes allocated while refusing the archive"


def test_unsupported_content_type_names_all_three_request_types():
    with pytest.raises(WireError) as e:
        decode(b"1,2", "text/csv")
    assert e.value.status == 415
    assert f"send {JSON}, {JSONLINES} or {wire.NPZ}" in e.value.message


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
    ("application/x-npy", JSON, wire.NPY),
    ("application/x-npy", JSONLINES, wire.NPY),
    ("application/json;q=0.5, application/x-npy", JSON, wire.NPY),
    ("application/x-npy;q=0.5, */*", JSONLINES, JSONLINES),
    ("application/x-npy;q=0", JSON, 406),
    # An .npz request (binary in) answers .npy unless Accept asks for a JSON type.
    (None, wire.NPZ, wire.NPY),
    ("*/*", wire.NPZ, wire.NPY),
    ("application/*", wire.NPZ, wire.NPY),
    ("application/json", wire.NPZ, JSON),
    ("application/jsonlines", wire.NPZ, JSONLINES),
    ("application/json, application/x-npy", wire.NPZ, wire.NPY),  # tie: the binary type
    ("text/html", wire.NPZ, 406),
]


@pytest.mark.parametrize(("accept", "request_type", "expected"), NEGOTIATION)
def test_accept_negotiation(accept, request_type, expected):
    if expected == 406:
        with pytest.raises(WireError) as e:
            wire.negotiate(accept, request_type)
        assert e.value.status == 406
        assert "use application/json, application/jsonlines or application/x-npy" in e.value.message
    else:
        assert wire.negotiate(accept, request_type) == expected


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
    for media in (JSON, JSONLINES):
        body = wire.encode_response("embeddings", x, media)
        # A JSON parser (msgspec here, the stdlib below) reads doubles; cast to float32
        # they are the same bits that went in.
        rows = response_records(body, media, "embeddings")
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
