"""NumPy bodies: ``application/x-npz`` requests in, ``application/x-npy`` responses out.

Our two extensions to SageMaker's JSON types (docs/inference.md): a request may be an
.npz archive (numpy.savez or savez_compressed) of 2-D integer arrays named in0 / in1,
0-padded on the right, with optional in0_lengths / in1_lengths; a response may be the
float32 (N, K) array as a .npy file (what the SageMaker Python SDK's NumpyDeserializer
reads). No JSON to parse or print: for clients that already hold arrays.

:mod:`o2v_jax.wire` owns the media types, :class:`~o2v_jax.wire.Request` and
:class:`~o2v_jax.media.WireError`, and hands these two formats to this module.

API::

    MEMBERS                              the member names an archive may hold
    MAX_EXPANDED_BYTES                   what its members may expand to, together (413 above)
    decode(body, vocab_sizes, seq_lens) -> wire.Request
    encode_npy(values) -> bytes          float32 (N, K) -> the bytes np.save writes
    npy_rows(body) -> int                rows of an .npy body, from its header alone
"""

from __future__ import annotations

import io
import math
import struct
import zipfile
import zlib

import numpy as np

from o2v_jax.ragged import TokenRangeError, check_tokens, unpad
from o2v_jax.media import NPZ, WireError
from o2v_jax.wire import KEYS, Request, range_error

MEMBERS = ("in0", "in1", "in0_lengths", "in1_lengths")
# Compressed members can expand far beyond the body: this bounds the memory one request
# may take, whatever its size on the wire.
MAX_EXPANDED_BYTES = 64 << 20


def decode(body: bytes, vocab_sizes: tuple[int, int], seq_lens: tuple[int, int]) -> Request:
    """An application/x-npz body: in0 and/or in1 (N, L) integer arrays -> a Request.

    Called by :func:`o2v_jax.wire.decode_request`, which has checked the Content-Type and
    the body size; ``seq_lens`` are the length caps it worked out (infer_max_seqlens).

    Paths in errors: ``$.in0`` (a member), ``$.in0[3][7]`` (row 3, column 7).
    """
    expected = ("an .npz archive (numpy.savez) of in0 and/or in1: 2-D integer (N, L) arrays, "
                "0-padded, with optional in0_lengths / in1_lengths")
    if not body:
        raise WireError(400, f"empty request body; expected {expected}")
    try:
        archive = zipfile.ZipFile(io.BytesIO(body))
    except (zipfile.BadZipFile, ValueError, EOFError, OSError, NotImplementedError,
            struct.error) as e:  # not a zip, truncated, a version zipfile cannot read
        raise WireError(400, f"body is not a readable zip archive ({e}); expected {expected}") from None
    arrays: dict[str, np.ndarray] = {}
    expanded = 0
    with archive:
        for info in archive.infolist():
            key = info.filename.removesuffix(".npy")
            if key not in MEMBERS:
                raise WireError(400, f"unknown member {info.filename!r}; expected {expected}")
            if key in arrays:
                raise WireError(400, f"member {key!r} appears twice", f"$.{key}")
            expanded += info.file_size
            if expanded > MAX_EXPANDED_BYTES:
                raise WireError(413, f"the archive's members expand to more than "
                                     f"{MAX_EXPANDED_BYTES} bytes")
            arrays[key] = _read_member(body, archive, info, key)
    ids = [arrays.get(k) for k in KEYS]
    for side, key in enumerate(KEYS):
        if ids[side] is None and f"{key}_lengths" in arrays:
            raise WireError(400, f"{key}_lengths without {key}", f"$.{key}_lengths")
    if ids[0] is None and ids[1] is None:
        raise WireError(400, f"the archive has neither in0 nor in1; expected {expected}")
    for key, arr in zip(KEYS, ids):
        if arr is not None and arr.ndim != 2:
            raise WireError(400, f"expected a 2-D (N, L) array, got shape {arr.shape}", f"$.{key}")
        if arr is not None and arr.shape[0] == 0:
            raise WireError(400, "expected at least one instance (a row)", f"$.{key}")
    if ids[0] is not None and ids[1] is not None and len(ids[0]) != len(ids[1]):
        raise WireError(400, f"in1 has {len(ids[1])} rows but in0 has {len(ids[0])}; scores "
                             "need one in0 row per in1 row", "$.in1")
    mode = "scores" if ids[0] is not None and ids[1] is not None else "embeddings"
    packed, truncated = [None, None], [0, 0]
    for side, key in enumerate(KEYS):
        if ids[side] is None:
            continue
        try:
            tokens, lengths = unpad(ids[side], arrays.get(f"{key}_lengths"))
        except ValueError as e:
            raise WireError(400, str(e), f"$.{key}_lengths") from None
        try:
            packed[side], truncated[side] = check_tokens(tokens, lengths, vocab_sizes[side],
                                                         seq_lens[side])
        except TokenRangeError as e:
            raise range_error(e.value, side, vocab_sizes[side],
                               f"$.{key}[{e.row}][{e.position}]") from None
    encoder = None if mode == "scores" else KEYS[0 if ids[0] is not None else 1]
    return Request(mode, encoder, packed[0], packed[1], NPZ, seq_lens, tuple(truncated))


