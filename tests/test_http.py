"""The HTTP transport over real sockets, and serve() in a process: framing, limits,
timeouts, keep-alive, JSON error bodies, the access log, draining shutdown.

Most tests use FakePredictor (tests/fake_model.py: the real request path, values
computed from the tokens), so they check the server without compiling anything; one
end-to-end test serves a real tiny model. Every socket has a timeout, so a hang fails
instead of blocking.

Ordering comes from events (a gated FakePredictor, a predictor's call list, a server's
log line, a refused connect), never from sleeps; the only time bounds are hang guards
(HANG seconds) and lower bounds a timeout guarantees, so a loaded machine cannot fail them.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import group_pairs, tiny_hp, write_jsonl
from fake_model import EMBED, HANG, PAIRS, VOCAB, FakePredictor, assert_values, wait_until

from o2v_jax import wire
from o2v_jax.app import App, Settings
from o2v_jax.batcher import Batcher
from o2v_jax.http import Server
from o2v_jax.worker import load_predictor

REPO = Path(__file__).resolve().parents[1]


def settings(**overrides) -> Settings:
    """Test settings: a free port, and no dynamic batching unless asked for (the tests
    that count predictor calls hold one call per request)."""
    return Settings(model_dir=Path("unused"), port=0, **{"batching": False, **overrides})


@contextlib.contextmanager
def serving(predictor=None, **overrides):
    """A started Server on 127.0.0.1 with an ephemeral port, its App ready with
    ``predictor`` (if given); yields (app, port)."""
    s = settings(**overrides)
    app = App(s)
    if predictor is not None:
        app.ready(predictor)
    srv = Server(app, s)
    srv.start()
    try:
        yield app, srv.address[1]
    finally:
        assert srv.stop(drain_timeout=HANG)


def call(port, method, path, body=None, headers=None, conn=None):
    """One request with http.client; returns (status, headers dict, body)."""
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=HANG)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        if conn is None:
            c.close()


def raw(port, data: bytes, timeout: float = HANG) -> tuple[int, dict, bytes]:
    """Send raw bytes, read until the server closes; parse one response."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        return parse(recv_all(s))


def recv_all(s: socket.socket) -> bytes:
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def trickle(s: socket.socket, byte: bytes, t0: float, what: str):
    """Send ``byte`` at a time until the server answers (or the hang guard fires); the
    parsed response."""
    s.settimeout(0.01)
    first = b""
    while not first:
        assert time.monotonic() - t0 < HANG, f"the trickled {what} was never cut off"
        s.sendall(byte)
        with contextlib.suppress(TimeoutError):
            first = s.recv(65536)
    s.settimeout(HANG)
    return parse(first + recv_all(s))


