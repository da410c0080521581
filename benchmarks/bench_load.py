"""How fast read_channel loads a big JSON Lines channel, and how much memory it takes.

Writes N records of two 50-token sequences (default 1,000,000; ids 1000..9999, written
as ``json.dumps`` would, ``{"label": 1, "in0": [5205, 6116, ...], "in1": [...]}``) to a
temporary file or ``--path``, then times :func:`o2v_jax.data.read_channel` on it and
prints seconds, records/s and peak RSS. The baseline, on the first ``--baseline``
records in the same run, is the obvious reader: ``json.loads`` per line, then
``Ragged.from_lists``.

    python benchmarks/bench_load.py [--records 1000000] [--path FILE] [--keep]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SEQ_LEN = 50
VOCAB = 10_000


def generate(path: Path, records: int, seed: int = 0, chunk: int = 50_000) -> None:
    """Write ``records`` lines fast: every id has 4 digits, so each line is one fixed layout."""
    rng = np.random.default_rng(seed)
    digits = np.array([list(str(i).encode()) for i in range(1000, VOCAB)], np.uint8)  # (9000, 4)

    def ascii_(text: str, m: int) -> np.ndarray:  # the same text on m rows: uint8 (m, len)
        return np.broadcast_to(np.frombuffer(text.encode(), np.uint8), (m, len(text)))

    with open(path, "wb") as f:
        for start in range(0, records, chunk):
            m = min(chunk, records - start)
            parts = [ascii_('{"label": ', m), (48 + rng.integers(0, 2, (m, 1))).astype(np.uint8)]
            for name, tail in (("in0", ", "), ("in1", "")):
                cells = np.empty((m, SEQ_LEN, 6), np.uint8)  # "dddd, " per token
                cells[:, :, :4] = digits[rng.integers(0, len(digits), (m, SEQ_LEN))]
                cells[:, :, 4:] = np.frombuffer(b", ", np.uint8)
                parts += [ascii_(f', "{name}": [', m), cells.reshape(m, -1)[:, :-2], ascii_("]", m)]
            parts.append(ascii_("}\n", m))
            f.write(np.concatenate(parts, axis=1).tobytes())


def naive_read(path: Path, limit: int):
    """The baseline: json.loads per line into lists, then flat arrays."""
    from o2v_jax.ragged import Ragged

    with open(path, "rb") as f:
        rows = [json.loads(line) for line in itertools.islice(f, limit)]
    return (Ragged.from_lists([r["in0"] for r in rows]),
            Ragged.from_lists([r["in1"] for r in rows]),
            np.array([r["label"] for r in rows], np.float32))


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--path", type=Path,
                        help="use (or create) this file instead of a temp file")
    parser.add_argument("--keep", action="store_true", help="keep the generated temp file")
    parser.add_argument("--baseline", type=int, default=100_000,
                        help="records for the json.loads baseline (0 = skip)")
    parser.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate_only:
        generate(args.path, args.records)
        return

    from o2v_jax.config import from_hyperparameters
    from o2v_jax.data import read_channel

    tmp = None
    path = args.path
    if path is None:
        tmp = tempfile.mkdtemp(prefix="o2v-bench-")
        path = Path(tmp) / "train.jsonl"
    if not path.exists():
        # A child process writes the file, so its buffers never count in our peak RSS.
        t = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--generate-only", "--path", str(path),
                        "--records", str(args.records)], check=True)
        print(f"generated {args.records:,} records ({path.stat().st_size / 2**20:,.0f} MiB) "
              f"in {time.perf_counter() - t:.1f} s: {path}")
    config = from_hyperparameters({"enc0_max_seq_len": SEQ_LEN, "enc0_vocab_size": VOCAB,
                                   "enc0_network": "pooled_embedding", "enc_dim": 16})
    before = rss_mib()
    t = time.perf_counter()
    data = read_channel(path, config)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    arrays = sum(a.nbytes for a in (data.in0.tokens, data.in0.offsets, data.in1.tokens,
                                    data.in1.offsets, data.labels)) / 2**20
    n = len(data)
    print(f"read_channel: {n:,} records in {seconds:.2f} s = {n / seconds:,.0f} records/s "
          f"({path.stat().st_size / 2**20 / seconds:,.0f} MiB/s)")
    print(f"memory: peak RSS {peak:,.0f} MiB (RSS before reading {before:,.0f} MiB; "
          f"result arrays {arrays:,.0f} MiB)")
    if args.baseline:
        limit = min(args.baseline, n)
        del data
        t = time.perf_counter()
        naive_read(path, limit)
        base = time.perf_counter() - t
        ratio = (n / seconds) / (limit / base)
        print(f"baseline json.loads + from_lists: {limit:,} records in {base:.2f} s = "
              f"{limit / base:,.0f} records/s; read_channel / baseline records/s = {ratio:.1f}x")
    if tmp is not None and args.keep:
        print(f"kept {path}")
    elif tmp is not None:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
