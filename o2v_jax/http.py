"""The HTTP transport of ``o2v serve``, and ``serve()`` itself.

:class:`Server` puts the :class:`o2v_jax.app.App` behind a ``ThreadingHTTPServer`` with
HTTP/1.1 keep-alive, body framing and a body cap checked before reading, socket
timeouts, a cap on open connections, one access-log line per request and a draining
shutdown (conventions item 11). The app decides every answer; this module only moves
bytes.

``serve(settings)`` binds the socket first and loads the model in a background thread,
so /ping answers at once (503 while loading, then 200): nothing here imports jax until
:func:`load_predictor` runs. docs/serving.md documents the endpoints, statuses, limits
and shutdown.

API::

    Server(app, settings): .address, .start(), .stop(drain_timeout) -> bool
    load_predictor(settings) -> Predictor          predictor.load + warmup
    serve(settings, load=load_predictor) -> int    blocks until SIGTERM/SIGINT
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from o2v_jax import __version__, media, wire
from o2v_jax.app import GENERIC_500, App, Response, Settings, error_response

log = logging.getLogger("o2v_jax")


# --------------------------------------------------------------------------- the transport


class _Refused(Exception):
    """A request refused before it reaches the app; the connection is then closed."""

    def __init__(self, status: int, message: str):
        super().__init__(status, message)
        self.status, self.message = status, message


_BODY_METHODS = ("POST", "PUT", "PATCH")
_LENGTH = re.compile(r"[0-9]{1,18}")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_MAX_LINE = 65536  # the stdlib's limit for the request line and each header line
_MAX_EMPTY_LINES = 8  # empty lines skipped before a request line; more are a 400


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 transport for one connection; every request goes to ``server.app``."""

    protocol_version = "HTTP/1.1"  # keep-alive; every response carries Content-Length
    # No HTTP/0.9: a request line without a version is read as 1.0, so every answer,
    # errors included, has a status line (0.9 responses have none).
    default_request_version = "HTTP/1.0"
    server_version = f"o2v-jax/{__version__}"
    disable_nagle_algorithm = True  # else small keep-alive responses wait on delayed ACKs
    wbufsize = 1 << 16  # headers and body leave in one send
    server: _HTTPServer

    def setup(self) -> None:
        self.timeout = self.server.settings.read_timeout  # applied to the socket by setup()
        self._unread = False  # a body was left unread: close, and drain before closing
        super().setup()

    def handle_one_request(self) -> None:
        # Replaces the stdlib's: all methods go to the app, timeouts answer 408, and an
        # idle keep-alive connection that times out closes quietly.
        self.command, self.path, self.request_version = None, "", ""
        self.requestline, self._started = "", False
        try:
            self.raw_requestline = self.rfile.readline(_MAX_LINE + 1)
            # RFC 9112 §2.2: empty lines before a request line are ignored (some clients
            # send a CRLF after a POST body); the stdlib closes without an answer.
            for _ in range(_MAX_EMPTY_LINES):
                if self.raw_requestline not in (b"\r\n", b"\n"):
                    break
                self.raw_requestline = self.rfile.readline(_MAX_LINE + 1)
        except OSError:  # TimeoutError (idle keep-alive) or a reset: nothing to answer
            self.close_connection = True
            return
        if not self.raw_requestline:
            self.close_connection = True
            return
        self._t0 = time.perf_counter()
        with self.server.in_flight():
            try:
                self._one_request()
            except _Refused as e:
                self._unread = True
                self._answer_error(e.status, e.message)
            except TimeoutError:
                self._unread = True
                self._answer_error(408, f"the client sent nothing for {self.timeout:g} s")
            except ConnectionError:
                self.close_connection = True  # the client went away
            except Exception:
                log.exception("unexpected error while handling %r", self.requestline)
                self._answer_error(500, GENERIC_500)

    def _one_request(self) -> None:
        if len(self.raw_requestline) > _MAX_LINE:
            raise _Refused(414, f"request line longer than {_MAX_LINE} bytes")
        if not self.raw_requestline.strip():
            raise _Refused(400, "empty request line; expected METHOD /path HTTP/1.1")
        if not self.parse_request():
            return  # parse_request has answered through send_error
        app = self.server.app
        refused = app.route(self.command, self.path)
        if refused is not None:
            if self.headers.get("Transfer-Encoding") or self.headers.get("Content-Length", "0").strip() != "0":
                self._unread = True  # not worth reading a body nobody will use: close instead
            self._respond(refused)
            return
        body = self._read_body()
        self._respond(app.handle(self.command, self.path, self.headers, body))

    # --- request bodies

    def _framing(self) -> tuple[str, int]:
        """How the body is delimited: ("chunked", 0), ("length", n) or ("none", 0).

        Raises:
            _Refused: 400 contradictory or malformed headers, 411 a POST without either,
                413 a Content-Length over the cap, 501 an unknown transfer coding.
        """
        te = self.headers.get_all("Transfer-Encoding") or []
        cl = self.headers.get_all("Content-Length") or []
        if te:
            if cl:  # RFC 9112 §6.1: a request smuggling vector; refuse it
                raise _Refused(400, "request has both Transfer-Encoding and Content-Length; send one")
            codings = [c.strip().lower() for v in te for c in v.split(",") if c.strip()]
            if codings != ["chunked"]:
                raise _Refused(501, f"unsupported Transfer-Encoding {', '.join(te)!r}; only chunked is")
            return "chunked", 0
        if cl:
            values = {v.strip() for v in ",".join(cl).split(",")}
            value = values.pop()
            if values or not _LENGTH.fullmatch(value):
                raise _Refused(400, f"invalid Content-Length {', '.join(cl)!r}")
            length = int(value)
            cap = self.server.settings.max_body_bytes
            if length > cap:
                raise _Refused(413, f"request body is {length} bytes; the limit is {cap} bytes "
                                    f"({self.server.settings.max_body_mb} MiB)")
            return ("length", length) if length else ("none", 0)
        if self.command in _BODY_METHODS:
            raise _Refused(411, "Content-Length required (or Transfer-Encoding: chunked)")
        return "none", 0

    def _read_body(self) -> bytes:
        kind, length = self._framing()
        deadline = time.monotonic() + self.server.settings.body_timeout
        if kind == "length":
            return self._read_exact(length, deadline)
        if kind == "chunked":
            return self._read_chunked(deadline)
        return b""

    def _read_exact(self, n: int, deadline: float) -> bytes:
        parts, got = [], 0
        while got < n:
            if time.monotonic() > deadline:
                raise _Refused(408, f"request body not received within {self.server.settings.body_timeout:g} s")
            # read1: at most one recv, so the deadline is checked between reads and a
            # client trickling bytes cannot hold the thread past it.
            part = self.rfile.read1(min(n - got, 1 << 16))
            if not part:
                raise _Refused(400, f"connection closed after {got} of {n} body bytes")
            parts.append(part)
            got += len(part)
        return b"".join(parts)

    def _read_chunked(self, deadline: float) -> bytes:
        cap, parts, total = self.server.settings.max_body_bytes, [], 0
        while True:
            line = self.rfile.readline(1024)
            size = _CHUNK_SIZE.fullmatch(line.split(b";", 1)[0].strip())
            if not line.endswith(b"\n") or size is None:
                raise _Refused(400, f"malformed chunk size line {line[:40]!r} after {total} body bytes")
            n = int(size.group(), 16)
            if n == 0:
                break
            total += n
            if total > cap:
                raise _Refused(413, f"chunked request body exceeds the limit of {cap} bytes "
                                    f"({self.server.settings.max_body_mb} MiB)")
            parts.append(self._read_exact(n, deadline))
            if self.rfile.readline(3).strip():
                raise _Refused(400, f"chunk of {n} bytes not followed by CRLF")
        for _ in range(100):  # trailer fields, ignored
            line = self.rfile.readline(_MAX_LINE + 1)
            if line in (b"\r\n", b"\n", b""):
                return b"".join(parts)
        raise _Refused(400, "more than 100 trailer lines after a chunked body")

    def handle_expect_100(self) -> bool:
        # Refuse before the client sends the body (curl waits for this on large bodies).
        try:
            self._framing()
        except _Refused as e:
            self._unread = True
            self._answer_error(e.status, e.message)
            return False
        refused = self.server.app.route(self.command, self.path)
        if refused is not None:
            self._unread = True
            self._respond(refused)
            return False
        super().handle_expect_100()
        self.wfile.flush()  # wfile is buffered: the 100 must leave now
        return True

    # --- responses

    def _respond(self, response: Response) -> None:
        status, headers, body = response
        self._started = True
        if self._unread or self.server.stopping:
            self.close_connection = True
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()
        self._log_access(status, headers, body)

    def _answer_error(self, status: int, message: str) -> None:
        """Send a JSON error and close, unless a response has begun (then just close)."""
        self.close_connection = True
        if self._started:
            return
        with contextlib.suppress(OSError):
            self._respond(error_response(status, message))

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # The stdlib calls this for malformed requests (400, 414, 431, 505): JSON, not HTML.
        self._unread = True
        self._answer_error(code, message or HTTPStatus(code).phrase)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        if self._unread:
            _drain(self.connection)

    # --- logging

    def _log_access(self, status: int, headers: tuple[tuple[str, str], ...], body: bytes) -> None:
        ms = (time.perf_counter() - self._t0) * 1e3
        records = "-"
        if status == 200 and self.command == "POST":
            records = str(wire.count_records(body, dict(headers)["Content-Type"]))
        # Health checks (SageMaker pings every few seconds) log at DEBUG, the rest at INFO.
        level = logging.DEBUG if status == 200 and self.command in ("GET", "HEAD") else logging.INFO
        log.log(level, '%s "%s %s" %d records=%s %.1f ms', self.client_address[0], self.command or "-",
                self.path or "-", status, records, ms)

    def version_string(self) -> str:
        return self.server_version  # the stdlib appends the Python version

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        pass  # _log_access writes one line per request instead

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s: " + format, self.client_address[0], *args)


