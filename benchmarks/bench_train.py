"""Training throughput (records/s) of the train loop as ``train()`` runs it, against PyTorch.

Two jobs from the spec, on synthetic data of the same shapes (benchmarks/synthetic.py):

* ``movielens`` (spec §7.1): pooled_embedding user/item regression with the demo preset
  o2v_jax/presets/movielens.json (else enc_dim 64, batch 256), 943 users, 1,682 items,
  90,570 records; dense tables.
* ``wikipedia`` (spec §7.3): the document-embedding job: vocab 267,522, dim 300, max_seq_len
  50 both sides, batch 512, tied table, hadamard, 2x512 relu MLP, dropout 0.4, adam 0.01,
  negative_sampling_rate 3; Zipf token ids; ``row_sparse`` and ``dense`` tables.
  SageMaker's published figures (one K80 GPU): ~14,000 records/s row_sparse, ~5,000 dense.

What is timed is ``train()``'s inner loop: an endless stream of epochs (negative sampling
per epoch, then ``buckets.batches`` with a per-epoch shuffle seed: host batching is
included), ``training.staged``, ``train_step`` (which folds its dropout key), the per-batch
metric sums kept; every round of N batches ends with ``block_until_ready`` on the
parameters and sums.
Compiling is excluded: each bucket shape is compiled in the warm-up, and a round during
which anything compiled is thrown away and run again. Records = real rows (fill rows of
a bucket's last batch are not counted), as train()'s throughput line counts them.

The baseline is the same model written plainly in PyTorch (``nn.EmbeddingBag(mode="mean",
padding_idx=0)``, ``sparse=True`` + ``SparseAdam`` for row_sparse, ``Adam`` for the rest;
``sparse=False`` + ``Adam`` for dense; the config's optimizer when it is not adam, e.g.
the MovieLens preset's adagrad), fed the same batches from its own stream, timed in
rounds interleaved with ours. Medians of the rounds; the ratio is printed last.

    python benchmarks/bench_train.py [--job movielens|wikipedia|all]
        [--storage row_sparse|dense|both] [--quick] [--json out.json] [--repeat N]
        [--layout auto|cpu|accelerator]   (code shape: default by JAX backend)
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

import common  # noqa: E402
import synthetic  # noqa: E402

WIKI_HP = {  # spec §7.3, as the notebook sets it
    "enc0_network": "pooled_embedding", "enc1_network": "enc0", "enc0_max_seq_len": "50",
    "enc0_vocab_size": str(synthetic.WIKI_VOCAB), "enc0_token_embedding_dim": "300",
    "enc_dim": "300", "enc0_layers": "auto", "mlp_layers": "2", "mlp_dim": "512",
    "mlp_activation": "relu", "output_layer": "softmax", "num_classes": "2",
    "optimizer": "adam", "learning_rate": "0.01", "mini_batch_size": "512", "epochs": "20",
    "dropout": "0.4", "weight_decay": "0", "bucket_width": "0", "negative_sampling_rate": "3",
    "tied_token_embedding_weight": "true", "comparator_list": "hadamard",
    "token_embedding_storage_type": "row_sparse",
}
MOVIELENS_FALLBACK = {  # used only if the demo preset is missing
    "enc0_network": "pooled_embedding", "enc1_network": "pooled_embedding",
    "enc0_max_seq_len": "1", "enc1_max_seq_len": "1", "enc0_vocab_size": "944",
    "enc1_vocab_size": "1683", "enc0_token_embedding_dim": "64",
    "enc1_token_embedding_dim": "64", "enc_dim": "64", "mlp_layers": "1", "mlp_dim": "128",
    "output_layer": "mean_squared_error", "mini_batch_size": "256",
}
SAGEMAKER_K80 = {"row_sparse": 14_000, "dense": 5_000}  # spec §7.3 table 2, 1 GPU, len 50


def movielens_hp() -> tuple[dict[str, str], str]:
    preset = HERE.parent / "o2v_jax" / "presets" / "movielens.json"
    if preset.is_file():
        return json.loads(preset.read_text()), str(preset.relative_to(HERE.parent))
    return dict(MOVIELENS_FALLBACK), "fallback (enc_dim 64, batch 256)"


# --------------------------------------------------------------------------- batch stream

def stream(data, config, seed: int = 0, only_shape=None):
    """train()'s per-epoch host work, forever: negative sampling, then shuffled batches."""
    from o2v_jax.training import epoch_batches

    for epoch in itertools.count():
        for batch in epoch_batches(data, config, seed, epoch)[1]:
            if only_shape is None or (batch.in0.shape[1], batch.in1.shape[1]) == only_shape:
                yield batch