def parse(response: bytes) -> tuple[int, dict, bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    headers = {k.lower(): v for k, v in headers.items()}
    assert len(body) == int(headers["content-length"])
    return int(lines[0].split()[1]), headers, body


def assert_json_error(status, headers, body, want_status, path=None, match=""):
    assert status == want_status, body
    assert headers["content-type"] == "application/json"
    err = json.loads(body)
    assert set(err) == {"error", "path"}
    assert err["path"] == path
    assert re.search(match, err["error"]), err["error"]
    return err


def test_the_serving_modules_do_not_import_jax():
    # /ping must answer while the model loads: binding and answering need no jax.
    code = ("import sys, o2v_jax.http, o2v_jax.app, o2v_jax.batcher, o2v_jax.wire, o2v_jax.npz, "
            "o2v_jax.worker, o2v_jax.supervisor; "
            "sys.exit(sorted({'jax', 'flax'} & set(sys.modules)) or 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=os.environ | {"PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr


# --------------------------------------------------------------------------- over sockets


def test_ping_answers_503_at_once_then_200_with_empty_body():
    # "At once": the socket answers before any model exists (App.ready not yet called),
    # so /ping never waits on loading. (SageMaker's 250 ms is a property of start-up
    # time on the real machine, not something a shared test machine can time.)
    with serving() as (app, port):
        status, headers, body = call(port, "GET", "/ping")
        assert_json_error(status, headers, body, 503, match="loading")
        assert headers["retry-after"] == "1"
        app.ready(FakePredictor())
        status, headers, body = call(port, "GET", "/ping")
        assert (status, body, headers["content-length"]) == (200, b"", "0")
        status, headers, body = call(port, "HEAD", "/ping")
        assert (status, body) == (200, b"")


@pytest.mark.parametrize("content_type", ["application/json", "application/jsonlines"])
@pytest.mark.parametrize("accept", [None, "application/json", "application/jsonlines",
                                    "application/x-npy"])
@pytest.mark.parametrize("records", [PAIRS, EMBED], ids=["scores", "embeddings"])
def test_invocations_formats_on_one_keep_alive_connection(content_type, accept, records):
    with serving(FakePredictor()) as (_, port):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HANG)
        if content_type == "application/json":
            body = json.dumps({"instances": records})
        else:
            body = "".join(json.dumps(r) + "\n" for r in records)
        headers = {"Content-Type": content_type} | ({"Accept": accept} if accept else {})
        want_type = accept or content_type
        key = "scores" if "in0" in records[0] and "in1" in records[0] else "embeddings"
        sock = None
        for _ in range(3):  # several requests, one connection
            status, got_headers, out = call(port, "POST", "/invocations", body, headers, conn=conn)
            assert status == 200 and got_headers["content-type"] == want_type
            assert "connection" not in got_headers
            sock = sock or conn.sock
            assert conn.sock is sock  # http.client reconnects silently if the server closed
            if want_type == "application/json":
                values = [p[key] for p in json.loads(out)["predictions"]]
            elif want_type == "application/x-npy":  # the float32 array itself
                values = np.load(io.BytesIO(out), allow_pickle=False)
                assert values.dtype == np.float32
                assert wire.count_records(out, want_type) == len(records)
            else:
                values = [json.loads(line)[key] for line in out.decode().splitlines()]
            assert_values(values, records)
        conn.close()


def npz_body(records: list[dict]) -> bytes:
    """The records as an application/x-npz body: 0-padded int32 arrays per key."""
    arrays = {}
    for key in ("in0", "in1"):
        if key in records[0]:
            seqs = [r[key] for r in records]
            arrays[key] = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
            for i, seq in enumerate(seqs):
                arrays[key][i, :len(seq)] = seq
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.mark.parametrize("records", [PAIRS, EMBED], ids=["scores", "embeddings"])
def test_npz_requests_answer_npy_by_default_and_json_when_asked(records):
    with serving(FakePredictor()) as (_, port):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HANG)
        body = npz_body(records)
        key = "scores" if len(records[0]) == 2 else "embeddings"
        for accept, want_type in ((None, "application/x-npy"), ("*/*", "application/x-npy"),
                                  ("application/json", "application/json")):
            headers = {"Content-Type": "application/x-npz"} | ({"Accept": accept} if accept else {})
            status, h, out = call(port, "POST", "/invocations", body, headers, conn=conn)
            assert status == 200 and h["content-type"] == want_type
            if want_type == "application/x-npy":
                values = np.load(io.BytesIO(out), allow_pickle=False)
            else:
                values = [p[key] for p in json.loads(out)["predictions"]]
            assert_values(values, records)
        # A broken archive is a 400 with a JSON body; the connection and server keep serving.
        status, h, out = call(port, "POST", "/invocations", body[:-10],
                              {"Content-Type": "application/x-npz"}, conn=conn)
        assert_json_error(status, h, out, 400, match="not a readable zip archive")
        status, h, out = call(port, "POST", "/invocations", npz_body([{"in0": [1, VOCAB]}]),
                              {"Content-Type": "application/x-npz"}, conn=conn)
        assert_json_error(status, h, out, 400, path="$.in0[0][1]", match="out of range")
        assert call(port, "POST", "/invocations", body, {"Content-Type": "application/x-npz"},
                    conn=conn)[0] == 200
        conn.close()


