"""NumPy bodies: .npz requests (decoding, limits, errors with member/row/column paths) and
.npy responses (the float32 array, byte for byte what numpy.save writes)."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest

from o2v_jax import media, npz, wire
from o2v_jax.wire import JSON, WireError

LIMITS = {"vocab_sizes": (50, 40), "max_seq_lens": (8, 6)}
CASES = {
    "scores": [{"in0": [1, 2, 3], "in1": [4]}, {"in0": [49], "in1": [0, 39, 7]}],
    "in0": [{"in0": [1, 2, 3]}, {"in0": [49, 0]}, {"in0": [5]}],
    "in1": [{"in1": [39]}, {"in1": [1, 2, 3, 4, 5, 6]}],
}


def decode(body: bytes, content_type: str | None = media.NPZ, **kw) -> wire.Request:
    return wire.decode_request(body, content_type, **{**LIMITS, **kw})


# --- application/x-npy responses --------------------------------------------------------


def test_npy_responses_are_the_float32_array_bit_for_bit():
    # The .npy extension (Accept: application/x-npy): what numpy.load (and the SageMaker
    # SDK's NumpyDeserializer) reads back is exactly the array, NaN and all.
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 7)).astype(np.float32)
    x[1, 2] = np.nan
    for mode in ("scores", "embeddings"):
        body = wire.encode_response(mode, x, media.NPY)
        back = np.load(io.BytesIO(body), allow_pickle=False)
        assert back.dtype == np.float32 and back.shape == (5, 7)
        np.testing.assert_array_equal(back.view(np.uint32), x.view(np.uint32))
        assert npz.npy_rows(body) == 5
        saved = io.BytesIO()
        np.save(saved, x)
        assert body == saved.getvalue()  # byte for byte what numpy.save writes
    empty = wire.encode_response("embeddings", np.zeros((0, 4), np.float32), media.NPY)
    assert np.load(io.BytesIO(empty)).shape == (0, 4) and npz.npy_rows(empty) == 0
    with pytest.raises(WireError) as e:
        wire.encode_response("embeddings", x, "application/x-npz")
    assert e.value.status == 406


# --- application/x-npz requests --------------------------------------------------------


def archive(compressed: bool = False, **arrays) -> bytes:
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
    want = decode(json.dumps({"instances": instances}).encode(), JSON)
    arrays = {k: padded([i[k] for i in instances], width=7) for k in ("in0", "in1")
              if k in instances[0]}
    req = decode(archive(compressed, **arrays), media.NPZ)
    assert (req.mode, req.encoder, req.media_type) == (want.mode, want.encoder, media.NPZ)
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
        req = decode(archive(in0=a), media.NPZ)
        assert req.in0.to_lists() == [[3, 0, 5], [7], [1, 2, 3, 4, 5, 6, 7, 8]]
        assert req.truncated == (1, 0)


def test_npz_rows_of_zeros_or_no_columns_are_empty_sequences():
    # As an empty JSON list: allowed, embeds as an all-padding row.
    assert decode(archive(in0=np.zeros((2, 3), int)), media.NPZ).in0.to_lists() == [[], []]
    assert decode(archive(in1=np.zeros((2, 0), int)), media.NPZ).in1.to_lists() == [[], []]


def test_npz_lengths_members_keep_trailing_zeros_and_caps_apply():
    arr = np.array([[4, 0, 0, 9], [5, 6, 0, 0]], np.int64)
    req = decode(archive(in0=arr, in0_lengths=np.array([2, 3])), media.NPZ)
    assert req.in0.to_lists() == [[4, 0], [5, 6, 0]]
    req = decode(archive(in0=arr, in1=arr), f"{media.NPZ}; infer_max_seqlens=1,3")
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
    ("unknown member", archive(in0=np.ones((1, 2), int), label=np.ones(1)), 400, None,
     "unknown member 'label.npy'"),
    ("float ids", archive(in0=np.ones((1, 2))), 400, "$.in0", "expected integer ids, got dtype float64"),
    ("bool ids", archive(in0=np.ones((1, 2), bool)), 400, "$.in0", "got dtype bool"),
    ("object ids", archive(in0=np.array([[1, None]], object)), 400, "$.in0", "got dtype object"),
    ("1-D", archive(in0=np.ones(3, int)), 400, "$.in0", "expected a 2-D (N, L) array, got shape (3,)"),
    ("0-D", archive(in1=np.int64(3)), 400, "$.in1", "got shape ()"),
    ("no rows", archive(in0=np.zeros((0, 4), int)), 400, "$.in0", "at least one instance"),
    ("neither", archive(in0_lengths=np.ones(1, int)), 400, "$.in0_lengths", "in0_lengths without in0"),
    ("nothing", archive(), 400, None, "neither in0 nor in1"),
    ("rows differ", archive(in0=np.ones((2, 2), int), in1=np.ones((3, 2), int)), 400, "$.in1",
     "in1 has 3 rows but in0 has 2"),
    ("out of range", archive(in0=np.array([[1, 2], [3, 50]])), 400, "$.in0[1][1]",
     "token id 50 is out of range; expected an integer in [0, 49] (enc0_vocab_size=50)"),
    ("negative", archive(in1=np.array([[0, 3, -2]])), 400, "$.in1[0][2]", "token id -2 is out of range"),
    ("bad lengths", archive(in0=np.ones((2, 3), int), in0_lengths=np.array([1, 4])), 400,
     "$.in0_lengths", "lengths must be 2 integers in [0, 3]"),
    ("float lengths", archive(in0=np.ones((2, 3), int), in0_lengths=np.ones(2)), 400, "$.in0_lengths",
     "expected integer ids, got dtype float64"),
    ("truncated", archive(in0=np.ones((4, 8), int))[:-40], 400, None, "not a readable zip archive"),
    ("zip version", _cd_version(archive(in0=np.ones((1, 2), int)), 0xFF), 400, None,
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
        decode(body, media.NPZ)
    assert (e.value.status, e.value.path) == (status, path)
    assert fragment in e.value.message


def test_npz_mutated_bodies_get_a_wire_error_never_another_exception():
    # Seeded byte flips, cuts and deletions of valid archives (stored and deflated):
    # whatever zipfile, zlib or numpy raise inside must come out as a 4xx WireError.
    rng = np.random.default_rng(11)
    bases = [archive(in0=np.arange(40).reshape(4, 10) % 7, in1=np.ones((4, 3), np.int64)),
             archive(True, in0=np.arange(40).reshape(4, 10) % 7),
             archive(in1=np.arange(1, 13, dtype=np.uint16).reshape(3, 4), in1_lengths=np.array([1, 2, 3]))]
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
            decode(bytes(body), media.NPZ)
            statuses.add(200)
        except WireError as e:
            statuses.add(e.status)
    assert statuses <= {200, 400, 413} and 400 in statuses


def test_npz_corrupt_data_fails_its_checksum():
    body = bytearray(archive(in0=np.arange(1, 41).reshape(4, 10)))
    body[200] ^= 0xFF  # inside the member's data
    with pytest.raises(WireError) as e:
        decode(bytes(body), media.NPZ)
    assert (e.value.status, e.value.path) == (400, "$.in0") and "CRC" in e.value.message


def test_npz_members_that_expand_too_far_are_413(monkeypatch):
    body = archive(True, in0=np.zeros((1000, 100), np.int64) + 1)  # 800 kB of ids, ~1 kB compressed
    assert len(body) < 10_000
    monkeypatch.setattr(npz, "MAX_EXPANDED_BYTES", 100_000)
    with pytest.raises(WireError) as e:
        decode(body, media.NPZ, vocab_sizes=(50, 40), max_seq_lens=(100, 100))
    assert e.value.status == 413 and "expand to more than 100000 bytes" in e.value.message
    monkeypatch.setattr(npz, "MAX_EXPANDED_BYTES", 1_000_000)
    assert len(decode(body, media.NPZ, max_seq_lens=(100, 100))) == 1000


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

    assert npz.MAX_EXPANDED_BYTES == 64 << 20
    body = _zeros_npz(**shapes)
    assert len(body) < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(WireError) as e:
            decode(body, media.NPZ, vocab_sizes=(50, 50), max_seq_lens=(1024, 1024))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert e.value.status == 413
    assert e.value.message == f"the archive's members expand to more than {64 << 20} bytes"
    assert peak < 8 << 20, f"{peak} bytes allocated while refusing the archive"