def shapes_of_one_epoch(data, config, seed: int = 99) -> dict[tuple[int, int], object]:
    """One batch of every (L0, L1) bucket shape an epoch has (host work only)."""
    from o2v_jax.training import epoch_batches

    out = {}
    for batch in epoch_batches(data, config, seed, 0)[1]:
        out.setdefault((batch.in0.shape[1], batch.in1.shape[1]), batch)
    return out


# --------------------------------------------------------------------------- o2v-jax

class JaxLoop:
    """train()'s inner loop over a batch stream (o2v_jax.training.train, the epoch body)."""

    def __init__(self, config, data, layout: str, compiles: common.CompileCounter,
                 seed: int = 0, only_shape=None, native_rows: bool = True):
        import jax

        from o2v_jax.row_sparse import Options
        from o2v_jax.training import build_steps, init_params, stage_batch, staged

        self.jax = jax
        self.stage = functools.partial(stage_batch, layout=layout)
        self.compiles = compiles
        graphdef, params, keep = init_params(config, seed, (None, None), layout=layout)
        self.steps = build_steps(graphdef, config, keep, layout=layout,
                                 options=Options(native_rows=native_rows))
        self.state = self.steps.init_state(params)
        self.dropout_root = jax.random.fold_in(jax.random.key(seed), 1)
        self.stream = staged(stream(data, config, seed, only_shape), layout)  # as train() feeds it

    def compiled(self) -> int:
        """Compiles in this process so far (a round that moved it compiled something)."""
        return self.compiles.count

    def step(self, batch):
        """One train step on a staged batch (``stage_batch``'s first item)."""
        self.state, sums = self.steps.train_step(self.state, batch, self.dropout_root)
        return sums

    def run(self, n: int) -> float:
        """Train on the next n batches; returns the real records seen (all work finished)."""
        parts, records = [], 0.0
        for batch, real in itertools.islice(self.stream, n):
            parts.append(self.step(batch))
            records += real
        self.jax.block_until_ready((self.state, parts))
        return records


# --------------------------------------------------------------------------- PyTorch

def torch_optimizers(torch, config, table_params, rest_params):
    """The config's optimizer in torch with MXNet's constants (o2v_jax.training.make_optimizer).

    row_sparse: the tables get torch's sparse-gradient optimizer (SparseAdam; Adagrad and
    SGD accept sparse gradients), the rest the dense one. torch's ``weight_decay`` adds
    wd * w to the gradient, as MXNet's ``wd`` does.
    """
    lr, wd, opt = config.learning_rate, config.weight_decay, config.optimizer
    make = {
        "adam": lambda ps, sparse: (torch.optim.SparseAdam(ps, lr=lr, betas=(0.9, 0.999), eps=1e-8)
                                    if sparse else torch.optim.Adam(ps, lr=lr, betas=(0.9, 0.999),
                                                                    eps=1e-8, weight_decay=wd)),
        "adagrad": lambda ps, sparse: torch.optim.Adagrad(ps, lr=lr, eps=1e-7, weight_decay=wd,
                                                          initial_accumulator_value=0.0),
        "sgd": lambda ps, sparse: torch.optim.SGD(ps, lr=lr, weight_decay=wd),
        "rmsprop": lambda ps, sparse: torch.optim.RMSprop(ps, lr=lr, alpha=0.9, eps=1e-8, weight_decay=wd),
        "adadelta": lambda ps, sparse: torch.optim.Adadelta(ps, lr=lr, rho=0.9, eps=1e-5, weight_decay=wd),
    }[opt]
    if config.row_sparse:
        if opt == "adam" and wd:
            print("  note: torch's SparseAdam has no weight decay; the baseline runs without it")
        return [make(table_params, True), make(rest_params, False)]
    return [make(table_params + rest_params, False)]


