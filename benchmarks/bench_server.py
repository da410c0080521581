"""HTTP serving throughput of ``o2v serve`` on loopback, against in-process ``embed()``.

The server runs as its own process (``python -m o2v_jax.cli serve``, 127.0.0.1, a free
port) on a model with random parameters (bench_embed's pooled_embedding model: vocab
50,000, dim 256, max_seq_len 64); it compiles its buckets before /ping says 200.

(a) Bulk: requests of 1,000 embedding records (``{"instances": [{"in0": [...]}, ...]}``,
    lengths uniform in 4..64) sent one at a time over a keep-alive connection; records/s
    against ``Predictor.embed`` on the same 1,000 lists in this process (interleaved,
    medians). The HTTP side includes JSON decoding, the JSON response of 1,000 x 256
    floats and its transfer; the in-process side is the model alone. Also timed: the same
    requests with ``Accept: application/x-npy`` (a .npy body: o2v-jax's extension to
    SageMaker's JSON types, docs/inference.md), and the same ids as an
    ``application/x-npz`` request (a 0-padded int32 array, our other extension) answered
    as .npy, against ``embed()`` from lists and from that same array.
(b) Small: single-record requests from 16 concurrent clients (threads with their own
    keep-alive ``http.client`` connection; bounded count per client), requests/s and
    p50/p99 latency; with ``--wrk`` also wrk (``apt-get install wrk``) for a fixed time.
(c) ``--workers-compare``: ``o2v serve --workers 1`` against ``--workers 2`` (issue 20),
    servers started and measured in turn (1, 2, 1, 2, ...; a fresh compilation cache
    per ``--workers 2`` server). Each answers 1,000-record JSON embedding requests from 4
    concurrent keep-alive clients, then 1-record requests from 16, for a fixed time;
    requests/s, p50/p99, requests per worker (from the access log), RSS per process
    (/proc) and warm-up seconds per worker. The load generator is wrk when installed,
    else Python threads in this process; either way a process of its own, apart from
    the server's.

    python benchmarks/bench_server.py [--quick] [--json out.json] [--wrk]
    python benchmarks/bench_server.py --workers-compare [--rounds 3] [--seconds 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import collections
import http.client
import io
import json
import os
import re
import shutil
import statistics
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

import common  # noqa: E402
import synthetic  # noqa: E402
from bench_embed import MAX_LEN, VOCAB, build_model  # noqa: E402

HOST = "127.0.0.1"  # loopback only


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class ServerProcess:
    """``o2v serve`` in a child process; ``stop()`` sends SIGTERM (a clean drain)."""

    def __init__(self, model_dir: Path, port: int, log_path: Path, flags: tuple[str, ...] = ()):
        self.port = port
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "o2v_jax.cli", "serve", "--model-dir", str(model_dir),
             "--host", HOST, "--port", str(port), *flags],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=HERE.parent)

    def wait_ready(self, timeout: float = 600.0) -> float:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise SystemExit(f"bench_server: the server exited ({self.proc.returncode}); "
                                 f"see {self.log.name}")
            try:
                conn = http.client.HTTPConnection(HOST, self.port, timeout=2)
                conn.request("GET", "/ping")
                status = conn.getresponse().status
                conn.close()
                if status == 200:
                    return time.perf_counter() - t0
            except OSError:
                pass
            time.sleep(0.2)
        raise SystemExit("bench_server: the server did not become ready in time")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def post(conn: http.client.HTTPConnection, body: bytes, accept: str = "application/json",
         content_type: str = "application/json") -> bytes:
    conn.request("POST", "/invocations", body=body,
                 headers={"Content-Type": content_type, "Accept": accept})
    response = conn.getresponse()
    data = response.read()
    if response.status != 200:
        raise SystemExit(f"bench_server: HTTP {response.status}: {data[:200]!r}")
    return data


def body_of(seqs: list[list[int]]) -> bytes:
    return json.dumps({"instances": [{"in0": s} for s in seqs]}).encode()


def padded(seqs: list[list[int]]) -> np.ndarray:
    """The sequences as one 0-padded int32 (N, max length) array."""
    out = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s
    return out


def npz_of(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, in0=arr)
    return buf.getvalue()


def bulk(port: int, predictor, seqs: list[list[int]], repeat: int) -> dict:
    body = body_of(seqs)
    conn = http.client.HTTPConnection(HOST, port, timeout=120)
    got = np.array([p["embeddings"] for p in json.loads(post(conn, body))["predictions"]],
                   np.float32)
    want = predictor.embed(seqs)
    from o2v_jax import media, wire

    npy = np.load(io.BytesIO(post(conn, body, media.NPY)), allow_pickle=False)
    arr = padded(seqs)
    npz = npz_of(arr)
    binary = np.load(io.BytesIO(post(conn, npz, media.NPY, media.NPZ)), allow_pickle=False)
    err = max(float(np.abs(x - want).max()) for x in (got, npy, binary))
    if not err < 1e-5:
        raise SystemExit(f"bench_server: HTTP and in-process embeddings differ by {err}")

    from o2v_jax.app import respond

    values = predictor.embed(seqs)
    times = common.interleaved({
        "http": lambda: post(conn, body),
        "http, Accept .npy": lambda: post(conn, body, media.NPY),
        "http, .npz in, .npy out": lambda: post(conn, npz, media.NPY, media.NPZ),
        "in-process embed()": lambda: predictor.embed(seqs),
        "in-process embed(array)": lambda: predictor.embed(arr),
        "in-process respond()": lambda: respond(body, "application/json", "application/json", predictor),
        "  of which decode": lambda: wire.decode_request(
            body, "application/json", vocab_sizes=predictor.vocab_sizes,
            max_seq_lens=predictor.max_seq_lens),
        "  of which encode": lambda: wire.encode_response("embeddings", values, "application/json"),
    }, repeat)
    conn.close()
    n = len(seqs)
    med = {k: common.median(v) for k, v in times.items()}
    rates = {k: n / v for k, v in med.items()}
    overhead = med["http"] / med["in-process embed()"] - 1.0
    overhead_npy = med["http, Accept .npy"] / med["in-process embed()"] - 1.0
    overhead_npz = med["http, .npz in, .npy out"] / med["in-process embed()"] - 1.0
    overhead_npz_array = med["http, .npz in, .npy out"] / med["in-process embed(array)"] - 1.0
    transport = med["http"] / med["in-process respond()"] - 1.0
    response_bytes = len(wire.encode_response("embeddings", values, "application/json"))
    print(f"\n== (a) {n:,}-record embedding requests ({len(body) / 1e6:.2f} MB request, "
          f"{response_bytes / 1e6:.2f} MB JSON response); max |HTTP - in-process| = {err:.1e}")
    for k, v in med.items():
        print(f"  {k:24s} {v * 1e3:8.1f} ms/request  {common.fmt_rate(n / v):>9} records/s")
    print(f"  HTTP vs in-process embed(): {overhead:+.0%} time per request (records/s through "
          f"HTTP = {rates['http'] / rates['in-process embed()']:.2f}x); vs in-process respond() "
          f"(same JSON decode/encode, no sockets): {transport:+.0%}")
    print(f"  HTTP with Accept: {media.NPY} (o2v-jax's extension, not SageMaker's) vs "
          f"in-process embed(): {overhead_npy:+.0%}")
    print(f"  HTTP with a {media.NPZ} request ({len(npz) / 1e6:.2f} MB, the same ids 0-padded) and "
          f"{media.NPY} response (o2v-jax's extensions): {overhead_npz:+.0%} vs in-process embed() "
          f"from lists, {overhead_npz_array:+.0%} vs embed() from the same padded array")
    return {"records_per_request": n, "request_bytes": len(body), "response_bytes": response_bytes,
            "seconds": med, "records_per_second": rates, "overhead_vs_embed": overhead,
            "overhead_npy_vs_embed": overhead_npy, "overhead_npz_vs_embed": overhead_npz,
            "overhead_npz_vs_embed_array": overhead_npz_array,
            "overhead_vs_respond": transport, "max_abs_diff": err}


def concurrent(port: int, seqs: list[list[int]], clients: int, per_client: int) -> dict:
    """``clients`` threads, each with its own keep-alive connection, ``per_client`` requests."""
    bodies = [body_of([s]) for s in seqs]
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []
    start = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        try:
            conn = http.client.HTTPConnection(HOST, port, timeout=60)
            post(conn, bodies[i])  # connect and warm before the clock
            start.wait()
            for k in range(per_client):
                t = time.perf_counter()
                post(conn, bodies[(i * per_client + k) % len(bodies)])
                latencies[i].append(time.perf_counter() - t)
            conn.close()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"bench_server: client failed: {errors[0]!r}")
    lat = np.concatenate([np.asarray(x) for x in latencies]) * 1e3
    total = lat.size
    out = {"clients": clients, "requests": total, "seconds": wall, "requests_per_second": total / wall,
           "latency_ms": {"p50": float(np.percentile(lat, 50)), "p90": float(np.percentile(lat, 90)),
                          "p99": float(np.percentile(lat, 99)), "max": float(lat.max())}}
    print(f"\n== (b) single-record requests, {clients} concurrent Python clients "
          f"(http.client, keep-alive), {total:,} requests")
    print(f"  {common.fmt_rate(total / wall)} requests/s; latency p50 {out['latency_ms']['p50']:.1f} ms, "
          f"p90 {out['latency_ms']['p90']:.1f} ms, p99 {out['latency_ms']['p99']:.1f} ms")
    return out


def run_wrk(port: int, seq: list[int], clients: int, seconds: int) -> dict | None:
    wrk = shutil.which("wrk")
    if wrk is None:
        print("  wrk is not installed (apt-get install -y wrk); skipped")
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                f"wrk.body = {json.dumps(body_of([seq]).decode())}\n")
        script = f.name
    try:
        out = subprocess.run([wrk, "-t2", f"-c{clients}", f"-d{seconds}s", "--latency", "-s", script,
                              f"http://{HOST}:{port}/invocations"],
                             capture_output=True, text=True, timeout=seconds + 60).stdout
    finally:
        os.unlink(script)
    print(f"\n== (b') wrk -t2 -c{clients} -d{seconds}s, single-record requests\n"
          + "\n".join("  " + line for line in out.strip().splitlines()))
    parsed = {"raw": out}
    for line in out.splitlines():
        parts = line.split()
        if line.startswith("Requests/sec:"):
            parsed["requests_per_second"] = float(parts[1])
        elif len(parts) == 2 and parts[0] in ("50%", "99%"):
            parsed[f"p{parts[0][:-1]}"] = parts[1]
    if "Non-2xx" in out or "Socket errors" in out:
        print("  (wrk saw errors: see above)")
    return parsed


# --------------------------------------------------------------------------- (c) workers


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` in MiB (/proc/PID/status VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of ``pids`` so far (/proc/PID/stat), their threads included."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / os.sysconf("SC_CLK_TCK")


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def wrk_load(port: int, body_path: Path, clients: int, seconds: float) -> dict:
    """wrk: ``clients`` keep-alive connections POSTing ``body_path`` for ``seconds``."""
    script = body_path.with_suffix(".lua")
    script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                      f'local f = io.open("{body_path}", "rb")\nwrk.body = f:read("*a")\nf:close()\n')
    out = subprocess.run(["wrk", f"-t{min(2, clients)}", f"-c{clients}", f"-d{seconds:g}s", "--timeout", "30s",
                          "--latency", "-s", str(script), f"http://{HOST}:{port}/invocations"],
                         capture_output=True, text=True, timeout=seconds + 120).stdout
    if "Non-2xx" in out or re.search(r"Socket errors: .*[1-9]", out):
        raise SystemExit(f"bench_server: wrk saw errors:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    pct = {m.group(1): _ms(m.group(2)) for m in re.finditer(r"^\s+(50|99)%\s+(\S+)$", out, re.M)}
    return {"requests_per_second": rps, "p50_ms": pct["50"], "p99_ms": pct["99"]}


def python_load(port: int, body: bytes, clients: int, seconds: float) -> dict:
    """Threads in this process, each with a keep-alive connection, for ``seconds``."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    start, stop_at = threading.Barrier(clients + 1), [0.0]

    def client(i: int) -> None:
        conn = http.client.HTTPConnection(HOST, port, timeout=60)
        post(conn, body)
        start.wait()
        while (t := time.perf_counter()) < stop_at[0]:
            post(conn, body)
            latencies[i].append(time.perf_counter() - t)
        conn.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + 3600
    start.wait()
    t0 = time.perf_counter()
    stop_at[0] = t0 + seconds
    for t in threads:
        t.join()
    lat = np.concatenate([np.asarray(x) for x in latencies]) * 1e3
    return {"requests_per_second": lat.size / (time.perf_counter() - t0),
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}


