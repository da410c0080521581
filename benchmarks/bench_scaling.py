"""How training records/s grows with batch size, sequence length and vocabulary size.

The Wikipedia job of spec §7.3 (pooled_embedding, tied table, dim 300, hadamard, 2x512 relu
MLP, dropout 0.4, adam, row_sparse) around its own point (batch 512, length 50 both sides,
vocab 267,522), one factor at a time. Every sequence has exactly the given length (one
bucket shape per point), token ids are Zipf over the vocabulary, labels random, no
negative sampling; the timed loop is bench_train's (train()'s inner loop, host batching
included), after a warm-up that compiles. Medians of rounds of ~1.5 s. Writes a table
and, with matplotlib, benchmarks/scaling.png.

    python benchmarks/bench_scaling.py [--quick] [--json out.json] [--no-plot]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

import common  # noqa: E402
import synthetic  # noqa: E402
from bench_train import WIKI_HP, JaxLoop  # noqa: E402

BASE = {"batch": 512, "length": 50, "vocab": synthetic.WIKI_VOCAB}
SWEEPS = {"batch": [64, 128, 256, 512, 1024], "length": [10, 25, 50, 100],
          "vocab": [10_000, 50_000, 267_522, 1_000_000]}
QUICK_SWEEPS = {"batch": [128, 512], "length": [10, 50], "vocab": [10_000, 267_522]}


def fixed_length_pairs(n: int, length: int, vocab: int, seed: int = 0):
    from o2v_jax.data import PairData
    from o2v_jax.ragged import Ragged

    rng = np.random.default_rng(seed)
    offsets = np.arange(n + 1, dtype=np.int64) * length

    def side():
        return Ragged(synthetic.zipf_ids(rng, n * length, vocab), offsets.copy())

    return PairData(side(), side(), rng.integers(0, 2, n).astype(np.float32), "synthetic-fixed")


def point(batch: int, length: int, vocab: int, repeat: int, target_s: float) -> float:
    from o2v_jax.config import from_hyperparameters

    config = from_hyperparameters({**WIKI_HP, "mini_batch_size": batch, "enc0_max_seq_len": length,
                                   "enc0_vocab_size": vocab, "negative_sampling_rate": 0})
    data = fixed_length_pairs(max(40 * batch, 20_000), length, vocab)
    loop = JaxLoop(config, data)
    loop.run(3)  # compiles (and the usual row-set sizes)
    t = time.perf_counter()
    loop.run(2)
    per_batch = (time.perf_counter() - t) / 2
    n = max(2, int(target_s / per_batch))
    rates = []
    for _ in range(repeat):
        before = loop.compiled()
        t = time.perf_counter()
        records = loop.run(n)
        if loop.compiled() == before:
            rates.append(records / (time.perf_counter() - t))
    return common.median(rates) if rates else float("nan")


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), dpi=100)
    labels = {"batch": "mini_batch_size", "length": "max_seq_len (both sides)", "vocab": "vocab size"}
    for ax, (factor, rows) in zip(axes, results["sweeps"].items()):
        xs = [r[factor] for r in rows]
        ax.plot(xs, [r["records_per_second"] for r in rows], "o-")
        ax.set_xscale("log")
        ax.set_xlabel(labels[factor])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("train records/s (row_sparse)")
    fig.suptitle("o2v-jax training throughput, Wikipedia job (spec §7.3), one factor at a time "
                 f"around batch {BASE['batch']}, length {BASE['length']}, vocab {BASE['vocab']:,}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(ap)
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    sweeps = QUICK_SWEEPS if args.quick else SWEEPS
    repeat = args.repeat or (2 if args.quick else 3)
    target = 0.5 if args.quick else 1.5
    results = {"base": BASE, "sweeps": {}}
    print(f"train records/s, row_sparse, one factor at a time around {BASE}")
    for factor, values in sweeps.items():
        rows = []
        for value in values:
            p = {**BASE, factor: value}
            rate = point(p["batch"], p["length"], p["vocab"], repeat, target)
            tokens = rate * 2 * p["length"]
            rows.append({**p, "records_per_second": rate, "tokens_per_second": tokens})
            print(f"  {factor:6s} = {value:>9,}: {common.fmt_rate(rate):>8} records/s "
                  f"({common.fmt_rate(tokens):>10} tokens/s)", flush=True)
        results["sweeps"][factor] = rows
    common.write_json(args.json, "bench_scaling", results)
    if not args.no_plot and not args.quick and plot(results, HERE / "scaling.png"):
        print(f"plot: {HERE / 'scaling.png'}")


if __name__ == "__main__":
    main()