def test_empty_lines_before_a_request_line_are_skipped_and_too_many_are_a_400():
    # RFC 9112 §2.2; found by fuzzing: the stdlib closed such connections without an answer.
    with serving(FakePredictor()) as (_, port):
        status, _, body = raw(port, b"\r\n\n\r\nGET /ping HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert (status, body) == (200, b"")
        body = b'{"in0": [1]}\n'
        status, h, out = raw(port, b"\r\nPOST /invocations HTTP/1.1\r\nConnection: close\r\n"
                                   b"Content-Type: application/jsonlines\r\nContent-Length: %d\r\n\r\n%s"
                                   % (len(body), body))
        assert status == 200 and h["content-type"] == "application/jsonlines"
        for junk in (b"\r\n" * 9, b"   \r\n"):
            assert_json_error(*raw(port, junk + b"GET /ping HTTP/1.1\r\n\r\n"), 400,
                              match="empty request line")
        assert call(port, "GET", "/ping")[0] == 200


def test_error_statuses_have_json_bodies():
    with serving(FakePredictor(), max_body_mb=1) as (_, port):
        status, h, body = call(port, "POST", "/invocations", b'{"instances": [{"in0": [1, 2}]}',
                               {"Content-Type": "application/json"})
        assert_json_error(status, h, body, 400, match="malformed JSON at column")
        status, h, body = call(port, "POST", "/invocations", b'{"in0": [1]}\n{"in0": [1, 99]}\n',
                               {"Content-Type": "application/jsonlines"})
        assert_json_error(status, h, body, 400, path="$[line 2].in0[1]", match="out of range")
        assert_json_error(*call(port, "GET", "/metrics"), 404, match="no endpoint '/metrics'")
        status, h, body = call(port, "PUT", "/invocations", b"{}")
        assert_json_error(status, h, body, 405)
        assert h["allow"] == "POST"
        status, h, body = call(port, "POST", "/ping", b"")
        assert_json_error(status, h, body, 405)
        assert h["allow"] == "GET, HEAD"
        ok = json.dumps({"instances": EMBED})
        assert_json_error(*call(port, "POST", "/invocations", ok, {"Accept": "text/html"}), 406, match="Accept")
        assert_json_error(*call(port, "POST", "/invocations", "1,2", {"Content-Type": "text/csv"}), 415)
        # 411: a POST without Content-Length or chunked framing.
        assert_json_error(*raw(port, b"POST /invocations HTTP/1.1\r\nHost: x\r\n\r\n"), 411)
        # 413 from Content-Length alone.
        big = (1 << 20) + 1
        status, h, body = raw(port, b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % big)
        assert_json_error(status, h, body, 413, match=f"{big} bytes; the limit is {1 << 20}")
        assert h["connection"] == "close"
        # A malformed request line gets JSON too, never the stdlib's HTML page.
        assert_json_error(*raw(port, b"GET /ping HTTP/9\r\n\r\n"), 400, match="version")
        assert_json_error(*raw(port, b"POST /invocations HTTP/1.1\r\nContent-Length: 1\r\n"
                                     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"), 400, match="both")
        assert_json_error(*raw(port, b"POST /invocations HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"), 501)
        assert call(port, "GET", "/ping")[0] == 200  # still serving


def test_oversize_body_is_refused_without_reading_it():
    with serving(FakePredictor(), max_body_mb=1) as (_, port):
        # Announce 50 MiB, send 64 KiB of it and wait: the 413 must come back without the
        # rest (a server that read on would wait for it, then answer 408, not 413).
        with socket.create_connection(("127.0.0.1", port), timeout=HANG) as s:
            s.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % (50 << 20) + b" " * 65536)
            status, h, body = parse(recv_all(s))
        assert_json_error(status, h, body, 413)
        # Chunked: refused as soon as the running total passes the cap.
        with socket.create_connection(("127.0.0.1", port), timeout=HANG) as s:
            s.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            chunk = b"%x\r\n%s\r\n" % (1 << 19, b" " * (1 << 19))
            s.sendall(chunk * 2)  # exactly 1 MiB: still allowed
            s.sendall(b"1\r\n \r\n")  # one byte more
            status, h, body = parse(recv_all(s))
        assert_json_error(status, h, body, 413, match="chunked")
        # Expect: 100-continue gets the 413 instead of "100 Continue".
        status, h, body = raw(port, b"POST /invocations HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                                    b"Content-Length: %d\r\n\r\n" % (2 << 20))
        assert_json_error(status, h, body, 413)


def test_chunked_body_and_expect_100_continue_are_served():
    records = EMBED
    payload = json.dumps({"instances": records}).encode()
    with serving(FakePredictor()) as (_, port):
        chunks = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in (payload[:10], payload[10:]))
        status, h, body = raw(port, b"POST /invocations HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                                    b"Content-Type: application/json\r\nConnection: close\r\n\r\n"
                                    + chunks + b"0\r\nX-Trailer: 1\r\n\r\n")
        assert status == 200
        assert_values([p["embeddings"] for p in json.loads(body)["predictions"]], records)
        with socket.create_connection(("127.0.0.1", port), timeout=HANG) as s:
            s.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nConnection: close\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(payload))
            assert s.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
            s.sendall(payload)
            status, h, body = parse(recv_all(s))
        assert status == 200 and len(json.loads(body)["predictions"]) == 3


def test_a_stalled_client_does_not_hold_up_the_others():
    # The stalled and the silent connection come first (a server that served one
    # connection at a time would take the stalled one first); read_timeout is longer
    # than any wait here, so the others are answered while both are still open.
    with serving(FakePredictor(), read_timeout=HANG) as (_, port):
        stalled = socket.create_connection(("127.0.0.1", port), timeout=HANG)
        silent = socket.create_connection(("127.0.0.1", port), timeout=HANG)
        stalled.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HANG)
        for _ in range(5):
            status, _, out = call(port, "POST", "/invocations", json.dumps({"instances": EMBED}), conn=conn)
            assert status == 200
        conn.close()
        for s in (stalled, silent):  # neither has been answered or closed
            s.setblocking(False)
            with pytest.raises(BlockingIOError):
                s.recv(10)
        stalled.close()
        silent.close()


