"""The inference application: settings, SageMaker's routes, and the one request path.

Everything here is plain Python, testable without sockets (conventions item 11):

* :func:`respond` answers one request body as POST /invocations does: decode
  (:mod:`o2v_jax.wire`), negotiate the response type, compute the values, encode. The
  server and batch transform both answer through it.
* :class:`App` is the server's application: routing of /ping, /invocations and
  /execution-parameters, the bound on concurrent inferences, dynamic batching
  (:mod:`o2v_jax.batcher`) and JSON error bodies. :mod:`o2v_jax.http` is the transport
  around it.

No jax is imported here: the server answers /ping while the model still loads.
docs/serving.md documents the endpoints, statuses, limits and environment variables.

API::

    Settings                               frozen: every limit and default, validated once
    resolve_settings(flags, environ) -> Settings  flags > environment > defaults
    compute(predictor, request) -> values  scores via predict, embeddings via embed
    decode(body, content_type, predictor, ...) -> wire.Request
    respond(body, content_type, accept, predictor, *, answer=None, max_bytes=None,
            first_line=1) -> (body, media type)
    Response(status, headers, body); error_response(status, message, path=None)
    App(settings): .handle(...), .route(method, path), .ready(predictor), .failed(message)
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import msgspec
import numpy as np

from o2v_jax import env, media, wire
from o2v_jax.batcher import Answer, Batcher
from o2v_jax.env import BATCH_STRATEGIES, MAX_PAYLOAD_MB, PREFERRED_MODES

log = logging.getLogger("o2v_jax")

SAGEMAKER_MODEL_DIR = Path("/opt/ml/model")
MAX_WORKERS = 256  # each worker holds a whole model: more is a typo, not a plan
NVIDIA_DEVICE = Path("/dev/nvidiactl")  # present where an NVIDIA driver is loaded
GENERIC_500 = "internal server error; the server log has the details"


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
    # Seconds from a request's first byte to the end of its headers: a client trickling a
    # header line cannot hold a connection slot for longer (issue 20).
    head_timeout: float = 10.0
    body_timeout: float = 60.0  # seconds a whole body may take (SageMaker's 60 s per call)
    queue_timeout: float = 2.0  # seconds a request waits for an inference slot, then 503
    drain_timeout: float = 30.0  # seconds shutdown waits for in-flight requests
    batching: bool = True  # merge concurrent small requests into one predictor call
    batch_strategy: str = "MULTI_RECORD"  # what /execution-parameters suggests
    batch: bool = False  # SAGEMAKER_BATCH: inside a batch transform job (logged only)
    preferred_mode: str | None = None  # INFERENCE_PREFERRED_MODE, passed to predictor.load
    sagemaker: bool = False  # container mode: changes defaults, honours SAGEMAKER_*
    # Worker processes, each with its own model, sharing one socket (o2v_jax.supervisor);
    # 1 is one process and no supervisor. SageMaker mode: SAGEMAKER_MODEL_SERVER_WORKERS.
    workers: int = 1
    # JAX's persistent compilation cache (predictor.load): with several workers the
    # first compiles and the rest load its executables. None: no cache.
    compile_cache_dir: Path | None = None

    def __post_init__(self):
        def check(name: str, lo: float, hi: float, flag: str) -> None:
            value = getattr(self, name)
            if not lo <= value <= hi:
                raise ValueError(f"{flag} must be in [{lo:g}, {hi:g}], got {value!r}")

        check("port", 0, 65535, "port (--port, SAGEMAKER_BIND_TO_PORT)")
        check("threads", 1, 1024, "threads (--threads, SAGEMAKER_MAX_CONCURRENT_TRANSFORMS)")
        check("max_connections", 1, 10_000, "max_connections (--max-connections)")
        check("max_body_mb", 1, MAX_PAYLOAD_MB, "max_body_mb (--max-body-mb, SAGEMAKER_MAX_PAYLOAD_IN_MB)")
        check("workers", 1, MAX_WORKERS, "workers (--workers, SAGEMAKER_MODEL_SERVER_WORKERS)")
        for name in ("read_timeout", "head_timeout", "body_timeout", "queue_timeout", "drain_timeout"):
            check(name, 0.001, 3600, name + (" (--timeout)" if name == "read_timeout" else ""))
        if self.batch_strategy not in BATCH_STRATEGIES:
            raise ValueError(f"batch_strategy must be one of {BATCH_STRATEGIES}, got {self.batch_strategy!r}")
        if self.preferred_mode not in (None, *PREFERRED_MODES):
            raise ValueError(f"preferred_mode must be one of {PREFERRED_MODES}, got {self.preferred_mode!r}")

    @property
    def max_body_bytes(self) -> int:
        return self.max_body_mb << 20


# The command-line flags that override a setting (`o2v serve`, cli.py); None = not given.
_FLAGS = ("host", "port", "threads", "max_body_mb", "max_connections", "read_timeout",
         "preferred_mode", "batching", "workers", "compile_cache_dir")


def resolve_settings(flags: Any, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings for ``o2v serve``: command-line flags > environment > defaults.

    SageMaker mode (``--sagemaker``, or no ``--model-dir`` as ``docker run IMAGE serve``
    starts it) serves /opt/ml/model on 0.0.0.0 and honours the SAGEMAKER_* variables;
    INFERENCE_PREFERRED_MODE is honoured in both modes.

    Args:
        flags: the parsed flags as attributes (an ``argparse.Namespace``): ``model_dir``,
            ``sagemaker``, and ``host``, ``port``, ``threads``, ``max_body_mb``,
            ``max_connections``, ``read_timeout``, ``preferred_mode``, ``batching``,
            ``workers``, ``compile_cache_dir`` (None where not given). More than one
            worker without a cache directory uses ``<cache_dir>/jax-compile``.
        environ: the environment (None: the process's), read through :mod:`o2v_jax.env`.

    Raises:
        ValueError: a malformed variable or an out-of-range setting (names which).
    """
    sagemaker = flags.sagemaker or flags.model_dir is None
    served = env.serving(environ)
    values: dict[str, Any] = {"model_dir": flags.model_dir or SAGEMAKER_MODEL_DIR, "sagemaker": sagemaker,
                              "preferred_mode": served.preferred_mode}
    if sagemaker:
        values.update(host="0.0.0.0", port=served.port, threads=served.threads, max_body_mb=served.max_body_mb,
                      batch_strategy=served.batch_strategy, batch=served.batch,
                      workers=served.workers or default_workers())
    for name in _FLAGS:
        if getattr(flags, name) is not None:
            values[name] = getattr(flags, name)
    if values.get("workers", 1) > 1 and values.get("compile_cache_dir") is None:
        values["compile_cache_dir"] = env.cache_dir(environ) / "jax-compile"
    return Settings(**{k: v for k, v in values.items() if v is not None})


