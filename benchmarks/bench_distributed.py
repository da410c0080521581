"""Data-parallel training (o2v_jax.mesh, o2v_jax.sharded): what a row_sparse step moves
between devices as V grows, and what a step costs on 1, 2 and 4 devices of this machine.

1. **Bytes per step against V**, read from the compiled program (static analysis: the
   step is compiled for abstract inputs, nothing is allocated or run, so V = 10^7 costs
   a compile only). The Wikipedia job (spec §7.3: D 300, B 512, L 50 a side, tied
   table, hadamard, 2 x 512 MLP, Adam) on a 4-device mesh, V = 10^4 ... 10^7: the sum
   of the result sizes of every collective in the step (all-reduce, all-gather,
   reduce-scatter, collective-permute, all-to-all; ``sharded.collectives``). Baseline,
   compiled the same way: the one-device row_sparse step (``row_sparse.LazyUpdate``)
   handed the same row-sharded table and Adam state under plain GSPMD; its row
   write-back (a custom call) makes XLA all-gather the table and both moments every
   step: the reason the mesh step runs the update per shard.
2. **Step time at 1, 2 and 4 devices**: the Wikipedia job's shapes (V 267,522, B 512)
   on full batches of length-50 Zipf sequences (``bench_scaling.fixed_length_pairs``:
   one bucket, no fill rows, so every step is a whole Wikipedia step), the one-device
   path at 1 device (with its CPU gradient plan) and the mesh steps at 2 and 4, in
   interleaved rounds over the same batches; medians.
   The devices are ``JAX_NUM_CPU_DEVICES=4`` slices of this machine's CPU: on a 2-core
   machine shared with other jobs this measures the mesh's overhead, not a speed-up.

    python benchmarks/bench_distributed.py [--quick] [--json out.json] [--repeat N]
        [--skip-bytes] [--skip-time]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "4")  # before JAX starts: 4 CPU devices

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402

import common  # noqa: E402
import synthetic  # noqa: E402
from bench_scaling import fixed_length_pairs  # noqa: E402
from bench_train import WIKI_HP  # noqa: E402


def wiki_config(vocab: int, batch: int | None = None):
    """The Wikipedia job with ``vocab`` rows. SageMaker caps enc0_vocab_size at 3,000,000;
    past that (the compile-only byte count) the validated config's V is replaced."""
    import dataclasses

    from o2v_jax.config import from_hyperparameters

    hp = {**WIKI_HP, "enc0_vocab_size": str(min(vocab, 3_000_000))}
    if batch:
        hp["mini_batch_size"] = str(batch)
    config = from_hyperparameters(hp)
    if vocab > 3_000_000:
        enc = dataclasses.replace(config.enc0, vocab_size=vocab)
        config = dataclasses.replace(config, enc0=enc, enc1=enc)
    return config


def step_bytes(vocab: int, cap: int) -> dict[str, int]:
    """Collective bytes of one compiled row_sparse step on a 4-device mesh: the mesh
    step's, and the one-device step's under GSPMD (the baseline)."""
    from o2v_jax import mesh, sharded
    from o2v_jax.buckets import Batch
    from o2v_jax.model import abstract_model
    from o2v_jax.row_sparse import PlannedBatch, TableRows
    from o2v_jax.training import build_steps

    config = wiki_config(vocab)
    placement = mesh.for_training(config, 4)
    graphdef, abstract = abstract_model(config, sharded.MODEL_LAYOUT)
    steps = sharded.MeshSteps(graphdef, config, {}, placement=placement)
    state, mb, root = sharded.abstract_inputs(config, placement, abstract, lengths=(50, 50), cap=cap)
    t0 = time.perf_counter()
    ours = sharded.collectives(steps.lower(state, mb, root).compile().as_text())
    seconds = time.perf_counter() - t0
    # The one-device step, fed the same layout: its planned batch carries the ids as
    # they are (pooled tables read by id) and, remapped, for the gradient.
    one = build_steps(abstract_model(config, "cpu")[0], config, {}, layout="cpu").train_step.step
    planned = PlannedBatch(
        Batch(mb.batch.in0, mb.batch.in1, mb.batch.labels, mb.batch.weights),
        {"embed0": TableRows(mb.rows["embed0"], mb.count["embed0"],
                             (mb.batch.in0, mb.batch.in1), None)})
    base = sharded.collectives(one.lower(state, planned, root).compile().as_text())
    return {"vocab": vocab, "cap": cap, "mesh_bytes": sum(c.bytes for c in ours),
            "mesh_ops": sorted({c.op for c in ours}), "mesh_count": len(ours),
            "mesh_in_loops": sum(c.in_loop for c in ours),
            "baseline_bytes": sum(c.bytes for c in base), "baseline_ops": sorted({c.op for c in base}),
            "baseline_in_loops": sum(c.in_loop for c in base), "compile_seconds": round(seconds, 1)}


