"""A serving process: ``serve()`` for ``o2v serve --workers 1``, ``main()`` for one of
several workers started by :mod:`o2v_jax.supervisor`.

``serve(settings)`` is the whole server in one process, its own supervisor: it binds the
socket first and loads the model on a background thread, so /ping answers at once (503
while loading, then 200).

A supervised worker (``python -m o2v_jax.worker SPEC``, a fresh interpreter, never a fork
of one that has initialised JAX) inherits the listening socket and a control socket from
its parent. It loads and warms up *before* it accepts anything: the kernel hands each
connection to whichever process accepts first, so a cold worker must not. Then it
reports ``ready`` on the control socket. A load failure is reported there rather than
logged, so the supervisor prints it once however many workers fail. SIGTERM or SIGINT
drains as ``serve()`` does; so does end-of-file on the control socket, which means the
supervisor is gone (killed with SIGKILL, say): no worker outlives it.

Nothing here imports jax until the model loads.

API::

    load_predictor(settings) -> Predictor          predictor.load + warmup
    serve(settings, load=load_predictor) -> int    blocks until SIGTERM/SIGINT
    Spec(settings, listen_fd, control_fd, load, verbose); encode_settings(settings) -> dict
    run(spec) -> int; main([SPEC]) -> int           python -m o2v_jax.worker SPEC
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from o2v_jax.app import App, Settings
from o2v_jax.http import Server

log = logging.getLogger("o2v_jax")

LOAD_PREDICTOR = "o2v_jax.worker:load_predictor"  # the loader a Spec names by default
# A keep-alive connection stays with the worker that accepted it, so a burst of connects
# that all land on one worker would leave the others idle for the connections' lifetime;
# a supervised worker closes a connection this many seconds old after its next response,
# and the client's reconnect goes to whichever worker accepts first (the least busy one
# as a rule: a busy worker's accepting thread waits for the GIL).
RECYCLE_AFTER = 2.0


def load_predictor(settings: Settings):
    """Load the model directory and compile its buckets (predictor.load + warmup)."""
    from o2v_jax import predictor

    model = predictor.load(settings.model_dir, preferred_mode=settings.preferred_mode,
                           compile_cache_dir=settings.compile_cache_dir)
    model.warmup()
    return model


@dataclasses.dataclass
class _Stop:
    """Set by a signal (or the supervisor's end-of-file); the main thread waits on it."""

    event: threading.Event = dataclasses.field(default_factory=threading.Event)

    def on_signal(self, signum: int, frame: Any) -> None:
        log.info("%s: stopping; finishing in-flight requests", signal.Signals(signum).name)
        self.event.set()

    def wait(self) -> None:
        while not self.event.wait(0.5):  # a timed wait keeps the main thread responsive to signals
            pass


def _handle_signals(handler: Callable) -> dict:
    return {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}


def log_limits(settings: Settings, label: str = "limits") -> None:
    log.info(label + ": threads=%d max_connections=%d max_body_mb=%d read_timeout=%gs%s%s",
             settings.threads, settings.max_connections, settings.max_body_mb, settings.read_timeout,
             f" preferred_mode={settings.preferred_mode}" if settings.preferred_mode else "",
             " (batch transform)" if settings.batch else "")


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
    stop, failures = _Stop(), []

    def load_model() -> None:
        t0 = time.perf_counter()
        try:
            predictor = load(settings)
        except Exception as e:
            log.exception("could not load the model from %s", settings.model_dir)
            app.failed(str(e))
            failures.append(e)
            stop.event.set()
            return
        app.ready(predictor)
        log.info("model ready after %.1f s; /ping answers 200", time.perf_counter() - t0)

    previous = _handle_signals(stop.on_signal)
    try:
        server.start()
        host, port = server.address
        scope = "all interfaces" if host in ("0.0.0.0", "::") else "this address only"
        log.info("listening on http://%s:%d (%s%s); loading %s", host, port, scope,
                 ", SageMaker container mode" if settings.sagemaker else "", settings.model_dir)
        log_limits(settings)
        threading.Thread(target=load_model, name="o2v-load", daemon=True).start()
        stop.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)  # a second Ctrl-C interrupts the drain
        server.stop(settings.drain_timeout)
    log.info("server stopped")
    return 1 if failures else 0