def default_workers() -> int:
    """SageMaker mode's worker count without SAGEMAKER_MODEL_SERVER_WORKERS: one per CPU,
    as SageMaker's model servers do on CPU instances; one when an NVIDIA GPU is visible,
    where each worker would claim most of the GPU's memory for its own JAX client."""
    if NVIDIA_DEVICE.exists():
        return 1
    return max(1, min(os.cpu_count() or 1, MAX_WORKERS))


# --------------------------------------------------------------------------- one request


def compute(predictor: Any, request: wire.Request) -> np.ndarray:
    """The values a decoded request asks for: scores (N, K) or embeddings (N, H).

    ``predictor`` is a :class:`o2v_jax.predictor.Predictor` (or anything with its
    ``predict`` and ``embed``).
    """
    if request.mode == "scores":
        return predictor.predict(request.in0, request.in1)
    return predictor.embed(getattr(request, request.encoder), encoder=request.encoder)


def decode(body: bytes, content_type: str | None, predictor: Any, *, max_bytes: int | None = None,
           first_line: int = 1) -> wire.Request:
    """:func:`o2v_jax.wire.decode_request` checked against ``predictor``'s vocabularies and
    truncated to its ``max_seq_lens``."""
    return wire.decode_request(body, content_type, vocab_sizes=predictor.vocab_sizes,
                               max_seq_lens=predictor.max_seq_lens, max_bytes=max_bytes,
                               first_line=first_line)


def respond(body: bytes, content_type: str | None, accept: str | None, predictor: Any, *,
            answer: Answer | None = None, max_bytes: int | None = None,
            first_line: int = 1) -> tuple[bytes, str]:
    """Answer one inference request body as SageMaker's /invocations does (spec §5).

    Args:
        body: the request body (application/json, application/jsonlines or
            application/x-npz).
        content_type: the Content-Type header (None: application/json).
        accept: the Accept header (None: the request's own format).
        predictor: the model: its ``vocab_sizes`` and ``max_seq_lens`` check the
            request, and (without ``answer``) its ``predict`` / ``embed`` answer it.
        answer: computes a decoded request's values instead of :func:`compute` (the
            server passes its dynamic batcher's).
        max_bytes: body size limit (WireError 413 above it), None for none.
        first_line: the body's first line number, for JSON Lines record paths.

    Returns:
        (response body, response media type).

    Raises:
        media.WireError: a request the wire layer rejects; ``.status`` is the HTTP
            status (400, 406, 413, 415) for the server to answer with.
    """
    request = decode(body, content_type, predictor, max_bytes=max_bytes, first_line=first_line)
    response_type = media.negotiate(accept, request.media_type)  # 406 before any model work
    values = answer(request) if answer is not None else compute(predictor, request)
    return wire.encode_response(request.mode, values, response_type), response_type