def test_a_stalled_client_gets_408_and_a_silent_one_is_closed_after_read_timeout():
    with serving(FakePredictor(), read_timeout=0.5) as (_, port):
        stalled = socket.create_connection(("127.0.0.1", port), timeout=HANG)
        silent = socket.create_connection(("127.0.0.1", port), timeout=HANG)
        t0 = time.monotonic()
        stalled.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        status, h, body = parse(recv_all(stalled))  # 408, then the server closes
        assert_json_error(status, h, body, 408, match="nothing for 0.5 s")
        assert h["connection"] == "close"
        assert time.monotonic() - t0 >= 0.5  # not before the timeout (a lower bound)
        assert silent.recv(10) == b""  # a connection that never sends is closed without a word
        stalled.close()
        silent.close()


def test_saturation_answers_503_with_retry_after():
    gate = threading.Event()
    fake = FakePredictor(gate=gate)
    with serving(fake, threads=1, queue_timeout=0.2) as (_, port):
        body = json.dumps({"instances": EMBED})
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(call, port, "POST", "/invocations", body)
            wait_until(lambda: fake.calls, "the first request holds the only slot")
            status, h, out = call(port, "POST", "/invocations", body)
            gate.set()
            assert first.result(HANG)[0] == 200
        assert_json_error(status, h, out, 503, match="inference slots")
        assert h["retry-after"] == "1"


def test_ping_answers_200_while_every_inference_slot_is_busy():
    # SageMaker pings a busy endpoint too: /ping must never wait for an inference slot
    # (docs/serving.md: "/ping never waits for a model call or an inference slot").
    gate = threading.Event()
    fake = FakePredictor(gate=gate)
    with serving(fake, threads=2, queue_timeout=0.2) as (app, port), ThreadPoolExecutor(2) as pool:
        try:
            body = json.dumps({"instances": EMBED})
            held = [pool.submit(call, port, "POST", "/invocations", body) for _ in range(2)]
            wait_until(lambda: len(fake.calls) == 2, "both slots are held")
            # Full: a third request waits queue_timeout for a slot, then gets 503.
            assert_json_error(*call(port, "POST", "/invocations", body), 503, match="inference slots")
            assert call(port, "GET", "/ping")[:3:2] == (200, b"")
            assert call(port, "HEAD", "/ping")[0] == 200
            assert app.handle("GET", "/ping", {}, b"") == (200, (), b"")
            assert call(port, "GET", "/execution-parameters")[0] == 200
            assert not any(f.done() for f in held)  # the slots were busy all along
        finally:
            gate.set()  # before the server's drain on leaving
        assert [f.result(HANG)[0] for f in held] == [200, 200]