# --------------------------------------------------------------------------- a supervised worker


class Spec(msgspec.Struct, frozen=True):
    """What the supervisor tells a worker (one JSON argument)."""

    settings: dict  # encode_settings(Settings)
    listen_fd: int  # the shared listening socket, inherited
    control_fd: int  # this worker's end of a socketpair with the supervisor, inherited
    load: str = LOAD_PREDICTOR  # "module:function" that loads the predictor (tests pass a fake)
    verbose: bool = False  # debug logging, as `o2v -v`


def encode_settings(settings: Settings) -> dict:
    """Settings as JSON-ready values (paths as strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(settings).items()}


def _decode_settings(values: dict) -> Settings:
    paths = {k: Path(values[k]) for k in ("model_dir", "compile_cache_dir") if values.get(k) is not None}
    return Settings(**{**values, **paths})


def _loader(name: str) -> Callable[[Settings], Any]:
    module, _, function = name.partition(":")
    return getattr(importlib.import_module(module), function)


class _Control:
    """The worker's end of the control socket: JSON lines up, end-of-file down."""

    def __init__(self, fd: int):
        self._sock = socket.socket(fileno=fd)
        self._lock = threading.Lock()

    def send(self, **message: Any) -> None:
        with self._lock:
            self._sock.sendall(msgspec.json.encode(message) + b"\n")

    def watch(self, stop: _Stop) -> None:
        """Block until the supervisor's end closes, then stop (run on a daemon thread)."""
        try:
            while self._sock.recv(1024):
                pass
        except OSError:
            pass
        log.warning("the supervisor is gone; stopping")
        stop.event.set()


def run(spec: Spec) -> int:
    """Load, warm up, then serve on the inherited socket until told to stop.

    Returns:
        0 after a stop (a signal, or the supervisor gone), 1 when the model failed to load
        (the error went to the supervisor, which prints it).
    """
    settings = _decode_settings(spec.settings)
    control = _Control(spec.control_fd)
    stop, state, lock = _Stop(), {"serving": False, "failed": False}, threading.Lock()
    app = App(settings)
    server = Server(app, settings, sock=socket.socket(fileno=spec.listen_fd), recycle_after=RECYCLE_AFTER)

    def load_model() -> None:
        t0 = time.perf_counter()
        try:
            predictor = _loader(spec.load)(settings)
        except Exception as e:
            with contextlib.suppress(OSError):  # the supervisor may be gone already
                control.send(event="failed", error=f"{type(e).__name__}: {e}",
                             traceback="".join(traceback.format_exception(e)))
            state["failed"] = True
            stop.event.set()
            return
        app.ready(predictor)
        with lock:
            if stop.event.is_set():
                return
            server.start()  # only now: a warm worker is the only kind that accepts
            state["serving"] = True
        seconds = time.perf_counter() - t0
        log.info("ready after %.1f s (load and warm-up); accepting connections", seconds)
        with contextlib.suppress(OSError):
            control.send(event="ready", seconds=round(seconds, 3))

    previous = _handle_signals(stop.on_signal)
    threading.Thread(target=control.watch, args=(stop,), name="o2v-control", daemon=True).start()
    log.info("loading %s", settings.model_dir)
    threading.Thread(target=load_model, name="o2v-load", daemon=True).start()
    stop.wait()
    with lock:
        serving = state["serving"]
        stop.event.set()  # the loading thread now never starts the server
    if not serving:
        # Stopped (or failed) before accepting anything: nothing to drain. os._exit, so
        # interpreter shutdown never races a loading thread that is inside XLA.
        logging.shutdown()
        sys.stderr.flush()
        os._exit(1 if state["failed"] else 0)
    for s, handler in previous.items():
        signal.signal(s, handler)
    server.stop(settings.drain_timeout)
    log.info("worker stopped")
    return 0


def main(argv: list[str]) -> int:
    """``python -m o2v_jax.worker SPEC``: ``argv`` is [SPEC], a :class:`Spec` as JSON."""
    from o2v_jax.cli import setup_logging

    spec = msgspec.json.decode(argv[0], type=Spec)
    setup_logging(spec.verbose, prefix=f"worker {os.getpid()}: ")
    return run(spec)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