def one_server(model_dir: Path, tmp: Path, workers: int, run: int, bodies: dict, seconds: float,
               tool: str) -> dict:
    """Start ``o2v serve --workers N``, load it with each body in turn, stop it."""
    flags = ("--workers", str(workers))
    if workers > 1:
        flags += ("--compile-cache-dir", str(tmp / f"cache-{run}"))  # fresh: the first worker compiles
    log_path = tmp / f"server-{run}-w{workers}.log"
    server = ServerProcess(model_dir, free_port(), log_path, flags)
    try:
        t0 = time.perf_counter()
        while len(re.findall(r"worker \d+ ready after|model ready after", log_path.read_text())) < workers:
            if server.proc.poll() is not None or time.perf_counter() - t0 > 900:
                raise SystemExit(f"bench_server: the server did not start; see {log_path}")
            time.sleep(0.2)
        text = log_path.read_text()
        pids = [int(x) for x in re.findall(r"started worker (\d+)", text)] or [server.proc.pid]
        warmups = [float(x) for x in re.findall(r"Warm-up: \d+ executables ready in ([\d.]+) s", text)]
        out: dict = {"workers": workers, "warmup_s": warmups, "load_avg_before": os.getloadavg()[0]}
        everyone = pids + ([server.proc.pid] if workers > 1 else [])
        for name, (clients, body, body_path) in bodies.items():
            before = len(log_path.read_text())
            cpu0, t0 = cpu_seconds(everyone), time.perf_counter()
            if tool == "wrk":
                out[name] = wrk_load(server.port, body_path, clients, seconds)
            else:
                out[name] = python_load(server.port, body, clients, seconds)
            cpu, wall = cpu_seconds(everyone) - cpu0, time.perf_counter() - t0
            # The server's processes only: how many cores it got, and what a request cost.
            out[name]["server_cores"] = cpu / wall
            out[name]["server_cpu_ms_per_request"] = cpu * 1e3 / (out[name]["requests_per_second"] * wall)
            served = collections.Counter(re.findall(r"worker (\d+): \S+ \"POST /invocations\" 200",
                                                    log_path.read_text()[before:]))
            out[name]["requests_per_worker"] = sorted(served.values(), reverse=True)
        out["rss_mb"] = {pid: round(rss_mb(pid), 1) for pid in pids}
        if workers > 1:
            out["rss_mb_supervisor"] = round(rss_mb(server.proc.pid), 1)
        out["load_avg_after"] = os.getloadavg()[0]
        return out
    finally:
        server.stop()


