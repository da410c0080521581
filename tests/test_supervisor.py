"""``o2v serve --workers N``: the supervisor and its workers, as real processes.

Most tests run the supervisor with a fake loader (tests/fake_model.py: load_from_dir,
driven by the model directory's fake.json), so workers start in about a second and
nothing compiles; the last ones run the real `o2v serve` command. Every process a test
starts carries the test's model directory in its command line, so "no process left
behind" is a scan of /proc for it (psutil-free).

Ordering comes from log lines, a gated fake model and refused connects, never from
sleeps; the only time bounds are hang guards (HANG s).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from fake_model import EMBED, HANG, assert_values, wait_until

REPO = Path(__file__).resolve().parents[1]
ENV = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
BODY = json.dumps({"instances": EMBED})
DRIVER = textwrap.dedent("""
    import json, logging, sys
    from pathlib import Path
    from o2v_jax.app import Settings
    from o2v_jax.supervisor import supervise

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    settings = Settings(model_dir=Path(sys.argv[1]), port=0, **json.loads(sys.argv[2]))
    sys.exit(supervise(settings, load="fake_model:load_from_dir"))
""")


def processes_mentioning(text: str) -> list[int]:
    """Live (not zombie) processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if text.encode() in (entry / "cmdline").read_bytes():
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(entry.name))
    return found


def call(port: int, method: str = "POST", path: str = "/invocations", body: str | None = BODY,
         conn: http.client.HTTPConnection | None = None) -> tuple[int, dict, bytes]:
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=HANG)
    try:
        c.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        if conn is None:
            c.close()


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=HANG).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        pass
    return False


