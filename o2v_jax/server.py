"""The HTTP inference server: SageMaker's container protocol on the standard library.

Two layers (conventions item 11):

* ``App.handle(method, path, headers, body) -> Response`` is the application: routing of
  /ping, /invocations and /execution-parameters, the bound on concurrent inferences, and
  JSON error bodies. Plain Python, testable without sockets.
* ``Server`` is the transport around it: a ``ThreadingHTTPServer`` with HTTP/1.1
  keep-alive, body framing and a body cap checked before reading, socket timeouts, a cap
  on open connections, one access-log line per request and a draining shutdown.

``serve(settings)`` binds the socket first and loads the model in a background thread,
so /ping answers at once (503 while loading, then 200). ``Batcher`` merges concurrent
small requests into one predictor call. docs/serving.md documents the endpoints,
statuses, limits and environment variables.

API::

    Settings                               frozen: every limit and default, validated once
    resolve_settings(args, environ) -> Settings  flags > environment > defaults
    Response(status, headers, body)
    App(settings): .handle(...), .route(method, path), .ready(predictor), .failed(message)
    Server(app, settings): .address, .start(), .stop(drain_timeout) -> bool
    Batcher(predictor): .invoke(...) like Predictor.invoke, merging concurrent requests
    load_predictor(settings) -> Batcher | Predictor   predictor.load + warmup
    serve(settings, load=load_predictor) -> int   blocks until SIGTERM/SIGINT
    add_parser(subparsers), run(args) -> int       the ``o2v serve`` subcommand
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import re
import signal
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import msgspec

from o2v_jax import __version__, npz, wire
from o2v_jax import env as env_vars
from o2v_jax.env import BATCH_STRATEGIES, MAX_PAYLOAD_MB, PREFERRED_MODES
from o2v_jax.ragged import Ragged

log = logging.getLogger("o2v_jax")

SAGEMAKER_MODEL_DIR = Path("/opt/ml/model")


# --------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the server needs to know; every default lives here."""

    model_dir: Path  # a directory written by `o2v train`
    host: str = "127.0.0.1"  # this machine only; SageMaker mode binds 0.0.0.0
    port: int = 8080  # SageMaker's port; 0 picks a free one (tests)
    # Requests admitted to inference at once (MaxConcurrentTransforms); small ones are
    # merged by the Batcher. 16 x 6 MiB stays within SageMaker's 100 MB product limit.
    threads: int = 16
    max_connections: int = 64  # open connections, i.e. handler threads; more get 503
    max_body_mb: int = 6  # request body cap in MiB (MaxPayloadInMB; InvokeEndpoint's 6 MB)
    read_timeout: float = 10.0  # seconds one socket read may wait (idle keep-alive too)
    body_timeout: float = 60.0  # seconds a whole body may take (SageMaker's 60 s per call)
    queue_timeout: float = 2.0  # seconds a request waits for an inference slot, then 503
    drain_timeout: float = 30.0  # seconds shutdown waits for in-flight requests
    batching: bool = True  # merge concurrent small requests into one predictor call
    batch_strategy: str = "MULTI_RECORD"  # what /execution-parameters suggests
    batch: bool = False  # SAGEMAKER_BATCH: inside a batch transform job (logged only)
    preferred_mode: str | None = None  # INFERENCE_PREFERRED_MODE, passed to predictor.load
    sagemaker: bool = False  # container mode: changes defaults, honours SAGEMAKER_*

    def __post_init__(self):
        def check(name: str, lo: float, hi: float, flag: str) -> None:
            value = getattr(self, name)
            if not lo <= value <= hi:
                raise ValueError(f"{flag} must be in [{lo:g}, {hi:g}], got {value!r}")

        check("port", 0, 65535, "port (--port, SAGEMAKER_BIND_TO_PORT)")
        check("threads", 1, 1024, "threads (--threads, SAGEMAKER_MAX_CONCURRENT_TRANSFORMS)")
        check("max_connections", 1, 10_000, "max_connections (--max-connections)")
        check("max_body_mb", 1, MAX_PAYLOAD_MB, "max_body_mb (--max-body-mb, SAGEMAKER_MAX_PAYLOAD_IN_MB)")
        for name in ("read_timeout", "body_timeout", "queue_timeout", "drain_timeout"):
            check(name, 0.001, 3600, name + (" (--timeout)" if name == "read_timeout" else ""))
        if self.batch_strategy not in BATCH_STRATEGIES:
            raise ValueError(f"batch_strategy must be one of {BATCH_STRATEGIES}, got {self.batch_strategy!r}")
        if self.preferred_mode not in (None, *PREFERRED_MODES):
            raise ValueError(f"preferred_mode must be one of {PREFERRED_MODES}, got {self.preferred_mode!r}")

    @property
    def max_body_bytes(self) -> int:
        return self.max_body_mb << 20


