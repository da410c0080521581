"""A native row write-back for the lazy ``row_sparse`` optimizer loop on CPU.

:func:`set_rows` is ``table.at[idx].set(rows, mode="drop")``. On the CPU it runs as an
XLA FFI call into ``rows.cc`` (one ``memcpy`` per row, in place on a donated table)
instead of XLA's CPU scatter, a serial per-element loop that a profile showed as a
large share of a Wikipedia-sized ``row_sparse`` step (the measured gain is smaller, since
the rows still go to memory: benchmarks/RESULTS.md, "Training throughput"). The results
are identical: both copy the same values.

The C++ file is compiled on first use with the machine's C++ compiler (``$CXX``, else
``c++``/``g++``) against the XLA FFI headers that ship with jaxlib, into the o2v-jax
cache (``$O2V_CACHE_DIR``, else ``$XDG_CACHE_HOME/o2v-jax``, else ``~/.cache/o2v-jax``),
keyed by the source and the jaxlib version, so later runs load it in milliseconds. If
there is no compiler, the build fails or ``O2V_NATIVE=0`` is set, :func:`set_rows` is
XLA's scatter and a warning says so once: slower, never different. On other platforms
(GPU) the scatter is always XLA's. See docs/training.md.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from importlib import resources
from pathlib import Path

import jax
import jax.numpy as jnp

from o2v_jax import env

log = logging.getLogger("o2v_jax")

TARGET = "o2v_set_rows"  # the FFI target name registered with XLA
_SYMBOL = "O2vSetRows"
_FLAGS = ("-O2", "-std=c++17", "-shared", "-fPIC", "-w")
_BUILD_TIMEOUT_S = 300

_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool, "why": str (empty when ok); decided once
_registered: tuple[ctypes.CDLL, Path] | None = None  # the library XLA's handler lives in


def _source() -> bytes:
    return resources.files("o2v_jax").joinpath("rows.cc").read_bytes()


def _compiler() -> str | None:
    return env.compiler() or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def library_path(cache_dir: Path) -> Path:
    """Where the compiled library for this source and jaxlib lives under ``cache_dir``."""
    import jaxlib

    key = hashlib.sha256(_source() + jaxlib.__version__.encode() + " ".join(_FLAGS).encode())
    return Path(cache_dir) / "native" / key.hexdigest()[:16] / "libo2v_rows.so"


def build(cache_dir: Path, cxx: str | None = None) -> Path:
    """Compile ``rows.cc`` into ``cache_dir`` (if not there yet); returns the library's path.

    Raises:
      RuntimeError: no compiler, or the compiler failed (its output is in the message).
    """
    target = library_path(cache_dir)
    if target.exists():
        return target
    cxx = cxx or _compiler()
    if not cxx:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "rows.cc"
        src.write_bytes(_source())
        out = Path(tmp) / target.name
        cmd = [cxx, *_FLAGS, "-I", jax.ffi.include_dir(), str(src), "-o", str(out)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise RuntimeError(f"{cxx} could not run: {e}") from None
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip()[-2000:]
            raise RuntimeError(f"{' '.join(cmd)} failed (exit {done.returncode})"
                               + (f":\n{tail}" if tail else ""))
        os.replace(out, target)  # atomic: a concurrent build just replaces it with the same
    return target


def open_library(cache_dir: Path) -> tuple[ctypes.CDLL, Path]:
    """Build (if needed) and load the library from ``cache_dir``; a cached copy that does
    not load (a full disk, an interrupted copy) is built again once."""
    path = build(cache_dir)
    try:
        return ctypes.CDLL(str(path)), path
    except OSError:
        path.unlink(missing_ok=True)
        path = build(cache_dir)
        return ctypes.CDLL(str(path)), path


def _load() -> None:
    global _registered
    if env.native_disabled():
        _state.update(ok=False, why=f"{env.NATIVE}=0")
        return
    if _registered is not None:  # XLA keeps the first handler for the process's lifetime
        _state.update(ok=True, why="")
        return
    started = time.perf_counter()
    try:
        lib, path = open_library(env.cache_dir())
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(getattr(lib, _SYMBOL)), platform="cpu")
    except (RuntimeError, OSError, AttributeError) as e:
        _state.update(ok=False, why=str(e))
        log.warning("row_sparse: the native row write-back is unavailable, using XLA's "
                    "scatter (same results, slower row_sparse steps on CPU): %s", e)
        return
    _registered = (lib, path)
    _state.update(ok=True, why="")
    log.debug("native row write-back: %s (%.1f s)", path, time.perf_counter() - started)


def available() -> bool:
    """Whether the native write-back is built and registered (builds it on the first call)."""
    with _lock:
        if "ok" not in _state:
            _load()
        return bool(_state["ok"])


def describe() -> str:
    """One line for logs and benchmarks: which row write-back CPU steps use, and why."""
    if available():
        return f"native ({_registered[1]})"
    return f"XLA scatter ({_state['why']})"


def _xla_set_rows(table: jax.Array, idx: jax.Array, rows: jax.Array) -> jax.Array:
    return jnp.asarray(table).at[idx].set(rows, mode="drop")


def _ffi_set_rows(table: jax.Array, idx: jax.Array, rows: jax.Array) -> jax.Array:
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(table.shape, table.dtype),
                            input_output_aliases={0: 0})
    return call(table, idx, rows)


def set_rows(table: jax.Array, idx: jax.Array, rows: jax.Array, *, native: bool = True) -> jax.Array:
    """``table.at[idx].set(rows, mode="drop")``: negative ids count from the end, ids still
    outside [0, V) are skipped.

    Args:
      table: (V, D) array of any dtype.
      idx: int32 (N,) row ids, distinct among those in range (as the lazy update's are;
        with repeats, which write wins is unspecified, as for XLA's scatter).
      rows: (N, D), table's dtype.
      native: False forces XLA's scatter (for comparisons).
    """
    if (not native or table.ndim != 2 or rows.shape != (idx.shape[0], table.shape[1])
            or idx.ndim != 1 or rows.dtype != table.dtype or not available()):
        return _xla_set_rows(table, idx, rows)
    return jax.lax.platform_dependent(table, idx.astype(jnp.int32), rows,
                                      cpu=_ffi_set_rows, default=_xla_set_rows)
