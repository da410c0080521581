"""``o2v serve --workers N``: the parent process that runs N supervised workers.

Why processes: a server's JSON decoding and encoding hold the GIL, so one process uses
about one core, and one crash (an out-of-memory kill, a fault in a native library) would
take the whole endpoint down (issue 20).

* **One socket.** The parent binds the listening socket (a taken port fails at once, and
  only the address asked for is bound) and hands it to every worker as an inherited
  descriptor. The kernel queues connections on it and gives each to whichever process
  accepts first. Connections still in the queue survive a worker's death (separate
  ``SO_REUSEPORT`` sockets would reset the queue of the one that closes).
* **Fresh workers.** Each worker is a new interpreter (``python -m o2v_jax.worker``),
  never a fork of a process that has initialised JAX. The first starts alone and
  compiles into JAX's persistent compilation cache (``Settings.compile_cache_dir``); the
  others start once it is ready and load its executables instead of compiling.
* **Someone always answers.** A worker accepts only once warm. Until one is, the parent
  accepts on the socket itself, with an App that is never ready: /ping 503, /invocations
  503 with ``Retry-After``, every response closing its connection so that no client
  stays. It stops accepting when a worker is ready, and starts again if none is left.
* **Restarts.** A worker that exits or is killed is restarted after a back-off that
  doubles with each failure in a row (``BACKOFF_FIRST`` to ``BACKOFF_CAP`` s) and resets
  once a worker has stayed up ``STABLE`` s. Before any worker has been ready, a worker
  that fails to load the model (or exits with an error) stops the server instead: the
  error is printed once and the exit status is 1.
* **Stopping.** SIGTERM or SIGINT: close the parent's copy of the socket, forward
  SIGTERM to every worker (each drains its in-flight requests, ``drain_timeout``), wait
  for all, exit 0. A second signal kills them. Workers have their own process groups, so
  a terminal's Ctrl-C reaches only the parent, which forwards it once; a worker whose
  parent dies sees end-of-file on its control socket and stops, so none is orphaned.

Nothing here imports jax. API::

    supervise(settings, *, load=worker.LOAD_PREDICTOR, verbose=False) -> int
"""

from __future__ import annotations

import dataclasses
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from o2v_jax.app import App, Settings
from o2v_jax.http import Server
from o2v_jax.worker import LOAD_PREDICTOR, Spec, encode_settings, log_limits

log = logging.getLogger("o2v_jax")

BACKOFF_FIRST = 0.5  # seconds before the first restart of a slot
BACKOFF_CAP = 30.0  # the longest wait between restarts
STABLE = 60.0  # seconds a worker must stay up for its slot's back-off to reset
KILL_GRACE = 10.0  # seconds past drain_timeout before a worker that has not exited is killed


@dataclasses.dataclass
class _Worker:
    slot: int  # 0 .. workers-1; a restart takes the slot of the worker it replaces
    proc: subprocess.Popen
    control: socket.socket  # the parent's end: JSON lines from the worker, EOF when it exits
    ready_at: float | None = None  # time.monotonic() of its "ready"
    failed: bool = False  # it reported that the model failed to load
    eof: bool = False  # its control socket reached end-of-file (it is exiting)
    buffer: bytes = b""

    @property
    def pid(self) -> int:
        return self.proc.pid


def _exit_status(code: int) -> str:
    if code < 0:
        return f"was killed by signal {-code} ({signal.Signals(-code).name})"
    return f"exited with status {code}"