# --------------------------------------------------------------------------- the application


class Response(NamedTuple):
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


_JSON_HEADERS = (("Content-Type", media.JSON),)


def error_response(status: int, message: str, path: str | None = None,
                   headers: tuple[tuple[str, str], ...] = ()) -> Response:
    """A JSON error: ``{"error": message, "path": record path or null}``."""
    body = msgspec.json.encode({"error": message, "path": path})
    return Response(status, _JSON_HEADERS + headers, body)


@dataclasses.dataclass(frozen=True)
class _Model:
    predictor: Any  # checks requests (vocab_sizes, max_seq_lens)
    answer: Answer  # computes their values: the Batcher's, or compute() bound to predictor


class App:
    """The server's application: routes, the inference-slot bound, errors as JSON.

    Thread-safe: ``handle`` runs on many handler threads at once; ``ready`` and
    ``failed`` are called once by the loading thread.

    Attributes:
        batcher: the :class:`~o2v_jax.batcher.Batcher` that answers requests once ready
            (None before, and with ``Settings.batching`` off).
    """

    # path -> methods; HEAD is answered wherever GET is.
    ROUTES = {"/ping": ("GET", "HEAD"), "/invocations": ("POST",), "/execution-parameters": ("GET", "HEAD")}

    def __init__(self, settings: Settings):
        self._settings = settings
        self._model: _Model | None = None
        self.batcher: Batcher | None = None
        self._problem = "the model is still loading"  # why /ping and /invocations say 503
        self._slots = threading.BoundedSemaphore(settings.threads)
        self._retry = (("Retry-After", "1"),)

    def ready(self, predictor: Any) -> None:
        """The model is loaded and warmed up: /ping answers 200 from now on.

        Args:
            predictor: a :class:`o2v_jax.predictor.Predictor` (or anything with its
                ``vocab_sizes``, ``max_seq_lens``, ``predict`` and ``embed``).
        """
        answer = functools.partial(compute, predictor)
        if self._settings.batching:
            self.batcher = Batcher(answer)
            answer = self.batcher.answer
        self._model = _Model(predictor, answer)  # one assignment: handlers see all or nothing

    def failed(self, message: str) -> None:
        self.unavailable(f"the model failed to load: {message}")

    def unavailable(self, message: str) -> None:
        """Why /ping and /invocations answer 503 while no model is ready."""
        self._problem = message

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
            if self._model is None:
                return error_response(503, self._problem, headers=self._retry)
            return Response(200, (), b"")
        if endpoint == "/execution-parameters":
            s = self._settings
            # SageMaker refuses MaxConcurrentTransforms * MaxPayloadInMB > 100. Every
            # worker has its own `threads` slots, so the server admits workers x threads.
            concurrent = max(1, min(s.threads * s.workers, MAX_PAYLOAD_MB // s.max_body_mb))
            params = {"MaxConcurrentTransforms": concurrent, "BatchStrategy": s.batch_strategy,
                      "MaxPayloadInMB": s.max_body_mb}
            return Response(200, _JSON_HEADERS, msgspec.json.encode(params))
        lower = {k.lower(): v for k, v in headers.items()}
        return self._invoke(body, lower.get("content-type"), lower.get("accept"))

    def _invoke(self, body: bytes, content_type: str | None, accept: str | None) -> Response:
        model = self._model
        if model is None:
            return error_response(503, self._problem, headers=self._retry)
        # A bounded wait for an inference slot: excess load gets a fast 503 with
        # Retry-After instead of piling up threads and memory.
        if not self._slots.acquire(timeout=self._settings.queue_timeout):
            return error_response(
                503, f"all {self._settings.threads} inference slots stayed busy for "
                     f"{self._settings.queue_timeout:g} s; retry later", headers=self._retry)
        try:
            out, media_type = respond(body, content_type, accept, model.predictor, answer=model.answer)
        except media.WireError as e:
            return error_response(e.status, e.message, e.path)
        except Exception:
            log.exception("POST /invocations: the predictor failed")
            return error_response(500, GENERIC_500)
        finally:
            self._slots.release()
        return Response(200, (("Content-Type", media_type),), out)