def test_http_limits_documented_in_serving_md():
    # docs/serving.md, "Statuses and errors": 414 request line over 64 KiB; 431 a header
    # line over 64 KiB or more than 99 headers (the stdlib's limits, answered as JSON);
    # 505 HTTP/2 or later. Each at its boundary: one byte or one header less is served.
    def request(line: bytes, headers: list[bytes] = ()) -> bytes:
        return line + b"".join(headers) + b"Connection: close\r\n\r\n"

    def ping_line(size: int) -> bytes:  # "GET /ping?xxx HTTP/1.1\r\n", `size` bytes with CRLF
        return b"GET /ping?" + b"x" * (size - len(b"GET /ping? HTTP/1.1\r\n")) + b" HTTP/1.1\r\n"

    def header(size: int) -> bytes:  # one "X-Long: aaa\r\n" header line of `size` bytes
        return b"X-Long: " + b"a" * (size - len(b"X-Long: \r\n")) + b"\r\n"

    with serving(FakePredictor()) as (_, port):
        assert raw(port, request(ping_line(65536)))[:3:2] == (200, b"")
        status, h, body = raw(port, request(ping_line(65537)))
        assert_json_error(status, h, body, 414, match="request line longer than 65536 bytes")
        assert h["connection"] == "close"

        ok = b"GET /ping HTTP/1.1\r\n"
        assert raw(port, request(ok, [header(65536)]))[0] == 200
        status, h, body = raw(port, request(ok, [header(65537)]))
        assert_json_error(status, h, body, 431, match="Line too long")
        assert h["connection"] == "close"
        # http.client counts the empty line that ends the headers as one of its 100, so
        # 99 header fields are served and 100 are refused.
        many = [b"X-H%d: 1\r\n" % i for i in range(98)]  # + Connection: close = 99 fields
        assert raw(port, request(ok, many))[0] == 200
        status, h, body = raw(port, request(ok, many + [b"X-One-More: 1\r\n"]))
        assert_json_error(status, h, body, 431, match="Too many headers")

        for version in (b"HTTP/2.0", b"HTTP/3.0"):
            status, h, body = raw(port, b"GET /ping " + version + b"\r\n\r\n")
            assert_json_error(status, h, body, 505, match="Invalid HTTP version")
        assert call(port, "GET", "/ping")[0] == 200  # still serving


def test_a_body_trickled_past_body_timeout_gets_408():
    # A client that sends a byte every 10 ms never trips the per-read timeout; the
    # whole-body deadline (body_timeout) cuts it off (docs/serving.md: "a client that
    # trickles bytes cannot hold a thread longer").
    with serving(FakePredictor(), read_timeout=HANG, body_timeout=0.5) as (_, port):
        with socket.create_connection(("127.0.0.1", port), timeout=HANG) as s:
            t0 = time.monotonic()
            s.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100000\r\n\r\n")
            status, h, body = trickle(s, b" ", t0, "body")
        assert_json_error(status, h, body, 408, match="request body not received within 0.5 s")
        assert h["connection"] == "close"
        assert time.monotonic() - t0 >= 0.5
        assert call(port, "GET", "/ping")[0] == 200