def compare_workers(model_dir: Path, tmp: Path, rounds: int, seconds: float) -> dict:
    tool = "wrk" if shutil.which("wrk") else "python"
    big = body_of(synthetic.uniform_lengths(1000, 4, MAX_LEN, VOCAB, seed=2))
    small = body_of(synthetic.uniform_lengths(1, 4, MAX_LEN, VOCAB, seed=3))
    bodies = {}
    for name, clients, body in [("json_1000_records_4_clients", 4, big), ("json_1_record_16_clients", 16, small)]:
        (tmp / f"{name}.json").write_bytes(body)
        bodies[name] = (clients, body, tmp / f"{name}.json")
    print(f"load generator: {tool}; {seconds:g} s per measurement; {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    runs = []
    for r in range(rounds):
        for workers in (1, 2):
            run = one_server(model_dir, tmp, workers, r, bodies, seconds, tool)
            runs.append(run)
            cells = "; ".join(f"{k.split('_c')[0]}: {run[k]['requests_per_second']:.1f} req/s p50 "
                              f"{run[k]['p50_ms']:.1f} p99 {run[k]['p99_ms']:.1f} ms per worker "
                              f"{run[k]['requests_per_worker']} server cores "
                              f"{run[k]['server_cores']:.2f}, CPU {run[k]['server_cpu_ms_per_request']:.2f} "
                              f"ms/request" for k in bodies)
            print(f"  round {r + 1} --workers {workers}: {cells}; RSS MiB {list(run['rss_mb'].values())}; "
                  f"warm-up s {run['warmup_s']}; load avg {run['load_avg_before']:.2f}->"
                  f"{run['load_avg_after']:.2f}", flush=True)
    summary = {}
    for name in bodies:
        med = {w: statistics.median(x[name]["requests_per_second"] for x in runs if x["workers"] == w)
               for w in (1, 2)}
        summary[name] = {"median_rps_workers_1": med[1], "median_rps_workers_2": med[2],
                         "ratio": med[2] / med[1]}
    print("\nsummary (medians over rounds): " + "; ".join(
        f"{k}: {v['median_rps_workers_1']:.1f} -> {v['median_rps_workers_2']:.1f} req/s "
        f"({v['ratio']:.2f}x)" for k, v in summary.items()))
    return {"tool": tool, "seconds": seconds, "runs": runs, "summary": summary}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(ap)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--wrk", action="store_true", help="also run wrk if installed")
    ap.add_argument("--workers-compare", action="store_true",
                    help="(c) only: --workers 1 against --workers 2, interleaved")
    ap.add_argument("--rounds", type=int, default=3, help="(c): servers of each kind, interleaved")
    ap.add_argument("--seconds", type=float, default=10.0, help="(c): seconds per measurement")
    args = ap.parse_args(argv)
    if args.workers_compare:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = Path(tmp) / "model"
            build_model(model_dir, "pooled_embedding")
            rounds, seconds = (1, 3.0) if args.quick else (args.rounds, args.seconds)
            results = compare_workers(model_dir, Path(tmp), rounds, seconds)
        common.write_json(args.json, "bench_server_workers", results)
        return
    repeat = args.repeat or (3 if args.quick else 9)
    per_client = 20 if args.quick else 150

    import o2v_jax

    seqs = synthetic.uniform_lengths(1000, 4, MAX_LEN, VOCAB, seed=2)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        build_model(model_dir, "pooled_embedding")
        server = ServerProcess(model_dir, free_port(), Path(tmp) / "server.log")
        try:
            predictor = o2v_jax.load(model_dir)
            predictor.warmup(mode="embedding")
            ready = server.wait_ready()
            print(f"server ready on {HOST}:{server.port} after {ready:.1f} s (model load + "
                  f"warm-up in its own process)", flush=True)
            results = {"bulk": bulk(server.port, predictor, seqs, repeat)}
            results["concurrent"] = concurrent(server.port, seqs, args.clients, per_client)
            if args.wrk:
                results["wrk"] = run_wrk(server.port, seqs[0], args.clients, 5 if args.quick else 15)
        finally:
            server.stop()
    common.write_json(args.json, "bench_server", results)
    b, c = results["bulk"], results["concurrent"]
    print("\nsummary:")
    print(f"  (a) 1,000-record requests: {common.fmt_rate(b['records_per_second']['http'])} records/s "
          f"over HTTP vs {common.fmt_rate(b['records_per_second']['in-process embed()'])} in-process "
          f"embed() (overhead {b['overhead_vs_embed']:+.0%}; {b['overhead_vs_respond']:+.0%} vs "
          f"in-process respond() with the same JSON work)")
    print(f"      with .npz in and .npy out (o2v-jax's extensions): "
          f"{common.fmt_rate(b['records_per_second']['http, .npz in, .npy out'])} records/s, overhead "
          f"{b['overhead_npz_vs_embed']:+.0%} vs embed() from lists, "
          f"{b['overhead_npz_vs_embed_array']:+.0%} vs embed() from the padded array (target <= 30%)")
    print(f"  (b) {c['clients']} clients x 1 record: {common.fmt_rate(c['requests_per_second'])} requests/s, "
          f"p50 {c['latency_ms']['p50']:.1f} ms, p99 {c['latency_ms']['p99']:.1f} ms")


if __name__ == "__main__":
    main()