def _default(name: str) -> Any:
    return Settings.__dataclass_fields__[name].default


def resolve_settings(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings for ``o2v serve``: command-line flags > environment > defaults.

    SageMaker mode (``--sagemaker``, or no ``--model-dir`` as ``docker run IMAGE serve``
    starts it) serves /opt/ml/model on 0.0.0.0 and honours the SAGEMAKER_* variables;
    INFERENCE_PREFERRED_MODE is honoured in both modes.
    """
    sagemaker = args.sagemaker or args.model_dir is None
    env = env_vars.serving(environ)
    values: dict[str, Any] = {"model_dir": args.model_dir or SAGEMAKER_MODEL_DIR, "sagemaker": sagemaker,
                              "preferred_mode": env.preferred_mode}
    if sagemaker:
        values.update(host="0.0.0.0", port=env.port, threads=env.threads, max_body_mb=env.max_body_mb,
                      batch_strategy=env.batch_strategy, batch=env.batch)
    for name in ("host", "port", "threads", "max_body_mb", "max_connections", "read_timeout", "preferred_mode",
                 "batching"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    return Settings(**{k: v for k, v in values.items() if v is not None})


# --------------------------------------------------------------------------- the application


class Response(NamedTuple):
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


_JSON_HEADERS = (("Content-Type", wire.JSON),)
_GENERIC_500 = "internal server error; the server log has the details"


def error_response(status: int, message: str, path: str | None = None,
                   headers: tuple[tuple[str, str], ...] = ()) -> Response:
    """A JSON error: ``{"error": message, "path": record path or null}``."""
    body = msgspec.json.encode({"error": message, "path": path})
    return Response(status, _JSON_HEADERS + headers, body)


class App:
    """The server's application: routes, the inference-slot bound, errors as JSON.

    Thread-safe: ``handle`` runs on many handler threads at once; ``ready`` and
    ``failed`` are called once by the loading thread.
    """

    # path -> methods; HEAD is answered wherever GET is.
    ROUTES = {"/ping": ("GET", "HEAD"), "/invocations": ("POST",), "/execution-parameters": ("GET", "HEAD")}

    def __init__(self, settings: Settings):
        self._settings = settings
        self._predictor = None
        self._problem = "the model is still loading"  # why /ping and /invocations say 503
        self._slots = threading.BoundedSemaphore(settings.threads)
        self._retry = (("Retry-After", "1"),)

    def ready(self, predictor) -> None:
        """The model is loaded and warmed up: /ping answers 200 from now on."""
        self._predictor = predictor

    def failed(self, message: str) -> None:
        self._problem = f"the model failed to load: {message}"

    def route(self, method: str, path: str) -> Response | None:
        """None when ``method path`` is served, else its 404 or 405 response."""
        allowed = self.ROUTES.get(urlsplit(path).path)
        if allowed is None:
            return error_response(404, f"no endpoint {path!r}; this server has " + ", ".join(self.ROUTES))
        if method not in allowed:
            return error_response(405, f"{path} accepts {' and '.join(allowed)}, not {method}",
                                  headers=(("Allow", ", ".join(allowed)),))
        return None

    def handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> Response:
        """Answer one request.

        Args:
            method: the HTTP method, upper case.
            path: the request target; a query string is ignored.
            headers: request headers (any case; an ``email.message.Message`` works).
            body: the complete request body.

        Returns:
            The response; its body is empty for /ping, the predictor's output for
            /invocations, and ``{"error": ..., "path": ...}`` for every 4xx/5xx.
        """
        refused = self.route(method, path)
        if refused is not None:
            return refused
        endpoint = urlsplit(path).path
        if endpoint == "/ping":
            if self._predictor is None:
                return error_response(503, self._problem, headers=self._retry)
            return Response(200, (), b"")
        if endpoint == "/execution-parameters":
            s = self._settings
            # SageMaker refuses MaxConcurrentTransforms * MaxPayloadInMB > 100.
            concurrent = max(1, min(s.threads, MAX_PAYLOAD_MB // s.max_body_mb))
            params = {"MaxConcurrentTransforms": concurrent, "BatchStrategy": s.batch_strategy,
                      "MaxPayloadInMB": s.max_body_mb}
            return Response(200, _JSON_HEADERS, msgspec.json.encode(params))
        lower = {k.lower(): v for k, v in headers.items()}
        return self._invoke(body, lower.get("content-type"), lower.get("accept"))

    def _invoke(self, body: bytes, content_type: str | None, accept: str | None) -> Response:
        predictor = self._predictor
        if predictor is None:
            return error_response(503, self._problem, headers=self._retry)
        # A bounded wait for an inference slot: excess load gets a fast 503 with
        # Retry-After instead of piling up threads and memory.
        if not self._slots.acquire(timeout=self._settings.queue_timeout):
            return error_response(
                503, f"all {self._settings.threads} inference slots stayed busy for "
                     f"{self._settings.queue_timeout:g} s; retry later", headers=self._retry)
        try:
            out, media_type = predictor.invoke(body, content_type, accept)
        except wire.WireError as e:
            return error_response(e.status, e.message, e.path)
        except Exception:
            log.exception("POST /invocations: the predictor failed")
            return error_response(500, _GENERIC_500)
        finally:
            self._slots.release()
        return Response(200, (("Content-Type", media_type),), out)


def count_records(body: bytes, media_type: str) -> int:
    """Records in an /invocations response body, for the access log.

    wire.encode_response writes compact JSON: ``{"predictions":[{"scores":[...]},...]}``
    has one ``{"`` per record plus the outer one; JSON Lines has one line per record;
    a .npy body has one row per record, which its header gives.
    """
    media = media_type.partition(";")[0].strip().lower()
    if media == wire.JSON:
        return body.count(b'{"') - 1
    if media == wire.NPY:
        return npz.npy_rows(body)
    return body.count(b"\n")


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
                self._answer_error(500, _GENERIC_500)

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
            records = str(count_records(body, dict(headers)["Content-Type"]))
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
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: {wire.JSON}\r\nContent-Length: "
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


# --------------------------------------------------------------------------- dynamic batching


@dataclasses.dataclass(eq=False)
class _Job:
    request: wire.Request
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    values: Any = None  # float32 (N, K): this request's rows, once answered
    error: BaseException | None = None
    lead: bool = False  # woken to run the next batch rather than with an answer


class Batcher:
    """Answers concurrent small requests with one predictor call (dynamic batching).

    Opportunistic, and without a thread of its own: a request that finds the predictor
    idle runs at once on its own thread (no hand-off, no added latency). Requests that
    arrive meanwhile queue up; when a call ends, the oldest waiting request's thread
    runs the next call for every queued request (up to ``max_records`` records),
    grouped by kind (scores, ``in0`` or ``in1`` embeddings). So under load one call
    serves many requests, amortising the per-call cost: on CPU, 16 one-record requests
    cost about 5x less merged than one by one. Requests of ``max_records`` or more run
    on their own, concurrently.

    Has the Predictor's ``invoke``, so the App serves either.
    """

    def __init__(self, predictor, max_records: int = 256):
        self.predictor = predictor
        self._max_records = max_records
        self._lock = threading.Lock()
        self._queue: list[_Job] = []  # waiting requests, oldest first
        self._busy = False  # a thread is running a batch (or has been woken to)

    def invoke(self, body: bytes, content_type: str | None, accept: str | None) -> tuple[bytes, str]:
        """As ``Predictor.invoke``: decode, negotiate, answer (batched), encode."""
        return self.predictor.invoke(body, content_type, accept, answer=self.answer)

    def answer(self, request: wire.Request):
        """float32 (N, K) for one decoded request, computed together with its neighbours."""
        if len(request) >= self._max_records:
            return self.predictor.answer(request)
        job = _Job(request)
        with self._lock:
            self._queue.append(job)
            job.lead, self._busy = not self._busy, True
        if not job.lead:
            job.done.wait()  # answered by another thread's call, or woken to lead
        if job.lead:
            self._run_batch()  # answers this job and whatever queued before it
        if job.error is not None:
            raise RuntimeError("the batched predictor call failed") from job.error
        return job.values

    def _run_batch(self) -> None:
        with self._lock:
            take, records = 0, 0
            while take < len(self._queue) and records < self._max_records:
                records += len(self._queue[take].request)
                take += 1
            jobs, self._queue = self._queue[:take], self._queue[take:]
        groups: dict[tuple, list[_Job]] = {}
        for job in jobs:
            groups.setdefault((job.request.mode, job.request.encoder), []).append(job)
        try:
            for group in groups.values():
                self._answer_group(group)
        finally:
            with self._lock:
                if self._queue:  # hand the next batch to a waiting thread; ours has its answer
                    self._queue[0].lead = True
                    self._queue[0].done.set()
                else:
                    self._busy = False
            for job in jobs:
                job.done.set()

    def _answer_group(self, jobs: list[_Job]) -> None:
        requests = [job.request for job in jobs]
        merged = requests[0]
        if len(requests) > 1:
            merged = dataclasses.replace(merged, **{
                side: Ragged.concat([getattr(r, side) for r in requests])
                for side in wire.KEYS if getattr(merged, side) is not None})
        try:
            values = self.predictor.answer(merged)
        except Exception as e:  # every request of the group raises it (the App answers 500)
            for job in jobs:
                job.error = e
            return
        row = 0
        for job in jobs:
            job.values = values[row:row + len(job.request)]
            row += len(job.request)


# --------------------------------------------------------------------------- running


def load_predictor(settings: Settings):
    """Load the model directory and compile its buckets (predictor.load + warmup)."""
    from o2v_jax import predictor

    model = predictor.load(settings.model_dir, preferred_mode=settings.preferred_mode)
    model.warmup()
    return Batcher(model) if settings.batching else model


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


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``serve`` to the ``o2v`` subcommands; sets ``func=run``."""
    p = subparsers.add_parser(
        "serve", help="serve a model over HTTP (SageMaker's /ping and /invocations)",
        description="Serve a trained model over HTTP with SageMaker's container protocol: "
                    "GET /ping, POST /invocations, GET /execution-parameters. Binds "
                    f"{_default('host')} (this machine only) unless told otherwise. Request bodies: "
                    "application/json or application/jsonlines (SageMaker's), or application/x-npz "
                    "(NumPy arrays in0/in1); responses: JSON, JSON Lines or application/x-npy "
                    "(Accept). See docs/serving.md and docs/inference.md.",
        epilog="examples:\n"
               "  o2v serve --model-dir runs/m1                  # http://127.0.0.1:8080\n"
               "  o2v serve --model-dir runs/m1 --host 0.0.0.0   # reachable from other machines\n"
               "  o2v serve                                      # SageMaker container mode:\n"
               "                                                 #   /opt/ml/model on 0.0.0.0:8080\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, metavar="DIR",
                   help="a directory written by `o2v train`; without it, SageMaker container mode "
                        "(see --sagemaker)")
    p.add_argument("--host", help=f"address to bind (default {_default('host')}, this machine only; "
                                  "SageMaker mode: 0.0.0.0, all interfaces)")
    p.add_argument("--port", type=int, help=f"port (default {_default('port')}; SageMaker mode: "
                                            "$SAGEMAKER_BIND_TO_PORT if set); 0 picks a free port")
    p.add_argument("--threads", type=int, metavar="N",
                   help=f"concurrent inferences (default {_default('threads')}; SageMaker mode: "
                        f"$SAGEMAKER_MAX_CONCURRENT_TRANSFORMS); a request waits up to "
                        f"{_default('queue_timeout'):g} s for one, then gets 503")
    p.add_argument("--max-body-mb", type=int, metavar="MB",
                   help=f"request body cap in MiB, 1-{MAX_PAYLOAD_MB} (default {_default('max_body_mb')}; "
                        "SageMaker mode: $SAGEMAKER_MAX_PAYLOAD_IN_MB); larger bodies get 413")
    p.add_argument("--max-connections", type=int, metavar="N",
                   help=f"open connections (default {_default('max_connections')}); more are answered 503")
    p.add_argument("--timeout", dest="read_timeout", type=float, metavar="SECONDS",
                   help=f"how long one socket read may wait before the connection is closed "
                        f"(default {_default('read_timeout'):g})")
    p.add_argument("--preferred-mode", choices=PREFERRED_MODES,
                   help="which network to favour (default $INFERENCE_PREFERRED_MODE, else both)")
    p.add_argument("--no-batching", dest="batching", action="store_const", const=False,
                   help="answer each request with its own predictor call instead of merging "
                        "concurrent small requests (dynamic batching, on by default)")
    p.add_argument("--sagemaker", action="store_true",
                   help="SageMaker container mode: model from /opt/ml/model, bind 0.0.0.0, honour "
                        "SAGEMAKER_* variables. Implied without --model-dir (`docker run IMAGE serve`)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """``o2v serve``: serve until SIGTERM/SIGINT. Returns the exit code."""
    try:
        settings = resolve_settings(args)
    except ValueError as e:
        print(f"o2v serve: error: {e}", file=sys.stderr)
        return 2
    if not settings.model_dir.is_dir():
        print(f"o2v serve: error: model directory {settings.model_dir} does not exist"
              + ("" if args.model_dir else " (no --model-dir: SageMaker container mode)"), file=sys.stderr)
        return 2
    try:
        return serve(settings)
    except OSError as e:  # the port is taken, or the address is not ours
        print(f"o2v serve: error: cannot listen on {settings.host}:{settings.port}: {e}", file=sys.stderr)
        return 1
