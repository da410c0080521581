"""Process-wide JAX settings o2v-jax changes, in one place.

JAX reads some settings once per process (the persistent compilation cache, the number
of CPU devices, a distributed cluster), so changing them is a decision about the whole
process, not about one model: the library does it only here, when a caller asks.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import jax


def enable_compilation_cache(path: str | Path) -> None:
    """Use JAX's persistent compilation cache in ``path`` (process-wide setting).

    JAX skips caching compiles faster than 1 s by default; inference buckets of a small
    model compile in tens of milliseconds each, so the threshold is set to 0.
    """
    from jax.experimental.compilation_cache import compilation_cache

    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    # JAX decides once per process whether the cache is used (at the first compile);
    # forget that decision so a cache set after something compiled still takes effect.
    compilation_cache.reset_cache()


# --------------------------------------------------------------------------- a cluster

def initialize_distributed(coordinator: str, num_processes: int, process_id: int, *,
                           timeout_s: int, local_device_ids: list[int] | None = None) -> None:
    """Join a ``jax.distributed`` cluster (process-wide, once; o2v_jax.cluster calls it).

    The coordinator (process 0) binds to ``coordinator`` itself, not to every interface
    (JAX's default). ``timeout_s`` bounds joining; JAX's own heartbeat check gets four
    times that, so o2v_jax.cluster's watchdog (which names the process that stopped)
    speaks first: JAX's check can fire after about half its timeout (jaxlib 0.10.2;
    docs/distributed.md), so at twice ``timeout_s`` it sometimes won the race and
    aborted every process with a message that names no process.
    On CPU the collectives are gloo's.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids,
                               coordinator_bind_address=coordinator,
                               initialization_timeout=int(timeout_s),
                               heartbeat_timeout_seconds=int(4 * timeout_s),
                               shutdown_timeout_seconds=int(timeout_s))


def client():
    """The ``jax.distributed`` client (its key-value store and barriers), or None when
    this process is not in a cluster. JAX keeps it in a private module; orbax reads it
    from there too."""
    from jax._src.distributed import global_state

    return global_state.client


_calls = itertools.count()  # every process makes the same calls in the same order


def barrier(name: str, timeout_s: float = 24 * 3600) -> None:
    """Wait until every process gets here; nothing when there is one process.

    The coordination service's barrier, not a device collective: it may wait for as
    long as another process needs (a slow save), where a gloo collective would time
    out. A process that dies meanwhile is o2v_jax.cluster's watchdog's to report.
    """
    c = client()
    if c is None or jax.process_count() == 1:
        return
    c.wait_at_barrier(f"o2v/{name}/{next(_calls)}", int(timeout_s * 1000))


def agreed(make: Callable[[], str], timeout_s: float = 24 * 3600) -> str:
    """``make()`` as process 0 computed it, on every process (e.g. a fresh directory
    name all processes must write into)."""
    c = client()
    if c is None or jax.process_count() == 1:
        return make()
    key = f"o2v/agreed/{next(_calls)}"
    if jax.process_index() == 0:
        value = make()
        c.key_value_set(key, value)
        return value
    return c.blocking_key_value_get(key, int(timeout_s * 1000))


def gather_text(name: str, value: str, timeout_s: float = 24 * 3600) -> list[str]:
    """Every process's ``value``, in process order (``[value]`` in one process)."""
    c = client()
    if c is None or jax.process_count() == 1:
        return [value]
    key = f"o2v/gather/{name}/{next(_calls)}"
    c.key_value_set(f"{key}/{jax.process_index()}", value)
    return [c.blocking_key_value_get(f"{key}/{p}", int(timeout_s * 1000))
            for p in range(jax.process_count())]


def shared_directory(path: str | Path) -> bool:
    """Whether every process sees the same ``path`` (a filesystem they all share);
    True in one process. A file process 0 writes there must be visible to all."""
    import uuid

    if client() is None or jax.process_count() == 1:
        return True
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    token = agreed(lambda: uuid.uuid4().hex)
    probe = path / f".o2v-shared-{token}"
    if jax.process_index() == 0:
        probe.write_text(token)
    barrier("probe-written")
    seen = probe.is_file() and probe.read_text() == token
    everyone = gather_text("probe", "1" if seen else "0")
    if jax.process_index() == 0:
        probe.unlink(missing_ok=True)
    return all(v == "1" for v in everyone)
