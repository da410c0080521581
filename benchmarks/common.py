"""Shared benchmark helpers: interleaved timing, medians, machine facts, JSON output.

Every bench script measures its baseline in the same process, interleaved with the
measured code (A, B, A, B, ...), so load from other processes on a shared machine hits
both sides alike; it reports medians of the repeats and prints the ratio last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """``--quick`` (smoke-run sizes), ``--json PATH`` (machine-readable results), ``--repeat``."""
    ap.add_argument("--quick", action="store_true", help="small sizes for a fast smoke run")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    ap.add_argument("--repeat", type=int, default=None, help="timed repeats per variant")


def add_layout_arg(ap: argparse.ArgumentParser) -> None:
    """``--layout``: force o2v_jax's code shape (o2v_jax.kernels), e.g. to time the CPU
    loops on a GPU as the baseline of the accelerator code; default: from the backend."""
    ap.add_argument("--layout", choices=["auto", "cpu", "accelerator"], default="auto",
                    help="code shape of the bag ops and row_sparse step (default: by backend)")


def layout_from(args: argparse.Namespace) -> str:
    """The layout ``--layout`` asks for ("auto": kernels.default_layout()); the bench
    passes it to the model and the steps it builds."""
    from o2v_jax.kernels import default_layout

    return default_layout() if args.layout == "auto" else args.layout


class CompileCounter:
    """XLA compiles requested in this process since it was made (jax.monitoring's
    backend-compile event): a timed round during which it moved compiled something."""

    def __init__(self) -> None:
        import jax

        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)

    def _on_duration(self, name: str, _secs: float, **_kw) -> None:
        if name == "/jax/core/compile/backend_compile_duration":
            self.count += 1


def interleaved(fns: Mapping[str, Callable[[], Any]], repeat: int,
                warmup: int = 1) -> dict[str, list[float]]:
    """Wall seconds of each callable, ``repeat`` times, in round-robin order.

    Each callable must finish its work before returning (``block_until_ready`` or a
    host copy), otherwise asynchronous dispatch is timed instead of the work.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def machine(layout: str | None = None) -> dict[str, Any]:
    """Facts that belong next to a number: date, CPU count, load, library versions, and
    o2v_jax's code shape (``layout``, else the backend's default)."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
    }
    for mod in ("jax", "numpy", "torch"):
        if mod in sys.modules:
            info[mod] = getattr(sys.modules[mod], "__version__", "?")
    try:
        import jax

        info["jax_backend"] = jax.default_backend()
        from o2v_jax.kernels import default_layout

        info["o2v_layout"] = layout or default_layout()
        info["jax_devices"] = [str(d) for d in jax.devices()]
    except Exception:  # noqa: BLE001 - facts only
        pass
    return info


def write_json(path: str | None, name: str, results: Any, argv: list[str] | None = None,
               layout: str | None = None) -> None:
    """Write ``{"bench": name, "command": ..., "machine": ..., "results": ...}``."""
    if not path:
        return
    doc = {"bench": name, "command": " ".join(argv or sys.argv), "machine": machine(layout),
           "results": results}
    Path(path).write_text(json.dumps(doc, indent=2, default=float) + "\n")


def try_import_torch():
    """torch, or None with a note (it is the optional ``bench`` extra)."""
    try:
        import torch
    except ImportError:
        print("torch is not installed: baselines skipped (pip install -e '.[bench]')",
              file=sys.stderr)
        return None
    return torch


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def pick_threads_by_timing(torch, fn: Callable[[], Any], repeat: int = 3) -> int:
    """Set torch's intra-op threads to the faster of 1 and all cores for ``fn``, timed now.

    On a 2-core machine shared with other jobs torch's OpenMP pool can stall for tens of
    milliseconds on a descheduled thread (MovieLens training steps went from ~4 ms to a
    p90 of ~230 ms with 2 threads), while large kernels gain from 2 threads when the
    cores are free. The baseline gets whichever is faster at the time of the run.
    """
    options = sorted({1, os.cpu_count() or 1})
    best, best_time = options[-1], float("inf")
    for threads in options:
        torch.set_num_threads(threads)
        fn()  # settle
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        if median(times) < best_time:
            best, best_time = threads, median(times)
    torch.set_num_threads(best)
    return best
