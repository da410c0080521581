"""Run every benchmark with modest sizes and print one summary (``./just bench``).

Each bench script runs in its own process (so one's threads and memory never slow the
next) with ``--quick`` unless ``--full`` is given, writes its JSON next to the others,
and the numbers that matter are collected into a table at the end. Results for
benchmarks/RESULTS.md come from the full runs named there, on a quiet machine.

    python benchmarks/run_all.py [--full] [--only train,embed,server,scaling] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402
BENCHES = ("train", "embed", "server", "scaling")


fmt = common.fmt_rate


def _extras(result: dict) -> str:
    """The ratio to torch, then whichever reference figures the result has."""
    parts = [f"{result['ratio_vs_torch']:.2f}x torch" if "ratio_vs_torch" in result
             else "no torch"]
    if "sagemaker_k80_records_per_second" in result:
        parts.append(f"SageMaker K80 ~{fmt(result['sagemaker_k80_records_per_second'])}")
    if "fraction_of_bandwidth_limit" in result:
        parts.append(f"{result['fraction_of_bandwidth_limit']:.0%} of bandwidth limit")
    if "fraction_of_device_bandwidth" in result:
        parts.append(f"{result['fraction_of_device_bandwidth']:.1%} of device bandwidth")
    return ", ".join(parts)


def summarize(name: str, doc: dict) -> list[str]:
    """One line per result of a bench script's JSON (``name``: train, embed, server,
    scaling); also used by gpu_check.sh."""
    r = doc["results"]
    lines = []
    if name == "train":
        for job in r:
            lines.append(f"train   {job['job']:<44} {fmt(job['records_per_second']['o2v-jax']):>9} "
                         f"records/s  ({_extras(job)})")
    elif name == "embed":
        for net in r["networks"]:
            lines.append(f"embed   {net['network']:<44} {fmt(net['sequences_per_second']['o2v-jax']):>9} "
                         f"seq/s      ({_extras(net)})")
    elif name == "server":
        b, c = r["bulk"], r["concurrent"]
        lines.append(f"server  1,000-record embedding requests over HTTP   "
                     f"{fmt(b['records_per_second']['http']):>9} records/s  "
                     f"({b['overhead_vs_embed']:+.0%} vs embed(), {b['overhead_vs_respond']:+.0%} "
                     f"vs in-process respond(); Accept .npy {b['overhead_npy_vs_embed']:+.0%} "
                     f"vs embed())")
        lines.append(f"server  the same, .npz request and .npy response       "
                     f"{fmt(b['records_per_second']['http, .npz in, .npy out']):>9} records/s  "
                     f"({b['overhead_npz_vs_embed']:+.0%} vs embed() from lists, "
                     f"{b['overhead_npz_vs_embed_array']:+.0%} vs embed() from the array)")
        lines.append(f"server  1-record requests, {c['clients']} clients{'':<22} "
                     f"{fmt(c['requests_per_second']):>9} req/s      "
                     f"(p50 {c['latency_ms']['p50']:.1f} ms, p99 {c['latency_ms']['p99']:.1f} ms)")
    elif name == "scaling":
        for factor, rows in r["sweeps"].items():
            pts = ", ".join(f"{row[factor]:,}: {fmt(row['records_per_second'])}" for row in rows)
            lines.append(f"scaling records/s by {factor}: {pts}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="the scripts' default sizes, not --quick")
    ap.add_argument("--only", default=",".join(BENCHES), help=f"comma list from {BENCHES}")
    ap.add_argument("--out", type=Path, help="keep the JSON results here (default: a temp dir)")
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = set(names) - set(BENCHES)
    if unknown:
        ap.error(f"unknown benchmarks {sorted(unknown)}; choose from {BENCHES}")
    if "server" in names and not (HERE.parent / "o2v_jax" / "http.py").exists():
        print("o2v_jax/http.py does not exist yet: skipping bench_server")
        names.remove("server")
    out = args.out or Path(tempfile.mkdtemp(prefix="o2v-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; "
          f"results in {out}", flush=True)
    failed, summary = [], []
    for name in names:
        path = out / f"bench_{name}.json"
        cmd = [sys.executable, str(HERE / f"bench_{name}.py"), "--json", str(path)]
        if not args.full:
            cmd.append("--quick")
        print(f"\n##### {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, cwd=HERE.parent)
        print(f"##### bench_{name}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
        if rc != 0 or not path.exists():
            failed.append(name)
            continue
        summary += summarize(name, json.loads(path.read_text()))
    print(f"\n===== summary ({'full' if args.full else 'quick'} sizes; load average now "
          f"{os.getloadavg()[0]:.2f}) =====")
    for line in summary:
        print("  " + line)
    if failed:
        print(f"  FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