class Supervised:
    """A supervisor (DRIVER or ``argv``) in a subprocess; its and its workers' log lines
    (they share stderr) read on a thread."""

    def __init__(self, model_dir: Path, fake: dict | None = None, argv: list[str] | None = None, **settings):
        self.model_dir = model_dir
        model_dir.mkdir(parents=True, exist_ok=True)
        if fake is not None:
            (model_dir / "fake.json").write_text(json.dumps(fake))
        settings = {"workers": 2, **settings}
        argv = argv or [sys.executable, "-c", DRIVER, str(model_dir), json.dumps(settings)]
        self.lines: list[str] = []
        self._new = threading.Condition()
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, env=ENV, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        self.port = int(self.wait_for(r"listening on http://127\.0\.0\.1:(\d+)")[0].group(1))

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self._new:
                self.lines.append(line)
                self._new.notify_all()

    def matches(self, pattern: str) -> list[re.Match]:
        with self._new:
            return [m for m in map(re.compile(pattern).search, self.lines) if m]

    def wait_for(self, pattern: str, count: int = 1) -> list[re.Match]:
        """The first ``count`` log lines matching ``pattern``, waiting for them."""
        with self._new:
            self._new.wait_for(lambda: len(self.matches(pattern)) >= count, HANG)
        found = self.matches(pattern)
        assert len(found) >= count, f"not {count} lines matching {pattern!r}; the log:\n{''.join(self.lines)}"
        return found[:count]

    def ready_workers(self, count: int = 2) -> list[int]:
        return [int(m.group(1)) for m in self.wait_for(r"worker (\d+) ready after", count)]

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the supervisor; returns its exit status, after checking nothing is left."""
        self.proc.send_signal(sig)
        code = self.proc.wait(HANG)
        assert processes_mentioning(str(self.model_dir)) == [], "".join(self.lines)
        return code

    def close(self) -> None:
        for pid in [self.proc.pid] + processes_mentioning(str(self.model_dir)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(HANG)


@contextlib.contextmanager
def supervised(model_dir: Path, fake: dict | None = None, **settings):
    srv = Supervised(model_dir, fake, **settings)
    try:
        yield srv
    finally:
        (model_dir / "release").touch()
        srv.close()


# --------------------------------------------------------------------------- start and stop


def test_start_ready_sigterm_cycles_exit_0_and_leave_no_process(tmp_path):
    # SIGTERM at random moments (seeded): while the first worker loads, just after /ping
    # turns 200, and while clients send requests. Every exit is 0, nothing is left.
    rng = random.Random(20)
    phases = ["warm-up", "ready", "load"] * 2
    rng.shuffle(phases)
    for cycle, phase in enumerate(phases):
        with supervised(tmp_path / f"m{cycle}", {"load_delay": 0.5}) as srv:
            if phase == "warm-up":
                srv.wait_for(r"started worker \d+ \(1 of 2\)")
                threading.Event().wait(rng.uniform(0, 0.6))  # anywhere in start-up and load
                assert srv.stop() == 0, "".join(srv.lines)
                continue
            srv.wait_for("/ping answers 200")
            if phase == "ready":
                assert srv.stop() == 0, "".join(srv.lines)
                continue
            srv.ready_workers(2)
            statuses, stop = [], threading.Event()

            def client() -> None:
                conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=HANG)
                with contextlib.suppress(OSError, http.client.HTTPException):
                    while not stop.is_set():
                        statuses.append(call(srv.port, conn=conn)[0])

            with ThreadPoolExecutor(4) as pool:
                try:
                    for _ in range(4):
                        pool.submit(client)
                    wait_until(lambda: len(statuses) >= rng.randint(1, 40), "clients are served")
                    code = srv.stop()
                finally:
                    stop.set()
            assert code == 0, "".join(srv.lines)
            assert set(statuses) == {200}  # the in-flight ones were finished, none refused
        assert srv.matches("server stopped")


def test_supervisor_killed_with_sigkill_leaves_no_worker(tmp_path):
    # The workers watch their control socket: end-of-file means the parent is gone.
    with supervised(tmp_path / "m", {}) as srv:
        workers = srv.ready_workers(2)
        srv.proc.kill()
        wait_until(lambda: processes_mentioning(str(srv.model_dir)) == [], "the workers exit")
        assert len(srv.matches(r"worker \d+: the supervisor is gone; stopping")) == len(workers)


# --------------------------------------------------------------------------- two workers


def held_request(port: int) -> tuple[int, dict, bytes]:
    """A request that retries 503 (a worker whose only connection slot is taken refuses)."""
    while True:
        status, headers, body = call(port)
        if status != 503:
            return status, headers, body


def test_two_workers_answer_at_once_and_sigterm_finishes_both(tmp_path):
    # max_connections=1: a worker holding one request refuses a second connection, so
    # the retried second request ends up in the other worker.
    with supervised(tmp_path / "m", {"gate": True}, max_connections=1) as srv, ThreadPoolExecutor(2) as pool:
        srv.ready_workers(2)
        held = [pool.submit(held_request, srv.port) for _ in range(2)]
        invoked = srv.wait_for(r"worker (\d+): invoked", 2)
        assert len({m.group(1) for m in invoked}) == 2  # in flight in two processes at once
        srv.proc.send_signal(signal.SIGTERM)
        srv.wait_for(r"worker \d+: SIGTERM: stopping", 2)
        wait_until(lambda: refused(srv.port), "every copy of the listening socket is closed")
        assert not any(f.done() for f in held)
        (srv.model_dir / "release").touch()
        for f in held:
            status, headers, body = f.result(HANG)
            assert status == 200 and headers["connection"] == "close"
            assert_values([p["embeddings"] for p in json.loads(body)["predictions"]], EMBED)
        assert srv.proc.wait(HANG) == 0
        assert processes_mentioning(str(srv.model_dir)) == []
        assert not srv.matches("still in flight")


def test_kill_9_of_a_worker_under_load(tmp_path):
    # The other worker answers while the killed one restarts; only requests that were in
    # flight in it, or sent on a connection it held, fail (at most one per client).
    with supervised(tmp_path / "m", {}) as srv:
        victim, survivor = srv.ready_workers(2)
        # The replacement's load waits for `go`: the survivor alone answers until then.
        (srv.model_dir / "fake.json").write_text(json.dumps({"hold": "go"}))
        results: list[list] = [[] for _ in range(4)]
        stop = threading.Event()

        def client(i: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=HANG)
            while not stop.is_set():
                try:
                    status, _, body = call(srv.port, conn=conn)
                    assert status == 200
                    assert_values([p["embeddings"] for p in json.loads(body)["predictions"]], EMBED)
                    results[i].append("ok")
                except (OSError, http.client.HTTPException) as e:
                    results[i].append(e)
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=HANG)

        def served_since(marks: list[int], n: int) -> bool:
            for f in futures:
                if f.done():
                    f.result()  # a client's failed assertion, raised here
            return all(sum(r == "ok" for r in x[m:]) >= n for x, m in zip(results, marks))

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(client, i) for i in range(4)]
            try:
                wait_until(lambda: served_since([0] * 4, 5), "every client is served")
                os.kill(victim, signal.SIGKILL)
                srv.wait_for(rf"worker {victim} was killed by signal 9 \(SIGKILL\); restarting it in 0\.5 s")
                replacement = int(srv.wait_for(r"started worker (\d+) \(\d of 2\)", 3)[2].group(1))
                marks = [len(x) for x in results]
                wait_until(lambda: served_since(marks, 10), "every client is served while one worker is down")
                # Fresh connections too: neither the loading replacement nor the parent accepts.
                srv.wait_for(rf"worker {replacement}: loading")
                assert [call(srv.port)[0] for _ in range(20)] == [200] * 20
                assert not srv.matches(rf"worker {replacement} ready after")
                (srv.model_dir / "go").touch()
                srv.wait_for(rf"worker {replacement} ready after")
                marks = [len(x) for x in results]
                wait_until(lambda: served_since(marks, 10), "every client is served after the restart")
            finally:
                stop.set()
            for f in futures:
                f.result(HANG)  # no wrong answer (assert_values) in any client
        assert replacement not in (victim, survivor)
        errors = [e for x in results for e in x if e != "ok"]
        assert all(sum(e != "ok" for e in x) <= 1 for x in results), errors
        assert srv.stop() == 0


def test_with_every_worker_down_the_supervisor_answers_until_one_is_warm(tmp_path):
    with supervised(tmp_path / "m", {}) as srv:
        workers = srv.ready_workers(2)
        (srv.model_dir / "fake.json").write_text(json.dumps({"hold": "go"}))  # restarts wait
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        srv.wait_for(r"was killed by signal 9 \(SIGKILL\); restarting it in", 2)
        status, headers, body = call(srv.port, "GET", "/ping", body=None)
        assert (status, json.loads(body)["error"]) == (503, "no worker is ready; one is restarting")
        assert headers["connection"] == "close" and headers["retry-after"] == "1"
        assert call(srv.port)[0] == 503
        (srv.model_dir / "go").touch()
        srv.wait_for(r"worker \d+ ready after", 3)
        wait_until(lambda: call(srv.port, "GET", "/ping", body=None)[0] == 200, "a restarted worker answers")
        assert srv.stop() == 0


# --------------------------------------------------------------------------- the real command


def serve_argv(model_dir: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "o2v_jax.cli", "serve", "--model-dir", str(model_dir),
            "--port", "0", *flags]


def test_a_bad_model_directory_with_two_workers_exits_1_with_the_error_once(tmp_path):
    model_dir = tmp_path / "not-a-model"
    model_dir.mkdir()
    srv = Supervised(model_dir, argv=serve_argv(model_dir, "--workers", "2", "--compile-cache-dir",
                                                str(tmp_path / "cache")))
    try:
        assert srv.proc.wait(HANG * 2) == 1
    finally:
        srv.close()
    log = "".join(srv.lines)
    assert log.count("no model.json; not an o2v-jax model directory") == 1, log
    assert "could not load the model from" in log and "restarting" not in log
    assert processes_mentioning(str(model_dir)) == []


def test_two_workers_serve_a_real_model(tmp_path):
    # The first worker compiles into the compilation cache; the second starts after it.
    from test_app import save_untrained

    from o2v_jax.predictor import load

    model_dir = save_untrained(tmp_path / "model")
    cache = tmp_path / "cache"
    srv = Supervised(model_dir, argv=serve_argv(model_dir, "--workers", "2", "--compile-cache-dir", str(cache)))
    try:
        first, second = srv.ready_workers(2)
        assert any(cache.iterdir())
        # `o2v serve` (cli.main too) never loads JAX in the supervisor: it binds at once,
        # and its memory is its own, not a model's. The workers have it, as a check of the check.
        assert "jaxlib" not in Path(f"/proc/{srv.proc.pid}/maps").read_text()
        assert "jaxlib" in Path(f"/proc/{first}/maps").read_text()
        pairs = [{"in0": [1, 2, 3], "in1": [4, 5]}, {"in0": [30, 31], "in1": [2]}]
        status, _, out = call(srv.port, body=json.dumps({"instances": pairs}))
        want = load(model_dir).predict([p["in0"] for p in pairs], [p["in1"] for p in pairs])
        assert status == 200
        scores = np.array([p["scores"] for p in json.loads(out)["predictions"]], np.float32)
        np.testing.assert_array_equal(scores, want)  # shortest round-trip decimals: exact
        assert srv.stop() == 0
    finally:
        srv.close()
