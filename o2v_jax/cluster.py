"""Running as one of several processes: joining, checking, and failing loudly.

:func:`join` makes this process one of N in a ``jax.distributed`` cluster (gloo
collectives on CPU, NCCL on GPU). Where the addresses come from: ``--coordinator
HOST:PORT --num-processes N --process-id I`` (:func:`from_flags`); SageMaker's
``resourceconfig.json`` (:func:`from_sagemaker`: the first host coordinates, on
:data:`SAGEMAKER_PORT`); or JAX's own detection of a Slurm or Open MPI job
(:func:`detect`). Then:

1. a **roll call** before JAX joins: process 0 listens on the coordinator address and
   every other process reports there (its id, host, ``--num-processes``). Within
   ``timeout_s`` this names the processes that never came, two processes given one
   ``--process-id`` and disagreeing ``--num-processes``, where JAX would wait and then
   abort without saying who is missing;
2. ``jax.distributed.initialize`` (:func:`o2v_jax.runtime.initialize_distributed`) on
   the same address, which the coordinator binds (not every interface);
3. a **watchdog** thread: every process writes a heartbeat into the coordinator's
   key-value store every few seconds and reads everyone's. A process whose heartbeat
   stops for ``timeout_s`` (it died, hangs or lost the network), or that reports an
   error, makes every other process print an error naming it and exit 1; JAX's own
   heartbeat check (four times as long) would abort with a message that names no process.

:meth:`Cluster.check_same` compares what every process was given (hyperparameters,
seed, channels) and names the first flag or file that differs. docs/distributed.md
has the failure behaviour and its time bounds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger("o2v_jax")

SAGEMAKER_PORT = 29475  # the coordinator's port on SageMaker's first host (any free port)
DEFAULT_TIMEOUT_S = 60  # joining, and silence before a process counts as gone
_LIVE = "o2v/live/"  # key-value directory: "beat:<n>", "done" or "failed:<message>" per process


class ClusterError(ValueError):
    """A cluster that cannot form: flags that do not fit together, a process missing."""


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """How this process joins: the coordinator's address, the process count and its id."""

    coordinator: str  # HOST:PORT of process 0
    num_processes: int
    process_id: int
    timeout_s: float = DEFAULT_TIMEOUT_S
    source: str = "--coordinator"  # what the addresses came from, for messages
    local_device_ids: tuple[int, ...] | None = None