class TorchLoop:
    """The same model and loop written plainly in PyTorch (pooled encoders only)."""

    def __init__(self, config, data, seed: int = 0, only_shape=None):
        import torch
        from torch import nn

        self.torch = torch
        torch.manual_seed(seed)
        sparse = config.row_sparse
        e0, e1 = config.encoders

        def bag(enc):
            return nn.EmbeddingBag(enc.vocab_size, enc.token_embedding_dim, mode="mean",
                                   sparse=sparse, padding_idx=0)

        self.emb0 = bag(e0)
        self.emb1 = self.emb0 if config.tied_token_embedding_weight else bag(e1)
        act = {"relu": nn.ReLU, "tanh": nn.Tanh, "linear": nn.Identity}[config.mlp_activation]
        width = sum(2 * config.enc_dim if op == "concat" else config.enc_dim
                    for op in config.comparator_list)
        layers = []
        for _ in range(config.mlp_layers):
            layers += [nn.Linear(width, config.mlp_dim), act(), nn.Dropout(config.dropout)]
            width = config.mlp_dim
        layers.append(nn.Linear(width, config.num_outputs))
        self.mlp = nn.Sequential(*layers)
        self.drop = nn.Dropout(config.dropout)
        self.ops = config.comparator_list
        self.regression = config.is_regression
        tables = list({id(m): m for m in (self.emb0, self.emb1)}.values())
        table_params = [p for m in tables for p in m.parameters()]
        self.opts = torch_optimizers(torch, config, table_params, list(self.mlp.parameters()))
        self.stream = stream(data, config, seed, only_shape)

    def forward(self, in0, in1):
        u, v = self.drop(self.emb0(in0)), self.drop(self.emb1(in1))  # encoder output dropout
        parts = {"hadamard": lambda: [u * v], "concat": lambda: [u, v],
                 "abs_diff": lambda: [(u - v).abs()]}
        return self.mlp(self.torch.cat([p for op in self.ops for p in parts[op]()], dim=-1))

    def step(self, batch):
        torch = self.torch
        in0, in1 = torch.from_numpy(batch.in0), torch.from_numpy(batch.in1)
        labels, weights = torch.from_numpy(batch.labels), torch.from_numpy(batch.weights)
        for opt in self.opts:
            opt.zero_grad()
        out = self.forward(in0, in1)
        if self.regression:
            per_row = 0.5 * (out[:, 0] - labels) ** 2
        else:
            per_row = torch.nn.functional.cross_entropy(out, labels.long(), reduction="none")
        loss = (per_row * weights).sum() / weights.sum().clamp(min=1.0)
        loss.backward()
        for opt in self.opts:
            opt.step()
        return loss.detach()

    def run(self, n: int) -> float:
        records = 0.0
        for batch in itertools.islice(self.stream, n):
            self.step(batch)
            records += float(batch.weights.sum())
        return records


# --------------------------------------------------------------------------- measurement