def _read_member(body: bytes, archive: zipfile.ZipFile, info: zipfile.ZipInfo,
                 key: str) -> np.ndarray:
    """One .npy member, its header checked before any data is read or allocated.

    A stored (uncompressed, numpy.savez) member is read in place from the body, no copy.
    """
    try:
        data = _member_data(body, archive, info)
        if data[:6] != b"\x93NUMPY" or len(data) < 10:
            raise ValueError("it does not start with the .npy magic string")
        start = 10 if data[6] == 1 else 12
        (size,) = struct.unpack_from("<H" if start == 10 else "<I", data, 8)
        f = io.BytesIO(bytes(data[:start + size]))
        version = np.lib.format.read_magic(f)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read(f)
        if dtype.kind not in "iu":
            raise WireError(400, f"expected integer ids, got dtype {dtype}", f"$.{key}")
        count = math.prod(shape)
        if count * dtype.itemsize > len(data) - f.tell():
            raise ValueError(f"its header promises {count * dtype.itemsize} bytes of data; "
                             f"it holds {len(data) - f.tell()}")
        flat = np.frombuffer(data, dtype, count, offset=f.tell())
    except WireError:
        raise
    except (ValueError, EOFError, OSError, struct.error, zipfile.BadZipFile, zlib.error,
            NotImplementedError, RuntimeError) as e:
        # bad header, truncated data, bad CRC, a broken deflate stream, unknown
        # compression, encryption
        raise WireError(400, f"member {info.filename!r} is not a readable .npy array: {e}",
                        f"$.{key}") from None
    return flat.reshape(shape, order="F" if fortran else "C")


def _member_data(body: bytes, archive: zipfile.ZipFile, info: zipfile.ZipInfo):
    """A member's bytes, CRC-checked: a view into ``body`` when stored, else inflated."""
    offset = info.header_offset
    if (info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 1
            and body[offset:offset + 4] == b"PK\x03\x04"):
        name, extra = struct.unpack_from("<HH", body, offset + 26)
        start = offset + 30 + name + extra
        data = memoryview(body)[start:start + info.file_size]
        if len(data) != info.file_size or zlib.crc32(data) != info.CRC:
            raise zipfile.BadZipFile(f"Bad CRC-32 for file {info.filename!r}")
        return data
    with archive.open(info) as f:
        return f.read()


def encode_npy(values: np.ndarray) -> bytes:
    """The bytes ``np.save`` writes for a C-contiguous float32 (N, K) array, with one copy
    of the data instead of its three."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(values))
    return b"".join([header.getvalue(), values.data])


def npy_rows(body: bytes) -> int:
    """The row count of an NPY response body, read from its header alone."""
    f = io.BytesIO(body)
    version = np.lib.format.read_magic(f)
    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
            else np.lib.format.read_array_header_2_0)
    shape, _, _ = read(f)
    return int(shape[0])