class Supervisor:
    """Binds when constructed (OSError if the address is taken); :meth:`run` serves."""

    def __init__(self, settings: Settings, *, load: str = LOAD_PREDICTOR, verbose: bool = False):
        self.settings, self._load, self._verbose = settings, load, verbose
        self.app = App(settings)  # never ready: the answers while no worker is
        self.server = Server(self.app, settings, keep_alive=False)  # binds now
        # Several processes accept on it: an accept that loses the race must not block.
        os.set_blocking(self.server.fileno(), False)
        self._workers: dict[int, _Worker] = {}  # by pid
        self._restarts: dict[int, float] = {}  # slot -> time.monotonic() to start it
        self._crashes = [0] * settings.workers  # failures in a row, per slot
        self._selector = selectors.DefaultSelector()
        self._signals: list[int] = []
        self._answering = self._ever_ready = self._killed = self._unclean = False
        self._stopping_since: float | None = None
        self._error = False

    # --- the loop

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT (main thread only: it installs handlers).

        Returns:
            0 after a signal once every worker drained and exited 0; 1 when the model
            failed to load before any worker was ready, or a worker did not stop cleanly.
        """
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        self._selector.register(wake_r, selectors.EVENT_READ, None)
        old_wakeup = signal.set_wakeup_fd(wake_w)  # a signal wakes the selector
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self._answer(True)
            host, port = self.server.address
            scope = "all interfaces" if host in ("0.0.0.0", "::") else "this address only"
            log.info("listening on http://%s:%d (%s%s; %d workers); loading %s", host, port, scope,
                     ", SageMaker container mode" if self.settings.sagemaker else "",
                     self.settings.workers, self.settings.model_dir)
            log_limits(self.settings, "limits per worker")
            self._spawn(0)  # alone: it fills the compilation cache for the others
            while self._stopping_since is None or self._workers:
                for key, _ in self._selector.select(self._timeout()):
                    if key.data is None:
                        os.read(wake_r, 1024)
                    else:
                        self._read(key.data)
                self._handle_signals()
                self._reap()
                self._restart_due()
                self._kill_stragglers()
        finally:
            for w in self._workers.values():  # only after an exception here: no orphans
                w.proc.kill()
                w.proc.wait()
            for s, handler in previous.items():
                signal.signal(s, handler)
            signal.set_wakeup_fd(old_wakeup)
            os.close(wake_r)
            os.close(wake_w)
            self.server.stop(self.settings.drain_timeout)
        log.info("server stopped")
        return 1 if self._error or self._killed or self._unclean else 0

    def _timeout(self) -> float:
        soonest = min(self._restarts.values(), default=float("inf"))
        # A worker's EOF can come a moment before its exit status: poll again soon.
        return max(0.0, min(0.2, soonest - time.monotonic()))

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals.append(signum)

    def _handle_signals(self) -> None:
        while self._signals:
            name = signal.Signals(self._signals.pop(0)).name
            if self._stopping_since is None:
                log.info("%s: stopping; %d workers finish their in-flight requests", name, len(self._workers))
                self._stop()
            elif not self._killed:
                log.warning("%s again: killing %d workers", name, len(self._workers))
                self._killed = True
                for w in self._workers.values():
                    w.proc.kill()

    def _stop(self) -> None:
        self._stopping_since = time.monotonic()
        self._restarts.clear()
        self._answer(False)
        self.server.close()  # the socket closes once the workers close their copies too
        for w in self._workers.values():
            w.proc.send_signal(signal.SIGTERM)

    def _kill_stragglers(self) -> None:
        if self._stopping_since is None or self._killed:
            return
        if time.monotonic() - self._stopping_since > self.settings.drain_timeout + KILL_GRACE:
            for w in self._workers.values():
                log.warning("worker %d has not stopped %g s after SIGTERM; killing it",
                            w.pid, self.settings.drain_timeout + KILL_GRACE)
                w.proc.kill()
            self._killed = True

    # --- workers

    def _spawn(self, slot: int) -> None:
        parent_end, child_end = socket.socketpair()
        spec = Spec(settings=encode_settings(self.settings), listen_fd=self.server.fileno(),
                    control_fd=child_end.fileno(), load=self._load, verbose=self._verbose)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "o2v_jax.worker", msgspec.json.encode(spec).decode()],
                pass_fds=(spec.listen_fd, spec.control_fd), stdin=subprocess.DEVNULL,
                process_group=0)  # a terminal's Ctrl-C reaches the parent only
        finally:
            child_end.close()
        parent_end.setblocking(False)
        worker = _Worker(slot, proc, parent_end)
        self._workers[proc.pid] = worker
        self._selector.register(parent_end, selectors.EVENT_READ, worker)
        log.info("started worker %d (%d of %d)", proc.pid, slot + 1, self.settings.workers)

    def _read(self, worker: _Worker) -> None:
        try:
            data = worker.control.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the worker exited (or is exiting): _reap collects it
            self._selector.unregister(worker.control)
            worker.eof = True
            return
        worker.buffer += data
        while b"\n" in worker.buffer:
            line, worker.buffer = worker.buffer.split(b"\n", 1)
            message = msgspec.json.decode(line)
            if message["event"] == "ready":
                self._ready(worker, message["seconds"])
            elif message["event"] == "failed":
                self._failed(worker, message)

    def _ready(self, worker: _Worker, seconds: float) -> None:
        first_ready = not any(w.ready_at is not None for w in self._workers.values())
        worker.ready_at = time.monotonic()
        log.info("worker %d ready after %.1f s (load and warm-up)%s", worker.pid, seconds,
                 "; /ping answers 200" if first_ready else "")
        if self._stopping_since is not None:
            return
        self._answer(False)  # a warm worker accepts from now on
        if not self._ever_ready:
            self._ever_ready = True
            for slot in range(1, self.settings.workers):
                self._spawn(slot)

    def _failed(self, worker: _Worker, message: dict) -> None:
        worker.failed = True
        if self._ever_ready:  # the others serve on; this slot is retried with back-off
            log.error("worker %d could not load the model from %s: %s", worker.pid,
                      self.settings.model_dir, message["error"])
            return
        if not self._error:  # printed once, however many workers fail
            self._error = True
            log.error("could not load the model from %s\n%s", self.settings.model_dir,
                      message["traceback"].rstrip())
        if self._stopping_since is None:
            self._stop()

    def _reap(self) -> None:
        for pid, worker in list(self._workers.items()):
            code = worker.proc.poll()
            if code is None:
                continue
            del self._workers[pid]
            if not worker.eof:
                self._selector.unregister(worker.control)
            worker.control.close()
            self._exited(worker, code)

    def _exited(self, worker: _Worker, code: int) -> None:
        if self._stopping_since is not None:
            # SIGTERM before its handlers were installed: it had accepted nothing.
            clean = code == 0 or (code == -signal.SIGTERM and worker.ready_at is None)
            if not clean and not self._killed and not worker.failed:
                log.warning("worker %d %s while stopping", worker.pid, _exit_status(code))
                self._unclean = True
            return
        if not self._ever_ready and code > 0:  # it cannot start: restarting would loop
            if not worker.failed and not self._error:
                self._error = True
                log.error("worker %d %s before it was ready; stopping", worker.pid, _exit_status(code))
            self._stop()
            return
        slot = worker.slot
        if worker.ready_at is not None and time.monotonic() - worker.ready_at >= STABLE:
            self._crashes[slot] = 0
        self._crashes[slot] += 1
        delay = min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** (self._crashes[slot] - 1))
        log.warning("worker %d %s; restarting it in %.1f s", worker.pid, _exit_status(code), delay)
        self._restarts[slot] = time.monotonic() + delay
        if not any(w.ready_at is not None for w in self._workers.values()):
            self.app.unavailable("no worker is ready; one is restarting")
            self._answer(True)

    def _restart_due(self) -> None:
        now = time.monotonic()
        for slot, when in list(self._restarts.items()):
            if when <= now:
                del self._restarts[slot]
                self._spawn(slot)

    def _answer(self, on: bool) -> None:
        """Accept on the parent's own socket (while no worker is ready), or stop."""
        if on and not self._answering:
            self.server.start()
        elif not on and self._answering:
            self.server.pause()
        self._answering = on


def supervise(settings: Settings, *, load: str = LOAD_PREDICTOR, verbose: bool = False) -> int:
    """Serve with ``settings.workers`` worker processes until SIGTERM or SIGINT.

    Args:
        settings: the server's settings; every limit in them holds per worker.
        load: "module:function" each worker calls with the settings to load its
            predictor (tests pass a fake).
        verbose: debug logging in the workers.

    Returns:
        The exit status (:meth:`Supervisor.run`).

    Raises:
        OSError: the address cannot be bound.
    """
    if settings.compile_cache_dir is not None:
        try:
            Path(settings.compile_cache_dir).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            log.warning("compilation cache %s is not usable (%s); every worker compiles",
                        settings.compile_cache_dir, e)
            settings = dataclasses.replace(settings, compile_cache_dir=None)
    return Supervisor(settings, load=load, verbose=verbose).run()