def step_times(batch: int, batches: int, repeat: int) -> dict[str, dict]:
    """Records/s of the one-device path (1 device) and the mesh steps (2, 4 devices)."""
    import jax

    from o2v_jax import mesh, sharded
    from o2v_jax.buckets import batches as make_batches
    from o2v_jax.model import abstract_model
    from o2v_jax.training import TrainState, build_steps, init_opt_state, init_params, make_optimizer

    config = wiki_config(synthetic.WIKI_VOCAB, batch)
    data = fixed_length_pairs(batch * batches, 50, synthetic.WIKI_VOCAB)
    host = list(make_batches(data, config, shuffle_seed=0))[:batches]
    assert all(b.weights.all() for b in host), "every batch full: no fill rows"
    real = sum(int(b.weights.sum()) for b in host)
    graphdef, params, keep = init_params(config, 0, (None, None), layout="cpu")
    root = jax.random.key(1)
    runners = {}
    one = build_steps(graphdef, config, keep, layout="cpu")
    runners["1 device (one-device path)"] = [one, one.init_state(jax.tree.map(np.array, params))]
    for n in (2, 4):
        placement = mesh.for_training(config, n)
        placed = placement.place_params(params)
        opt = placement.init_opt(lambda p: init_opt_state(make_optimizer(config), p), placed)
        steps = sharded.MeshSteps(abstract_model(config, sharded.MODEL_LAYOUT)[0], config,
                                  placement.place_keep(keep), placement=placement)
        runners[f"{n} devices (mesh)"] = [steps, TrainState(placed, opt, placement.scalar(0))]

    def run(name):
        steps, state = runners[name]
        for b in host:
            state, sums = steps.train_step(state, b, root)
        jax.block_until_ready((state.params, sums))
        runners[name][1] = state

    times = common.interleaved({name: (lambda name=name: run(name)) for name in runners}, repeat)
    base = common.median(times["1 device (one-device path)"])
    return {name: {"seconds_per_round": common.median(ts), "records_per_second": real / common.median(ts),
                   "ms_per_step": 1000 * common.median(ts) / batches,
                   "vs_one_device": common.median(ts) / base}
            for name, ts in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(ap)
    ap.add_argument("--skip-bytes", action="store_true", help="no bytes-per-step table")
    ap.add_argument("--skip-time", action="store_true", help="no step timing")
    args = ap.parse_args(argv)
    results: dict = {}
    if not args.skip_bytes:
        vocabs = (10_000, 100_000) if args.quick else (10_000, 100_000, 1_000_000, 10_000_000)
        cap = 8192  # rows a Wikipedia batch of 512 reads (Zipf ids): ~6-8k distinct
        print(f"bytes per row_sparse step, 4 devices, Wikipedia job, row cap {cap}:")
        print(f"{'V':>12} {'mesh step':>14} {'ops':>14} {'one-device step under GSPMD':>30}")
        results["bytes"] = []
        for vocab in vocabs:
            r = step_bytes(vocab, cap)
            results["bytes"].append(r)
            print(f"{vocab:>12,} {r['mesh_bytes']:>14,} {'+'.join(r['mesh_ops']):>14} "
                  f"{r['baseline_bytes']:>20,} ({'+'.join(r['baseline_ops'])})", flush=True)
    if not args.skip_time:
        batch, batches = (128, 4) if args.quick else (512, 8)
        repeat = args.repeat or (2 if args.quick else 5)
        print(f"\nstep time, Wikipedia shapes (V 267,522, B {batch}), {batches} batches a round, "
              f"{repeat} rounds, medians (4 CPU devices on {os.cpu_count()} cores):")
        results["time"] = step_times(batch, batches, repeat)
        for name, r in results["time"].items():
            print(f"  {name:<28} {r['ms_per_step']:8.1f} ms/step {common.fmt_rate(r['records_per_second']):>8} "
                  f"records/s  x{r['vs_one_device']:.2f} the one-device time")
    common.write_json(args.json, "distributed", results, layout="cpu")
    return 0


if __name__ == "__main__":
    sys.exit(main())