def _split_address(address: str, flag: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClusterError(f"{flag} {address!r}: expected HOST:PORT, e.g. 10.0.0.1:29475")
    return host.strip("[]"), int(port)


def from_flags(coordinator: str | None, num_processes: int | None, process_id: int | None,
               timeout_s: float = DEFAULT_TIMEOUT_S) -> ClusterSpec | None:
    """The cluster the three flags describe (None when none is given).

    Raises:
      ClusterError: some but not all of them given, or values out of range (names the flag).
    """
    given = {"--coordinator": coordinator, "--num-processes": num_processes,
             "--process-id": process_id}
    if all(v is None for v in given.values()):
        return None
    missing = [flag for flag, v in given.items() if v is None]
    if missing:
        raise ClusterError(f"{', '.join(missing)} missing: several processes need "
                           f"--coordinator HOST:PORT, --num-processes N and --process-id I")
    _split_address(coordinator, "--coordinator")
    if num_processes < 1:
        raise ClusterError(f"--num-processes {num_processes}: expected at least 1")
    if not 0 <= process_id < num_processes:
        raise ClusterError(f"--process-id {process_id}: expected 0 to {num_processes - 1} "
                           f"(--num-processes {num_processes})")
    if timeout_s <= 0:
        raise ClusterError(f"--cluster-timeout {timeout_s}: expected a positive number of seconds")
    return ClusterSpec(coordinator, num_processes, process_id, timeout_s)


def from_sagemaker(resource_config: Path, timeout_s: float = DEFAULT_TIMEOUT_S,
                   port: int = SAGEMAKER_PORT) -> ClusterSpec | None:
    """The cluster of a SageMaker training job, from its ``resourceconfig.json``
    (``current_host``, ``hosts``): one process per host, the first host coordinates.
    None for a single host, no file, or a file naming no ``hosts`` (as a single-host run
    has always read it: o2v train then warns about an unreadable file and goes on alone).

    Raises:
      ClusterError: several hosts, but the file is not what SageMaker writes (names the
        file and field).
    """
    if not resource_config.is_file():
        return None
    try:
        info = json.loads(resource_config.read_text())
        hosts = list(info.get("hosts") or ()) if isinstance(info, dict) else []
    except (json.JSONDecodeError, TypeError):
        return None
    if len(hosts) <= 1:
        return None
    try:
        current = info["current_host"]
    except KeyError as e:
        raise ClusterError(f"{resource_config}: expected SageMaker's resource config with "
                           f"'current_host' and 'hosts' (KeyError: {e})") from None
    if current not in hosts:
        raise ClusterError(f"{resource_config}: current_host {current!r} is not in hosts {hosts}")
    return ClusterSpec(f"{hosts[0]}:{port}", len(hosts), hosts.index(current), timeout_s,
                       source=str(resource_config))


def detect(timeout_s: float = DEFAULT_TIMEOUT_S) -> ClusterSpec | None:
    """A Slurm or Open MPI job of several processes, as JAX detects it (None otherwise)."""
    from jax._src import clusters  # JAX's detection, before JAX itself joins

    env = next((e for e in clusters.ClusterEnv._cluster_types
                if e.name in ("slurm", "ompi") and e.is_env_present()), None)
    if env is None or env.get_process_count() <= 1:
        return None
    from o2v_jax.env import coordinator_port

    # local_device_ids stays None: JAX picks each process's devices as it would alone.
    return ClusterSpec(env.get_coordinator_address(timeout_secs=int(timeout_s),
                                                   override_coordinator_port=coordinator_port()),
                       env.get_process_count(), env.get_process_id(), timeout_s,
                       source=f"{env.name} coordinator")


# --------------------------------------------------------------------------- roll call

def _send(conn: socket.socket, message: dict) -> None:
    try:
        conn.sendall((json.dumps(message) + "\n").encode())
    except OSError:
        pass


def _receive(conn: socket.socket, timeout_s: float) -> dict | None:
    conn.settimeout(max(timeout_s, 0.1))
    data = b""
    try:
        while not data.endswith(b"\n"):
            chunk = conn.recv(65536)
            if not chunk:
                return None
            data += chunk
    except OSError:
        return None
    try:
        return json.loads(data)
    except json.JSONDecodeError:
        return None


def _listen(spec: ClusterSpec) -> socket.socket:
    host, port = _split_address(spec.coordinator, "--coordinator")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        server = socket.socket(family, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((host, port))
    except OSError as e:
        why = ("the port is in use (another run, or a second process with --process-id 0)"
               if getattr(e, "errno", None) == 98 else
               "this host does not have that address: process 0 must run on the host the "
               "coordinator address names")
        raise ClusterError(f"{spec.source} {spec.coordinator}: process 0 cannot listen there: "
                           f"{why} ({e.strerror or e})") from None
    server.listen(max(spec.num_processes, 8))
    return server


def _check_hello(spec: ClusterSpec, hello: dict, hosts: dict[int, str]) -> str | None:
    """What is wrong with a worker's report, given the hosts of those already in."""
    pid, host = hello.get("process_id"), hello.get("host", "?")
    if hello.get("num_processes") != spec.num_processes:
        return (f"process {pid} on {host} was started with --num-processes "
                f"{hello.get('num_processes')}, process 0 with {spec.num_processes}")
    if pid in hosts:
        return (f"two processes were started with --process-id {pid} (on {hosts[pid]} and "
                f"{host}); give each process its own id, 0 to {spec.num_processes - 1}")
    return None


def _roll_call_coordinator(spec: ClusterSpec) -> list[str]:
    server = _listen(spec)
    hosts, conns, error = {0: socket.gethostname()}, [], None
    deadline = time.monotonic() + spec.timeout_s
    server.settimeout(0.2)
    try:
        while len(hosts) < spec.num_processes and error is None:
            if time.monotonic() > deadline:
                missing = [p for p in range(spec.num_processes) if p not in hosts]
                error = (f"process{'es' if len(missing) > 1 else ''} "
                         f"{', '.join(map(str, missing))} of {spec.num_processes} did not join "
                         f"within {spec.timeout_s:g} s (coordinator {spec.coordinator}); start "
                         f"{'them' if len(missing) > 1 else 'it'} with the same --coordinator "
                         f"and --num-processes, or raise --cluster-timeout")
                break
            try:
                conn, _ = server.accept()
            except socket.timeout:
                continue
            conns.append(conn)
            hello = _receive(conn, 10) or {}
            error = _check_hello(spec, hello, hosts)
            if error is None:
                hosts[hello["process_id"]] = hello.get("host", "?")
        reply = {"error": error} if error else {"hosts": [hosts[p] for p in sorted(hosts)]}
        for conn in conns:
            _send(conn, reply)
        for conn in conns:  # the workers close first: no TIME_WAIT on this port
            _receive(conn, 5)
            conn.close()
    finally:
        server.close()
    if error:
        raise ClusterError(error)
    return reply["hosts"]


def _roll_call_worker(spec: ClusterSpec) -> list[str]:
    host, port = _split_address(spec.coordinator, "--coordinator")
    deadline = time.monotonic() + spec.timeout_s
    while True:
        try:
            conn = socket.create_connection((host, port), timeout=2)
            break
        except OSError as e:
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"process 0 (the coordinator, {spec.source} {spec.coordinator}) did not "
                    f"answer within {spec.timeout_s:g} s: it is not running, or not listening "
                    f"on that address ({e.strerror or e})") from None
            time.sleep(0.5)
    with conn:
        _send(conn, {"process_id": spec.process_id, "num_processes": spec.num_processes,
                     "host": socket.gethostname()})
        reply = _receive(conn, spec.timeout_s + 15)
    if reply is None:
        raise ClusterError(f"process 0 (the coordinator, {spec.coordinator}) closed the "
                           f"connection while processes joined; see its error")
    if reply.get("error"):
        raise ClusterError(f"process 0 reports: {reply['error']}")
    return list(reply["hosts"])


# --------------------------------------------------------------------------- the cluster

class Cluster:
    """This process's place in a running cluster (made by :func:`join`)."""

    def __init__(self, spec: ClusterSpec, hosts: list[str], failure_file: Path | None):
        self.spec = spec
        self.hosts = hosts
        self.failure_file = failure_file
        self._stop = threading.Event()
        self._failing = False
        self._interval = min(2.0, spec.timeout_s / 10)
        self._watchdog = threading.Thread(target=self._watch, name="o2v-watchdog", daemon=True)

    @property
    def process_id(self) -> int:
        return self.spec.process_id

    def name(self, process: int) -> str:
        return f"process {process} ({self.hosts[process]})"

    def _set(self, value: str) -> None:
        from o2v_jax import runtime

        runtime.client().key_value_set(f"{_LIVE}{self.process_id}", value, allow_overwrite=True)

    def _watch(self) -> None:
        from o2v_jax import runtime

        client, beat, now = runtime.client(), 0, time.monotonic()
        seen = {p: (None, now) for p in range(self.spec.num_processes) if p != self.process_id}
        last_ok = now
        while not self._stop.wait(self._interval):
            if self._failing:  # this process is reporting its own error: let it
                continue
            beat, now = beat + 1, time.monotonic()
            try:
                self._set(f"beat:{beat}")
                live = dict(client.key_value_dir_get(_LIVE))
                last_ok = now
            except Exception as e:  # noqa: BLE001 - the coordinator is unreachable
                if now - last_ok > self.spec.timeout_s:
                    self._exit(f"lost the coordinator, {self.name(0)} at {self.spec.coordinator}, "
                               f"for {self.spec.timeout_s:g} s: {str(e).splitlines()[0][:200]}")
                continue
            for p, (value, since) in seen.items():
                value_now = live.get(f"{_LIVE}{p}")
                if value_now == "done":
                    continue
                if value_now and value_now.startswith("failed:"):
                    self._exit(f"{self.name(p)} failed: {value_now[len('failed:'):]}")
                if value_now != value:
                    seen[p] = (value_now, now)
                elif now - since > self.spec.timeout_s:
                    self._exit(f"{self.name(p)} stopped: no heartbeat for "
                               f"{self.spec.timeout_s:g} s (it died, hangs, or lost the network)")

    def _exit(self, message: str | None, code: int = 1) -> None:
        """Print ``message`` as the run's error and end this process now (JAX's exit
        handler would wait for the missing process at its shutdown barrier)."""
        if message is not None:
            print(f"o2v train: error: {message}", file=sys.stderr, flush=True)
        if message is not None and self.failure_file is not None:  # SageMaker's failure reason
            try:
                self.failure_file.parent.mkdir(parents=True, exist_ok=True)
                self.failure_file.write_text(message + "\n")
            except OSError:
                pass
        sys.stdout.flush()
        os._exit(code)

    def fail(self, message: str, code: int, *, peer_suspect: bool = False,
             printed: bool = False) -> None:
        """End this process after an error: tell the others (they exit naming this
        process) and exit with ``code``. Never returns.

        ``peer_suspect``: the error came from a collective (e.g. gloo's "Connection
        closed by peer"), most likely because another process died: first give the
        watchdog the time it needs to name it. ``printed``: the message is on stderr already.
        """
        if peer_suspect:  # the watchdog exits first, naming the process, if one is gone
            log.error("a collective operation failed; waiting up to %.0f s to learn whether "
                      "another process is gone", self.spec.timeout_s)
            time.sleep(self.spec.timeout_s + 3 * self._interval)
        self._failing = True
        try:
            self._set(f"failed:{message[:2000]}")
        except Exception:  # noqa: BLE001 - the coordinator is gone too; just exit
            pass
        if self.process_id == 0:  # the key-value store dies with this process: let them read
            time.sleep(3 * self._interval)
        self._exit(None if printed else message, code)

    def check_same(self, fields: Mapping[str, str]) -> None:
        """Every process was given the same ``fields`` (name -> what this process has,
        e.g. ``{"--seed": "0", "--train": "1000 records, crc32 ..."}``), else a
        ClusterError naming the first that differs and the processes."""
        from o2v_jax import runtime

        mine = json.dumps(dict(fields), sort_keys=True)
        everyone = [json.loads(v) for v in runtime.gather_text("check", mine)]
        for name in fields:
            values = [theirs.get(name) for theirs in everyone]
            odd = next((p for p, v in enumerate(values) if v != values[0]), None)
            if odd is not None:
                raise ClusterError(f"{name} differs between processes: {self.name(0)} has "
                                   f"{_short(values[0])}, {self.name(odd)} has {_short(values[odd])}")

    def finish(self) -> None:
        """The run is done here: wait for every process, then leave the cluster."""
        import jax

        from o2v_jax import runtime

        self._set("done")
        runtime.barrier("finished")
        self._stop.set()
        self._watchdog.join(timeout=5)
        jax.distributed.shutdown()


def _short(value: str | None) -> str:
    text = "nothing" if value is None else value
    return text if len(text) <= 80 else text[:60] + "... (sha256 " + hashlib.sha256(
        text.encode()).hexdigest()[:12] + ")"


_active: Cluster | None = None


def active() -> Cluster | None:
    """The cluster this process joined, or None."""
    return _active


def join(spec: ClusterSpec, failure_file: Path | None = None) -> Cluster:
    """Join the cluster ``spec`` describes (once per process): roll call, JAX, watchdog.

    Raises:
      ClusterError: a process missing, a duplicate id, a busy coordinator port, ...
    """
    global _active
    from o2v_jax import runtime

    started = time.monotonic()
    roll_call = _roll_call_coordinator if spec.process_id == 0 else _roll_call_worker
    hosts = roll_call(spec)
    runtime.initialize_distributed(spec.coordinator, spec.num_processes, spec.process_id,
                                   timeout_s=int(max(spec.timeout_s, 1)),
                                   local_device_ids=spec.local_device_ids and list(spec.local_device_ids))
    _active = Cluster(spec, hosts, failure_file)
    _active._set("beat:0")
    _active._watchdog.start()
    log.info("joined a cluster of %d processes as process %d (coordinator %s, %.1f s)",
             spec.num_processes, spec.process_id, spec.coordinator, time.monotonic() - started)
    return _active


def check_run(joined: Cluster, config, data: Mapping, pretrained, *, seed: int, resume: bool,
              devices: int | None) -> None:
    """Every process was given the same flags, hyperparameters and data (else a
    ClusterError naming the first difference)."""
    import zlib

    import jax
    import numpy as np

    fields = {"--seed": str(seed), "--resume": str(resume),
              "--devices": str(devices or len(jax.local_devices()))}
    fields.update({f"hyperparameter {k} (--hyperparameters, --hp)": v
                   for k, v in config.to_hyperparameters().items()})
    fields.update({f"--{name} channel": describe_data(name, d) for name, d in data.items()})
    for side, pre in enumerate(pretrained):
        if pre is not None:
            crc = zlib.crc32(np.ascontiguousarray(pre.vectors).view(np.uint8).reshape(-1))
            fields[f"--auxiliary (enc{side} vectors)"] = f"crc32 {crc:08x}"
    joined.check_same(fields)


def describe_data(name: str, data) -> str:
    """What :meth:`Cluster.check_same` compares for a channel: its size and a CRC of its
    arrays (every process must read the same records)."""
    import zlib

    import numpy as np

    crc = 0
    for array in (data.in0.tokens, data.in0.offsets, data.in1.tokens, data.in1.offsets,
                  data.labels):
        crc = zlib.crc32(np.ascontiguousarray(array).view(np.uint8).reshape(-1), crc)
    return f"{len(data)} records, crc32 {crc:08x}"