def _drain(sock: socket.socket, seconds: float = 1.0, limit: int = 1 << 20) -> None:
    """Half-close, then read and drop what the client still sends, briefly.

    Closing a socket with unread input sends an RST, which can destroy the error
    response still sitting in the client's buffers (a "lingering close", as Apache does).
    """
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(0.1)
        deadline, got = time.monotonic() + seconds, 0
        while time.monotonic() < deadline and got < limit:
            part = sock.recv(1 << 16)
            if not part:
                return
            got += len(part)


class _HTTPServer(ThreadingHTTPServer):
    """The stdlib server with a connection cap, in-flight tracking and no DNS at bind."""

    daemon_threads = True  # a stuck connection never keeps the process alive
    request_queue_size = 128  # listen backlog: a burst of clients is not dropped at SYN

    def __init__(self, app: App, settings: Settings):
        self.app, self.settings, self.stopping = app, settings, False
        self.address_family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
        self._connections = threading.BoundedSemaphore(settings.max_connections)
        self._busy, self._idle = 0, threading.Condition()
        super().__init__((settings.host, settings.port), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn, a DNS lookup that can take
        # seconds in a container without a resolver; /ping must answer at once.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        if not self._connections.acquire(blocking=False):
            self._refuse(request, client_address)
            return
        try:
            super().process_request(request, client_address)  # starts the handler thread
        except BaseException:
            self._connections.release()
            raise

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connections.release()

    def _refuse(self, request: socket.socket, client_address: Any) -> None:
        """Answer 503 on the accepting thread, without a handler thread."""
        log.warning("%s refused: %d connections open (max_connections)", client_address[0],
                    self.settings.max_connections)
        body = error_response(503, f"too many open connections (max {self.settings.max_connections});"
                                   " retry later").body
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: {media.JSON}\r\nContent-Length: "
                f"{len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n")
        with contextlib.suppress(OSError):
            request.settimeout(0.05)  # short: this blocks the accept loop
            with contextlib.suppress(OSError):
                request.recv(1 << 16)  # the request head, so close() sends FIN rather than RST
            request.sendall(head.encode() + body)
        self.shutdown_request(request)

    @contextlib.contextmanager
    def in_flight(self):
        with self._idle:
            self._busy += 1
        try:
            yield
        finally:
            with self._idle:
                self._busy -= 1
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> int:
        """Wait until no request is in flight; returns how many still are."""
        with self._idle:
            self._idle.wait_for(lambda: self._busy == 0, timeout)
            return self._busy