def test_connection_cap_refuses_with_503_but_still_answers_ping():
    with serving(max_connections=2) as (app, port):
        held = [http.client.HTTPConnection("127.0.0.1", port, timeout=HANG) for _ in range(2)]
        for c in held:  # two open keep-alive connections hold both handler threads
            assert call(port, "GET", "/ping", conn=c)[0] == 503  # still loading
        status, h, body = raw(port, b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        assert_json_error(status, h, body, 503, match="too many open connections")
        assert h["retry-after"] == "1" and h["connection"] == "close"
        # A health check past the cap is answered as usual, by the accepting thread (issue 20).
        status, h, body = raw(port, b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        assert_json_error(status, h, body, 503, match="the model is still loading")
        app.ready(FakePredictor())
        status, h, body = raw(port, b"GET /ping?probe=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (status, body, h["connection"]) == (200, b"", "close")
        assert raw(port, b"HEAD /ping HTTP/1.0\r\n\r\n")[:3:2] == (200, b"")
        assert raw(port, b"GET /pingpong HTTP/1.1\r\n\r\n")[0] == 503  # only /ping itself
        held[0].close()
        # A slot frees once the handler thread sees EOF.
        wait_until(lambda: call(port, "POST", "/invocations", json.dumps({"instances": EMBED}))[0] == 200,
                   "a connection slot frees")
        held[1].close()


def test_keep_alive_connections_are_recycled_when_asked():
    # A supervised worker's Server(recycle_after=...): a connection older than that closes
    # after its next response, so that clients spread over the workers again.
    s = settings()
    app = App(s)
    app.ready(FakePredictor())
    srv = Server(app, s, recycle_after=0.3)
    srv.start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", srv.address[1], timeout=HANG)
        t0 = time.monotonic()
        closing = wait_until(lambda: call(srv.address[1], "GET", "/ping", conn=conn)[1].get("connection"),
                             "a response closes the connection")
        assert closing == "close" and time.monotonic() - t0 >= 0.3  # not before (a lower bound)
        conn.close()
    finally:
        assert srv.stop(HANG)
    with serving(FakePredictor()) as (_, port):  # the default: kept open
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HANG)
        assert all("connection" not in call(port, "GET", "/ping", conn=conn)[1] for _ in range(50))
        conn.close()


def test_slow_clients_holding_every_slot_do_not_fail_health_checks():
    # issue 20: clients that send their headers and one byte of a 100-byte body hold every
    # connection slot (until body_timeout); /ping must still answer 200, or SageMaker
    # would replace a healthy container.
    with serving(FakePredictor(), max_connections=4, read_timeout=HANG) as (_, port):
        slow = [socket.create_connection(("127.0.0.1", port), timeout=HANG) for _ in range(8)]
        try:
            for s in slow:
                s.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            body = json.dumps({"instances": EMBED})
            wait_until(lambda: call(port, "POST", "/invocations", body)[0] == 503, "every slot is held")
            for _ in range(5):
                assert raw(port, b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")[:3:2] == (200, b"")
        finally:
            for s in slow:
                s.close()


def test_a_request_head_trickled_past_head_timeout_gets_408():
    # A header line sent a byte every 10 ms never trips the per-read timeout; the
    # whole-head deadline (head_timeout) cuts it off, so such a client cannot hold a
    # connection slot for longer (docs/serving.md, "Slow clients").
    with serving(FakePredictor(), read_timeout=HANG, head_timeout=0.5) as (_, port):
        with socket.create_connection(("127.0.0.1", port), timeout=HANG) as s:
            t0 = time.monotonic()
            s.sendall(b"GET /ping HTTP/1.1\r\nX-Slow: ")
            status, h, body = trickle(s, b"a", t0, "head")
        assert_json_error(status, h, body, 408, match="request head not received within 0.5 s")
        assert time.monotonic() - t0 >= 0.5
        assert call(port, "GET", "/ping")[0] == 200


@pytest.mark.parametrize("batching", [False, True])
def test_many_concurrent_clients_get_complete_correct_answers(batching):
    rng = np.random.default_rng(0)
    fake = FakePredictor(delay=0.002)  # calls take time, so requests queue behind them
    with serving(fake, batching=batching, threads=8, queue_timeout=30) as (_, port):

        def client(seed: int) -> int:
            r = np.random.default_rng(seed)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            for _ in range(20):
                n = int(r.integers(1, 6))
                records = [{"in0": r.integers(1, VOCAB, int(r.integers(1, 9))).tolist(),
                            "in1": r.integers(1, VOCAB, int(r.integers(1, 9))).tolist()} for _ in range(n)]
                if r.random() < 0.5:
                    records = [{"in1": x["in1"]} for x in records]
                status, _, out = call(port, "POST", "/invocations", json.dumps({"instances": records}),
                                      {"Content-Type": "application/json"}, conn=conn)
                assert status == 200
                key = "scores" if "in0" in records[0] else "embeddings"
                assert_values([p[key] for p in json.loads(out)["predictions"]], records)
            conn.close()
            return 20

        with ThreadPoolExecutor(32) as pool:
            done = sum(pool.map(client, rng.integers(0, 2**31, 32).tolist(), timeout=120))
    assert done == 32 * 20
    assert (len(fake.calls) < 32 * 20) == batching  # merged calls only with the Batcher


def test_access_log_line_per_request(caplog):
    with caplog.at_level(logging.DEBUG, logger="o2v_jax"), serving(FakePredictor()) as (_, port):
        call(port, "POST", "/invocations", json.dumps({"instances": EMBED}))
        call(port, "POST", "/invocations", "".join(json.dumps(r) + "\n" for r in PAIRS),
             {"Content-Type": "application/jsonlines"})
        call(port, "GET", "/nope")
        call(port, "GET", "/ping")
    ping = [r for r in caplog.records if r.getMessage().startswith('127.0.0.1 "GET /ping" 200')]
    assert len(ping) == 1 and ping[0].levelno == logging.DEBUG  # health checks do not flood the log
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any(re.fullmatch(r'127\.0\.0\.1 "POST /invocations" 200 records=3 [\d.]+ ms', m) for m in lines), lines
    assert any(re.fullmatch(r'127\.0\.0\.1 "POST /invocations" 200 records=2 [\d.]+ ms', m) for m in lines), lines
    assert any(re.fullmatch(r'127\.0\.0\.1 "GET /nope" 404 records=- [\d.]+ ms', m) for m in lines), lines


def refused(port: int) -> bool:
    """True once nothing listens on ``port`` any more."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=HANG).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:  # accepted into the backlog as the socket closed
        pass
    return False


def test_stop_refuses_new_connections_and_waits_for_in_flight():
    gate = threading.Event()
    fake = FakePredictor(gate=gate)
    s = settings()
    app = App(s)
    app.ready(fake)
    srv = Server(app, s)
    srv.start()
    port = srv.address[1]
    with ThreadPoolExecutor(2) as pool:
        in_flight = pool.submit(call, port, "POST", "/invocations", json.dumps({"instances": EMBED}))
        wait_until(lambda: fake.calls, "the request is in flight")
        stopping = pool.submit(srv.stop, HANG)
        wait_until(lambda: refused(port), "the listening socket closes")
        assert not stopping.done()  # waiting for the in-flight request, which the gate holds
        gate.set()
        status, headers, _ = in_flight.result(HANG)
        assert status == 200 and headers["connection"] == "close"
        assert stopping.result(HANG) is True


def test_stop_gives_up_after_the_drain_timeout_and_says_so(caplog):
    # docs/serving.md: past the drain timeout the server stops anyway and logs how many
    # requests were cut off; stop() returns False.
    gate = threading.Event()
    fake = FakePredictor(gate=gate)
    s = settings()
    app = App(s)
    app.ready(fake)
    srv = Server(app, s)
    srv.start()
    port = srv.address[1]
    try:
        with caplog.at_level(logging.WARNING, logger="o2v_jax"), ThreadPoolExecutor(2) as pool:
            in_flight = pool.submit(call, port, "POST", "/invocations", json.dumps({"instances": EMBED}))
            wait_until(lambda: fake.calls, "the request is in flight")
            t0 = time.monotonic()
            stopping = pool.submit(srv.stop, 0.3)
            assert stopping.result(HANG) is False  # the gate still holds the request
            assert time.monotonic() - t0 >= 0.3  # it did wait the drain timeout
            assert not in_flight.done()
            gate.set()
            assert in_flight.result(HANG)[0] == 200  # cut off by stop() only in a process that exits
    finally:
        gate.set()
    assert "1 requests still in flight after 0.3 s; exiting anyway" in caplog.text


# --------------------------------------------------------------------------- the process

SLOW_SERVER = textwrap.dedent("""
    # A server process driven by files in its working directory: its "model" loads once
    # `load` exists; its embed logs "invoked" and answers once `release` exists (a hang
    # guard of 60 s aside). The tests hold a request in flight with it.
    import logging, sys, time
    from pathlib import Path
    import numpy as np
    from o2v_jax.app import Settings
    from o2v_jax.worker import serve

    def wait_for(name):
        deadline = time.monotonic() + 60
        while not Path(name).exists() and time.monotonic() < deadline:
            time.sleep(0.01)

    class Slow:
        vocab_sizes, max_seq_lens = (10, 10), (8, 8)

        def embed(self, sequences, encoder="in0"):
            logging.getLogger("o2v_jax").info("invoked")
            wait_for("release")
            return np.ones((len(sequences), 1), np.float32)

    def load(settings):
        wait_for("load")
        return Slow()

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    settings = Settings(model_dir=Path("."), port=0, drain_timeout=float(sys.argv[1]))
    sys.exit(serve(settings, load=load))
""")
RELEASED = b'{"predictions":[{"embeddings":[1.0]}]}'  # Slow's answer to SLOW_REQUEST
SLOW_REQUEST = b'{"instances": [{"in0": [1, 2]}]}'


class SlowServer:
    """SLOW_SERVER in a subprocess (in ``workdir``), its log lines read on a thread."""

    def __init__(self, workdir: Path, drain_timeout: float):
        script = workdir / "slow_server.py"
        script.write_text(SLOW_SERVER)
        self.workdir, self.lines = workdir, []
        self._new = threading.Condition()
        env = os.environ | {"PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen([sys.executable, str(script), str(drain_timeout)], cwd=workdir,
                                     stderr=subprocess.PIPE, env=env, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        line = self.wait_for_line(r"listening on http://127\.0\.0\.1:(\d+)")
        self.port = int(re.search(r":(\d+)", line).group(1))

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self._new:
                self.lines.append(line)
                self._new.notify_all()

    def wait_for_line(self, pattern: str) -> str:
        """The first log line matching ``pattern``, waiting for it (hang guard HANG s)."""
        with self._new:
            found = self._new.wait_for(
                lambda: next((x for x in self.lines if re.search(pattern, x)), None), HANG)
        assert found, f"no log line matching {pattern!r}; the log: {''.join(self.lines)}"
        return found

    def touch(self, name: str) -> None:
        (self.workdir / name).touch()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def slow_server(workdir: Path, drain_timeout: float):
    """A SlowServer whose model is loaded and one request held in flight: yields
    (server, the in-flight request's future)."""
    srv = SlowServer(workdir, drain_timeout)
    try:
        assert call(srv.port, "GET", "/ping")[0] == 503  # loading until `load` exists
        srv.touch("load")
        wait_until(lambda: call(srv.port, "GET", "/ping")[0] == 200, "the model is loaded")
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(call, srv.port, "POST", "/invocations", SLOW_REQUEST)
            srv.wait_for_line("invoked")
            yield srv, in_flight
    finally:
        srv.touch("release")
        srv.close()


def test_sigterm_finishes_the_request_in_flight_and_exits_0(tmp_path):
    with slow_server(tmp_path, drain_timeout=HANG) as (srv, in_flight):
        srv.proc.send_signal(signal.SIGTERM)
        srv.wait_for_line("SIGTERM: stopping")
        wait_until(lambda: refused(srv.port), "the listening socket closes")
        assert not in_flight.done()
        srv.touch("release")
        status, headers, body = in_flight.result(HANG)
        assert (status, body) == (200, RELEASED) and headers["connection"] == "close"
        assert srv.proc.wait(HANG) == 0
        srv.wait_for_line("server stopped")
        assert not any("still in flight" in x for x in srv.lines)


def test_sigterm_exits_after_the_drain_timeout_with_a_request_still_in_flight(tmp_path):
    with slow_server(tmp_path, drain_timeout=0.5) as (srv, in_flight):
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(HANG) == 0  # the request is never released
        assert time.monotonic() - t0 >= 0.5
        srv.wait_for_line(r"^1 requests still in flight after 0\.5 s; exiting anyway")
        srv.wait_for_line("server stopped")
        with pytest.raises((http.client.HTTPException, OSError)):
            in_flight.result(HANG)  # the connection closed without an answer


# --------------------------------------------------------------------------- a real model


def test_end_to_end_with_a_real_tiny_model(tmp_path):
    from o2v_jax.config import from_hyperparameters
    from o2v_jax.data import read_channel
    from o2v_jax.training import train

    config = from_hyperparameters(tiny_hp(epochs=1))
    data = read_channel(write_jsonl(tmp_path / "train.jsonl", group_pairs(64, 0)), config)
    model_dir = tmp_path / "model"
    train(config, data, model_dir=model_dir, emit=lambda line: None, progress=False)

    s = Settings(model_dir=model_dir, port=0, threads=2)
    app = App(s)
    srv = Server(app, s)
    srv.start()
    port = srv.address[1]
    loaded = []
    try:
        assert call(port, "GET", "/ping")[0] == 503
        loader = threading.Thread(target=lambda: loaded.append(load_predictor(s)))
        loader.start()
        while loader.is_alive():  # /ping stays 503 until the model is loaded and warm
            assert call(port, "GET", "/ping")[0] == 503
            loader.join(0.2)
        app.ready(loaded[0])
        assert call(port, "GET", "/ping")[:3:2] == (200, b"")
        assert isinstance(app.batcher, Batcher)  # dynamic batching is on by default
        local = loaded[0]  # what HTTP answers must equal: the same predictor in-process
        pairs = [{"in0": [1, 2, 3], "in1": [4, 5]}, {"in0": [30, 31], "in1": [2]}]
        status, h, out = call(port, "POST", "/invocations", json.dumps({"instances": pairs}),
                              {"Content-Type": "application/json"})
        scores = np.array([p["scores"] for p in json.loads(out)["predictions"]], np.float32)
        want = local.predict([p["in0"] for p in pairs], [p["in1"] for p in pairs])
        assert status == 200 and scores.shape == (2, 2)
        np.testing.assert_array_equal(scores, want)  # shortest round-trip decimals: exact
        lines = "".join(json.dumps({"in1": p["in1"]}) + "\n" for p in pairs)
        status, h, out = call(port, "POST", "/invocations", lines, {"Content-Type": "application/jsonlines"})
        vectors = np.array([json.loads(x)["embeddings"] for x in out.decode().splitlines()], np.float32)
        assert status == 200 and h["content-type"] == "application/jsonlines"
        np.testing.assert_array_equal(vectors, local.embed([p["in1"] for p in pairs], encoder="in1"))
        status, h, out = call(port, "POST", "/invocations", npz_body(pairs),
                              {"Content-Type": "application/x-npz"})
        assert status == 200 and h["content-type"] == "application/x-npy"
        np.testing.assert_array_equal(np.load(io.BytesIO(out), allow_pickle=False), want)
        status, h, out = call(port, "POST", "/invocations", json.dumps({"instances": [{"in0": [99]}]}))
        assert_json_error(status, h, out, 400, path="$.instances[0].in0[0]", match="out of range")
    finally:
        assert srv.stop(HANG)
