"""Reading HTTP/1.1 requests off a socket: body framing and read deadlines.

The transport (:mod:`o2v_jax.http`) reads every request through a :class:`Reader`,
whose reads stop at a deadline for the whole request head and the whole body, and reads
bodies with :func:`read_body` after :func:`framing` has checked the headers. Every
problem is a :class:`Refused` carrying the HTTP status to answer with.

API::

    Refused(status, message)
    Reader(sock, read_timeout): .limit(seconds, message), .deadline
    framing(headers, method, max_body_mb) -> ("length", n) | ("chunked", 0) | ("none", 0)
    read_body(rfile, kind, length, max_body_mb) -> bytes
"""

from __future__ import annotations

import io
import re
import socket
import time
from typing import Any

MAX_LINE = 65536  # the stdlib's limit for the request line and each header line
_BODY_METHODS = ("POST", "PUT", "PATCH")
_LENGTH = re.compile(r"[0-9]{1,18}")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")


class Refused(Exception):
    """A request refused before it reaches the app; the connection is then closed."""

    def __init__(self, status: int, message: str):
        super().__init__(status, message)
        self.status, self.message = status, message


class Reader(io.RawIOBase):
    """A connection's raw input: each read waits at most ``read_timeout`` s, and none
    goes past ``deadline`` (set per request head and body), so a client that trickles
    bytes cannot hold a handler thread, and a connection slot, for longer."""

    def __init__(self, sock: socket.socket, read_timeout: float):
        self._sock, self._timeout = sock, read_timeout
        self.deadline: float | None = None  # time.monotonic() value; None: no deadline
        self._late = ""  # the 408 message past it

    def limit(self, seconds: float, message: str) -> None:
        self.deadline, self._late = time.monotonic() + seconds, message

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.deadline is None:
            return self._sock.recv_into(buffer)
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise Refused(408, self._late)
        self._sock.settimeout(min(self._timeout, left))
        try:
            return self._sock.recv_into(buffer)
        except TimeoutError:
            if time.monotonic() >= self.deadline:
                raise Refused(408, self._late) from None
            raise
        finally:
            self._sock.settimeout(self._timeout)  # writes keep the full timeout


def framing(headers: Any, method: str, max_body_mb: int) -> tuple[str, int]:
    """How the body is delimited: ("chunked", 0), ("length", n) or ("none", 0).

    Args:
        headers: the request headers (an ``email.message.Message``).
        method: the request method.
        max_body_mb: the body cap in MiB.

    Raises:
        Refused: 400 contradictory or malformed headers, 411 a POST without either,
            413 a Content-Length over the cap, 501 an unknown transfer coding.
    """
    te = headers.get_all("Transfer-Encoding") or []
    cl = headers.get_all("Content-Length") or []
    if te:
        if cl:  # RFC 9112 §6.1: a request smuggling vector; refuse it
            raise Refused(400, "request has both Transfer-Encoding and Content-Length; send one")
        codings = [c.strip().lower() for v in te for c in v.split(",") if c.strip()]
        if codings != ["chunked"]:
            raise Refused(501, f"unsupported Transfer-Encoding {', '.join(te)!r}; only chunked is")
        return "chunked", 0
    if cl:
        values = {v.strip() for v in ",".join(cl).split(",")}
        value = values.pop()
        if values or not _LENGTH.fullmatch(value):
            raise Refused(400, f"invalid Content-Length {', '.join(cl)!r}")
        length, cap = int(value), max_body_mb << 20
        if length > cap:
            raise Refused(413, f"request body is {length} bytes; the limit is {cap} bytes ({max_body_mb} MiB)")
        return ("length", length) if length else ("none", 0)
    if method in _BODY_METHODS:
        raise Refused(411, "Content-Length required (or Transfer-Encoding: chunked)")
    return "none", 0


def read_body(rfile: io.BufferedReader, kind: str, length: int, max_body_mb: int) -> bytes:
    """The body that :func:`framing` described (``kind``, ``length``)."""
    if kind == "length":
        return _read_exact(rfile, length)
    if kind == "chunked":
        return _read_chunked(rfile, max_body_mb)
    return b""


def _read_exact(rfile: io.BufferedReader, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        part = rfile.read1(min(n - got, 1 << 16))
        if not part:
            raise Refused(400, f"connection closed after {got} of {n} body bytes")
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _read_chunked(rfile: io.BufferedReader, max_body_mb: int) -> bytes:
    cap, parts, total = max_body_mb << 20, [], 0
    while True:
        line = rfile.readline(1024)
        size = _CHUNK_SIZE.fullmatch(line.split(b";", 1)[0].strip())
        if not line.endswith(b"\n") or size is None:
            raise Refused(400, f"malformed chunk size line {line[:40]!r} after {total} body bytes")
        n = int(size.group(), 16)
        if n == 0:
            break
        total += n
        if total > cap:
            raise Refused(413, f"chunked request body exceeds the limit of {cap} bytes ({max_body_mb} MiB)")
        parts.append(_read_exact(rfile, n))
        if rfile.readline(3).strip():
            raise Refused(400, f"chunk of {n} bytes not followed by CRLF")
    for _ in range(100):  # trailer fields, ignored
        line = rfile.readline(MAX_LINE + 1)
        if line in (b"\r\n", b"\n", b""):
            return b"".join(parts)
    raise Refused(400, "more than 100 trailer lines after a chunked body")