def measure(name: str, config, data, *, rounds: dict[str, int], repeat: int, torch_ok: bool,
            layout: str, compiles: common.CompileCounter, only_shape=None,
            warm_batches: int = 2, xla_scatter: bool = False) -> dict:
    """Interleaved rounds of o2v-jax and torch; medians of records/s.

    ``xla_scatter`` also times o2v-jax with XLA's scatter writing the row_sparse loop's
    rows back instead of the native kernel (o2v_jax/native.py): the code before it."""
    print(f"\n== {name}: B={config.mini_batch_size}, storage={config.token_embedding_storage_type}"
          f", {len(data):,} records"
          + (f" (x{1 + config.negative_sampling_rate} with negative sampling)"
             if config.negative_sampling_rate else ""), flush=True)
    t0 = time.perf_counter()
    loops = {"o2v-jax": JaxLoop(config, data, layout, compiles, only_shape=only_shape)}
    if xla_scatter:
        loops["xla-scatter"] = JaxLoop(config, data, layout, compiles, only_shape=only_shape,
                                       native_rows=False)
        rounds = {**rounds, "xla-scatter": rounds["o2v-jax"]}
    if torch_ok:
        loops["torch"] = TorchLoop(config, data, only_shape=only_shape)
    build = time.perf_counter() - t0
    if torch_ok:
        n = max(1, rounds["torch"] // 2)
        result_threads = common.pick_threads_by_timing(
            loops["torch"].torch, lambda: loops["torch"].run(n), repeat=2)
        print(f"  torch intra-op threads: {result_threads} (the faster of 1 and "
              f"{os.cpu_count()} here)", flush=True)
    # Warm-up: one batch of every bucket shape (compiles each), then a few more batches.
    t0, compiled_before = time.perf_counter(), compiles.count
    shapes = shapes_of_one_epoch(data, config) if only_shape is None else {}
    jax_loops = [loop for loop in loops.values() if isinstance(loop, JaxLoop)]
    for loop in jax_loops:
        for batch in shapes.values():
            staged, _ = loop.stage(batch)  # as the stream stages it
            loop.step(staged)
    for loop in loops.values():
        loop.run(warm_batches)
    for loop in jax_loops:
        loop.jax.block_until_ready(loop.state)
    warm = time.perf_counter() - t0
    print(f"  setup {build:.1f} s; warm-up {warm:.1f} s ({len(shapes) or 1} bucket shapes, "
          f"{compiles.count - compiled_before} compiles)", flush=True)
    rates = {k: [] for k in loops}
    discarded = 0
    for _ in range(repeat):
        for key, loop in loops.items():
            while True:
                before = loop.compiled() if key != "torch" else 0
                t = time.perf_counter()
                records = loop.run(rounds[key])
                dt = time.perf_counter() - t
                if key == "torch" or loop.compiled() == before:
                    break
                discarded += 1  # a new shape (or row-set size) compiled inside the round
                if discarded > 3 * repeat:
                    break
            rates[key].append(records / dt)
    result = {"job": name, "storage": config.token_embedding_storage_type,
              "torch_threads": result_threads if torch_ok else None,
              "batch_size": config.mini_batch_size, "rounds": rounds, "repeat": repeat,
              "discarded_rounds_with_compile": discarded, "warmup_seconds": warm,
              "records_per_second": {k: common.median(v) for k, v in rates.items()},
              "all_rates": rates}
    for key, v in rates.items():
        print(f"  {key:11s} {common.fmt_rate(common.median(v)):>8} records/s "
              f"(median of {len(v)} rounds of {rounds[key]} batches; "
              f"min {common.fmt_rate(min(v))}, max {common.fmt_rate(max(v))})")
    if discarded:
        print(f"  ({discarded} round(s) with a compile discarded and re-run)")
    if "xla-scatter" in rates:
        gain = common.median(rates["o2v-jax"]) / common.median(rates["xla-scatter"])
        result["ratio_vs_xla_scatter"] = gain
        print(f"  native row write-back / XLA scatter: {gain:.2f}x")
    if "torch" in rates:
        ratio = common.median(rates["o2v-jax"]) / common.median(rates["torch"])
        result["ratio_vs_torch"] = ratio
        print(f"  ratio o2v-jax / torch: {ratio:.2f}x")
    return result


def host_batching(config, data, seed: int = 0) -> dict:
    """Host work alone: negative sampling and batches() over one epoch (no training)."""
    from o2v_jax.buckets import batches
    from o2v_jax.sampling import negative_pairs

    t0 = time.perf_counter()
    epoch_data = data
    if config.negative_sampling_rate:
        epoch_data = negative_pairs(data, config.negative_sampling_rate, np.random.default_rng(seed))
    t1 = time.perf_counter()
    n = rows = 0
    for batch in batches(epoch_data, config, shuffle_seed=seed):
        n += 1
        rows += float(batch.weights.sum())
    t2 = time.perf_counter()
    out = {"negative_sample_seconds": t1 - t0, "batches_seconds": t2 - t1, "batches": n,
           "records": rows, "batching_records_per_second": rows / (t2 - t1)}
    print(f"  host alone: negative_sample {t1 - t0:.2f} s, batches() {t2 - t1:.2f} s for "
          f"{n} batches = {common.fmt_rate(rows / (t2 - t1))} records/s")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(ap)
    ap.add_argument("--job", choices=["movielens", "wikipedia", "all"], default="all")
    ap.add_argument("--storage", choices=["row_sparse", "dense", "both"], default="both",
                    help="wikipedia table storage (movielens uses the preset's)")
    ap.add_argument("--positives", type=int, help="wikipedia positive records (x4 with negatives)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    ap.add_argument("--xla-scatter", action="store_true",
                    help="row_sparse on the CPU: also time XLA's scatter as the row write-back "
                         "instead of the native kernel (o2v_jax/native.py)")
    common.add_layout_arg(ap)
    args = ap.parse_args(argv)
    layout = common.layout_from(args)
    compiles = common.CompileCounter()
    print(f"o2v-jax code layout: {layout}")
    import jax

    cpu_loop = layout == "cpu" and jax.default_backend() == "cpu"  # where native.set_rows runs
    if cpu_loop:
        from o2v_jax import native

        print(f"row_sparse row write-back: {native.describe()}")

    torch_ok = not args.no_torch and common.try_import_torch() is not None
    from o2v_jax.config import from_hyperparameters

    repeat = args.repeat or (2 if args.quick else 5)
    results = []
    if args.job in ("movielens", "all"):
        hp, source = movielens_hp()
        config = from_hyperparameters(hp)
        n = 20_000 if args.quick else 90_570
        data = synthetic.movielens(n)
        per_epoch = -(-n // config.mini_batch_size)
        r = measure(f"movielens ({source})", config, data, repeat=repeat, torch_ok=torch_ok,
                    rounds={"o2v-jax": per_epoch, "torch": per_epoch}, layout=layout,
                    compiles=compiles)
        r["host"] = host_batching(config, data)
        results.append(r)
    if args.job in ("wikipedia", "all"):
        storages = ["row_sparse", "dense"] if args.storage == "both" else [args.storage]
        positives = args.positives or (4_000 if args.quick else 62_500)
        data = synthetic.wikipedia(positives)
        for storage in storages:
            config = from_hyperparameters({**WIKI_HP, "token_embedding_storage_type": storage})
            if storage == "row_sparse":
                rounds = {"o2v-jax": 8 if args.quick else 48, "torch": 2 if args.quick else 6}
            else:
                rounds = {"o2v-jax": 2 if args.quick else 6, "torch": 2 if args.quick else 4}
            # --quick times the most common bucket only (one compile instead of ~16).
            r = measure(f"wikipedia {storage}", config, data, rounds=rounds, repeat=repeat,
                        torch_ok=torch_ok, layout=layout, compiles=compiles,
                        only_shape=(32, 50) if args.quick else None,
                        xla_scatter=args.xla_scatter and storage == "row_sparse" and cpu_loop)
            r["sagemaker_k80_records_per_second"] = SAGEMAKER_K80[storage]
            print(f"  SageMaker, 1 K80 GPU (spec §7.3): ~{SAGEMAKER_K80[storage]:,} records/s; "
                  f"o2v-jax here / SageMaker: "
                  f"{r['records_per_second']['o2v-jax'] / SAGEMAKER_K80[storage]:.2f}x")
            results.append(r)
            del r
        results[-1]["host"] = host_batching(config, data)
    common.write_json(args.json, "bench_train", results, layout=layout)
    print("\nsummary (records/s, o2v-jax vs torch):")
    for r in results:
        rps = r["records_per_second"]
        ratio = f"{r['ratio_vs_torch']:.2f}x" if "ratio_vs_torch" in r else "n/a"
        print(f"  {r['job']:45s} {common.fmt_rate(rps['o2v-jax']):>8} vs "
              f"{common.fmt_rate(rps.get('torch', float('nan'))):>8}  ratio {ratio}")


if __name__ == "__main__":
    main()
