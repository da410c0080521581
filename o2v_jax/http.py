"""The HTTP transport of ``o2v serve``.

:class:`Server` puts the :class:`o2v_jax.app.App` behind a ``ThreadingHTTPServer`` with
HTTP/1.1 keep-alive, body framing and a body cap checked before reading
(:mod:`o2v_jax.framing`), socket timeouts, deadlines for a whole request head and body,
a cap on open connections (past
it /ping is still answered), one access-log line per request and a draining shutdown
(conventions item 11). The app decides every answer; this module only moves bytes.
Nothing here imports jax.

:mod:`o2v_jax.worker` runs a Server in a serving process and
:mod:`o2v_jax.supervisor` shares one listening socket among several (``sock=``).
docs/serving.md documents the endpoints, statuses, limits and shutdown.

API::

    Server(app, settings, *, sock=None, keep_alive=True, recycle_after=None): .address, .fileno(),
        .start(), .pause(), .close(), .stop(drain_timeout) -> bool
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import socket
import socketserver
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from o2v_jax import __version__, framing, wire
from o2v_jax.app import GENERIC_500, App, Response, Settings, error_response
from o2v_jax.framing import MAX_LINE, Refused

log = logging.getLogger("o2v_jax")


# --------------------------------------------------------------------------- the transport


_MAX_EMPTY_LINES = 8  # empty lines skipped before a request line; more are a 400
# A health check in the first packet of a connection refused for the connection cap.
_PING = re.compile(rb"(GET|HEAD) /ping(?:\?[^ ]*)? HTTP/1\.[01]\r?\n")
_REFUSE_WAIT = 0.05  # seconds the accepting thread waits for a refused connection's head


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
        self._opened = time.monotonic()
        super().setup()
        self.rfile.close()  # the stdlib's reader: ours adds the head and body deadlines
        self._reader = framing.Reader(self.connection, self.timeout)
        self.rfile = io.BufferedReader(self._reader, 1 << 16)

    def handle_one_request(self) -> None:
        # Replaces the stdlib's: all methods go to the app, timeouts answer 408, and an
        # idle keep-alive connection that times out closes quietly.
        self.command, self.path, self.request_version = None, "", ""
        self.requestline, self._started, self.raw_requestline = "", False, b""
        self._reader.deadline = None  # between requests only the idle timeout applies
        try:
            if not self.rfile.peek(1):  # waits up to read_timeout for a request to begin
                self.close_connection = True
                return
        except OSError:  # TimeoutError (idle keep-alive) or a reset: nothing to answer
            self.close_connection = True
            return
        self._t0 = time.perf_counter()
        head = self.server.settings.head_timeout
        self._reader.limit(head, f"request head not received within {head:g} s")
        with self.server.in_flight():
            try:
                self._read_request_line()
                if not self.raw_requestline:
                    self.close_connection = True  # only empty lines, then EOF
                    return
                self._one_request()
            except Refused as e:
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

    def _read_request_line(self) -> None:
        self.raw_requestline = self.rfile.readline(MAX_LINE + 1)
        # RFC 9112 §2.2: empty lines before a request line are ignored (some clients
        # send a CRLF after a POST body); the stdlib closes without an answer.
        for _ in range(_MAX_EMPTY_LINES):
            if self.raw_requestline not in (b"\r\n", b"\n"):
                break
            self.raw_requestline = self.rfile.readline(MAX_LINE + 1)

    def _one_request(self) -> None:
        if len(self.raw_requestline) > MAX_LINE:
            raise Refused(414, f"request line longer than {MAX_LINE} bytes")
        if not self.raw_requestline.strip():
            raise Refused(400, "empty request line; expected METHOD /path HTTP/1.1")
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
        return framing.framing(self.headers, self.command, self.server.settings.max_body_mb)

    def _read_body(self) -> bytes:
        kind, length = self._framing()
        timeout = self.server.settings.body_timeout
        self._reader.limit(timeout, f"request body not received within {timeout:g} s")
        try:
            return framing.read_body(self.rfile, kind, length, self.server.settings.max_body_mb)
        finally:
            self._reader.deadline = None

    def handle_expect_100(self) -> bool:
        # Refuse before the client sends the body (curl waits for this on large bodies).
        try:
            self._framing()
        except Refused as e:
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
        recycle = self.server.recycle_after
        if self._unread or self.server.stopping or not self.server.keep_alive or \
                (recycle is not None and time.monotonic() - self._opened >= recycle):
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

    def __init__(self, app: App, settings: Settings, sock: socket.socket | None = None,
                 keep_alive: bool = True, recycle_after: float | None = None):
        self.app, self.settings, self.stopping, self.keep_alive = app, settings, False, keep_alive
        self.recycle_after = recycle_after
        self.address_family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
        self._connections = threading.BoundedSemaphore(settings.max_connections)
        self._busy, self._idle = 0, threading.Condition()
        if sock is None:
            super().__init__((settings.host, settings.port), _Handler)
            return
        # A socket bound and listening elsewhere (o2v_jax.supervisor): serve on it.
        super().__init__(sock.getsockname()[:2], _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket, self.server_address = sock, sock.getsockname()
        self.server_name, self.server_port = self.server_address[:2]

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
        """Answer on the accepting thread, without a handler thread: a health check as
        usual (slow clients holding every slot must not fail it), anything else 503."""
        head = b""
        with contextlib.suppress(OSError):
            request.settimeout(_REFUSE_WAIT)  # short: this blocks the accept loop
            head = request.recv(1 << 16)  # the request head, so close() sends FIN rather than RST
        ping = _PING.match(head)
        method = ping.group(1).decode() if ping else "-"
        if ping:
            status, headers, body = self.app.handle(method, "/ping", {}, b"")
            log.debug('%s "%s /ping" %d answered while every connection slot is held',
                      client_address[0], method, status)
        else:
            log.warning("%s refused: %d connections open (max_connections)", client_address[0],
                        self.settings.max_connections)
            status, headers, body = error_response(
                503, f"too many open connections (max {self.settings.max_connections}); retry later",
                headers=(("Retry-After", "1"),))
        head_lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", *(f"{k}: {v}" for k, v in headers),
                      f"Content-Length: {len(body)}", "Connection: close", "", ""]
        with contextlib.suppress(OSError):
            request.sendall("\r\n".join(head_lines).encode() + (b"" if method == "HEAD" else body))
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
    """The transport: binds when constructed, serves on a daemon thread once started.

    ``sock``: a listening socket to serve on instead (a worker's inherited one;
    non-blocking when other processes accept on it too). ``keep_alive=False`` closes
    every connection after one response (the supervisor's stand-in: no client stays).
    ``recycle_after``: seconds after which a keep-alive connection closes after its
    next response, so that its client reconnects to whichever worker accepts first.
    """

    def __init__(self, app: App, settings: Settings, *, sock: socket.socket | None = None,
                 keep_alive: bool = True, recycle_after: float | None = None):
        self._httpd = _HTTPServer(app, settings, sock, keep_alive, recycle_after)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) actually bound; the port is the real one when 0 was asked for."""
        return self._httpd.server_address[:2]

    def fileno(self) -> int:
        """The listening socket's file descriptor."""
        return self._httpd.socket.fileno()

    def start(self) -> None:
        """Accept connections on a daemon thread (again, after :meth:`pause`)."""
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="o2v-http", daemon=True)
        self._thread.start()

    def pause(self) -> None:
        """Stop accepting and keep the socket open; requests already accepted go on."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        """Stop accepting and close this process's descriptor of the listening socket;
        requests in flight go on, their responses with ``Connection: close``."""
        self._httpd.stopping = True
        self.pause()
        self._httpd.server_close()

    def stop(self, drain_timeout: float) -> bool:
        """:meth:`close`, then wait up to ``drain_timeout`` s for in-flight requests;
        True when every one finished."""
        self.close()
        left = self._httpd.wait_idle(drain_timeout)
        if left:
            log.warning("%d requests still in flight after %g s; exiting anyway", left, drain_timeout)
        return left == 0