class Server:
    """The transport: binds when constructed, serves on a daemon thread once started."""

    def __init__(self, app: App, settings: Settings):
        self._httpd = _HTTPServer(app, settings)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) actually bound; the port is the real one when 0 was asked for."""
        return self._httpd.server_address[:2]

    def start(self) -> None:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="o2v-http", daemon=True)
        self._thread.start()

    def stop(self, drain_timeout: float) -> bool:
        """Stop accepting, then wait up to ``drain_timeout`` s for in-flight requests.

        Responses sent while draining carry ``Connection: close``. Returns True when
        every in-flight request finished.
        """
        self._httpd.stopping = True
        if self._thread is not None:
            self._httpd.shutdown()  # serve_forever returns: no more accepts
        self._httpd.server_close()  # the listening socket closes
        left = self._httpd.wait_idle(drain_timeout)
        if left:
            log.warning("%d requests still in flight after %g s; exiting anyway", left, drain_timeout)
        return left == 0


# --------------------------------------------------------------------------- running


def load_predictor(settings: Settings):
    """Load the model directory and compile its buckets (predictor.load + warmup)."""
    from o2v_jax import predictor

    model = predictor.load(settings.model_dir, preferred_mode=settings.preferred_mode)
    model.warmup()
    return model


def serve(settings: Settings, *, load: Callable[[Settings], Any] = load_predictor) -> int:
    """Serve until SIGTERM or SIGINT; call from the main thread (it installs handlers).

    The socket is bound before the model loads, so /ping answers from the start: 503
    while ``load(settings)`` runs on a background thread, 200 once it returns.

    Returns:
        0 after a signal (in-flight requests finished or ``drain_timeout`` passed),
        1 when the model failed to load.
    """
    app = App(settings)
    server = Server(app, settings)  # binds now: OSError if the port is taken
    stop, failures = threading.Event(), []

    def on_signal(signum: int, frame: Any) -> None:
        log.info("%s: stopping; finishing in-flight requests", signal.Signals(signum).name)
        stop.set()

    def load_model() -> None:
        t0 = time.perf_counter()
        try:
            predictor = load(settings)
        except Exception as e:
            log.exception("could not load the model from %s", settings.model_dir)
            app.failed(str(e))
            failures.append(e)
            stop.set()
            return
        app.ready(predictor)
        log.info("model ready after %.1f s; /ping answers 200", time.perf_counter() - t0)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start()
        host, port = server.address
        scope = "all interfaces" if host in ("0.0.0.0", "::") else "this address only"
        log.info("listening on http://%s:%d (%s%s); loading %s", host, port, scope,
                 ", SageMaker container mode" if settings.sagemaker else "", settings.model_dir)
        log.info("limits: threads=%d max_connections=%d max_body_mb=%d read_timeout=%gs%s%s",
                 settings.threads, settings.max_connections, settings.max_body_mb, settings.read_timeout,
                 f" preferred_mode={settings.preferred_mode}" if settings.preferred_mode else "",
                 " (batch transform)" if settings.batch else "")
        threading.Thread(target=load_model, name="o2v-load", daemon=True).start()
        while not stop.wait(0.5):  # a timed wait keeps the main thread responsive to signals
            pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)  # a second Ctrl-C interrupts the drain
        server.stop(settings.drain_timeout)
    log.info("server stopped")
    return 1 if failures else 0
