"""Embedding throughput of ``Predictor.embed`` (Python lists in, numpy out) against PyTorch.

pooled_embedding: vocab 50,000, dim 256, 8,192 sequences with lengths uniform in 4..64,
through ``o2v_jax.load(model_dir).embed(lists)`` (the model directory is written with
random parameters: ``training.init_params`` + ``checkpoint.save_model``). Baseline in the
same run: ``torch.nn.functional.embedding_bag(mode="mean", padding_idx=0)`` on the same
sequences already padded into an int64 tensor (its input preparation is not timed; ours
is). Also reported: real tokens/s against the memory-bandwidth limit measured in the same
run (a numpy streaming read of a 512 MiB array; an embedding row gather reads D * 4 bytes
per real token), and against a streaming read of a table-sized array (the 51 MB table
fits a large L3 cache, where the DRAM figure is no ceiling).

hcnn and bilstm: the same comparison against equivalent torch modules loaded with the same
weights (Conv1d stack with the same filter split + ReLU + masked max-pool; bidirectional
nn.LSTM over packed sequences + masked max-pool), on fewer sequences. Outputs are checked
to agree before anything is timed.

Warm-up first (``Predictor.warmup`` compiles every bucket), every timed call returns
finished numpy/torch results, rounds alternate ours / torch, medians, ratio last.

    python benchmarks/bench_embed.py [--quick] [--json out.json] [--repeat N]
        [--networks pooled_embedding,hcnn,bilstm]
        [--layout auto|cpu|accelerator]   (code shape: default by JAX backend)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

import common  # noqa: E402
import synthetic  # noqa: E402

VOCAB, DIM, MAX_LEN = 50_000, 256, 64


def build_model(model_dir: Path, network: str, *, dim: int = DIM, vocab: int = VOCAB,
                max_len: int = MAX_LEN):
    """A saved model with random parameters; returns (config, params as numpy)."""
    import jax

    from o2v_jax import checkpoint
    from o2v_jax.config import from_hyperparameters
    from o2v_jax.training import init_params

    config = from_hyperparameters({
        "enc0_network": network, "enc1_network": "enc0", "enc0_max_seq_len": max_len,
        "enc0_vocab_size": vocab, "enc0_token_embedding_dim": dim, "enc_dim": dim,
        "mlp_dim": 16, "mlp_layers": 1})
    _, params, _ = init_params(config, 0, (None, None))
    params = jax.tree.map(np.asarray, params)
    checkpoint.save_model(model_dir, hyperparameters=config.to_hyperparameters(),
                          params=params, metadata={"note": "random parameters (benchmark)"})
    return config, params


def padded(seqs: list[list[int]], length: int) -> np.ndarray:
    out = np.zeros((len(seqs), length), np.int64)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s
    return out


# --------------------------------------------------------------------------- torch models

def torch_encoder(torch, config, params):
    """(fn(padded int64 (N, L), lengths int64 (N,)) -> float32 (N, H), description)."""
    from torch import nn

    enc = config.enc0
    table = torch.from_numpy(np.asarray(params["embed0"]["embedding"]))
    if enc.network == "pooled_embedding":
        def pooled(x, lengths):
            return torch.nn.functional.embedding_bag(x, table, mode="mean", padding_idx=0)
        return pooled, 'F.embedding_bag(mode="mean", padding_idx=0)'
    emb = nn.Embedding.from_pretrained(table, freeze=True, padding_idx=0)
    if enc.network == "hcnn":
        convs = []
        for conv in params["enc0"]["convs"].values() if isinstance(params["enc0"]["convs"], dict) \
                else params["enc0"]["convs"]:
            kernel = np.asarray(conv["kernel"])  # (W, C_in, F) flax layout
            c = nn.Conv1d(kernel.shape[1], kernel.shape[2], kernel.shape[0], padding="same")
            c.weight.data = torch.from_numpy(np.ascontiguousarray(kernel.transpose(2, 1, 0)))
            c.bias.data = torch.from_numpy(np.asarray(conv["bias"]))
            convs.append(c)

        def hcnn(x, lengths):
            mask = (x != 0).unsqueeze(1)  # (N, 1, L)
            h = emb(x).transpose(1, 2)  # (N, D, L)
            pooled = []
            for c in convs:
                h = torch.relu(c(h * mask))  # zero padding before every conv, as ours does
                p = h.masked_fill(~mask, float("-inf")).amax(dim=2)
                pooled.append(torch.where(mask.any(dim=2), p, torch.zeros_like(p)))
            return torch.cat(pooled, dim=1)
        return hcnn, "Conv1d stack (same filters) + ReLU + masked max-pool"
    if enc.network == "bilstm":
        enc_params = params["enc0"]
        fwd, bwd = _items(enc_params["fwd"]), _items(enc_params["bwd"])
        h_fwd = np.asarray(fwd[0]["dense_h"]["kernel"]).shape[0]
        if len(fwd) != 1 or h_fwd != np.asarray(bwd[0]["dense_h"]["kernel"]).shape[0]:
            raise SystemExit("bench_embed: the torch bilstm baseline needs 1 layer, even enc_dim")
        lstm = nn.LSTM(enc.token_embedding_dim, h_fwd, batch_first=True, bidirectional=True)
        for suffix, d in (("", fwd[0]), ("_reverse", bwd[0])):
            getattr(lstm, f"weight_ih_l0{suffix}").data = torch.from_numpy(
                np.ascontiguousarray(np.asarray(d["dense_i"]["kernel"]).T))
            getattr(lstm, f"weight_hh_l0{suffix}").data = torch.from_numpy(
                np.ascontiguousarray(np.asarray(d["dense_h"]["kernel"]).T))
            getattr(lstm, f"bias_ih_l0{suffix}").data.zero_()
            getattr(lstm, f"bias_hh_l0{suffix}").data = torch.from_numpy(np.asarray(d["dense_h"]["bias"]))

        def bilstm(x, lengths):
            packed = nn.utils.rnn.pack_padded_sequence(emb(x), lengths.clamp(min=1),
                                                       batch_first=True, enforce_sorted=False)
            out, _ = lstm(packed)
            h, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True,
                                                    total_length=x.shape[1])
            mask = (x != 0).unsqueeze(2)
            return h.masked_fill(~mask, float("-inf")).amax(dim=1)
        return bilstm, "nn.LSTM(bidirectional) on packed sequences + masked max-pool"
    raise ValueError(enc.network)


def _items(x):
    return [x[k] for k in sorted(x, key=int)] if isinstance(x, dict) else list(x)


# --------------------------------------------------------------------------- measurement

def stream_bandwidth(mib: int = 512, repeat: int = 5) -> float:
    """Bytes/s of a numpy streaming read (sum) of a ``mib`` MiB float32 array."""
    a = np.ones(mib * (1 << 20) // 4, np.float32)
    return a.nbytes / common.median(common.interleaved({"sum": a.sum}, repeat)["sum"])


def device_bandwidth(mib: int = 2048, repeat: int = 9) -> float:
    """Bytes/s of a jitted sum over a ``mib`` MiB float32 array on JAX's default device
    (on an accelerator the limit that matters is its own memory's, not the host's)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones(mib * (1 << 20) // 4, jnp.float32)
    total = jax.jit(jnp.sum)
    times = common.interleaved({"sum": lambda: total(a).block_until_ready()}, repeat)["sum"]
    return a.nbytes / common.median(times)


def measure(network: str, n: int, repeat: int, torch, quick: bool, layout: str) -> dict:
    import o2v_jax
    from o2v_jax.kernels import default_layout
    from o2v_jax.model import abstract_model
    from o2v_jax.predictor import Predictor

    dim = DIM if network != "bilstm" or not quick else 128
    seqs = synthetic.uniform_lengths(n, 4, MAX_LEN, VOCAB, seed=1)
    tokens = sum(map(len, seqs))
    with tempfile.TemporaryDirectory() as tmp:
        config, params = build_model(Path(tmp) / "model", network, dim=dim)
        predictor = o2v_jax.load(Path(tmp) / "model")
    if layout != default_layout():  # the same model and parameters, another code shape
        predictor = Predictor(config, abstract_model(config, layout)[0], params,
                              preferred_mode=predictor.preferred_mode)
    t0 = time.perf_counter()
    predictor.warmup(mode="embedding")
    warm = time.perf_counter() - t0
    print(f"\n== {network}: {n:,} sequences, {tokens:,} real tokens, vocab {VOCAB:,}, "
          f"D=H={dim}; warm-up {warm:.1f} s ({predictor.num_compiled} executables)", flush=True)

    def ours():
        return predictor.embed(seqs, encoder="in0")

    fns = {"o2v-jax": ours}
    result = {"network": network, "sequences": n, "real_tokens": tokens, "dim": dim,
              "warmup_seconds": warm}
    if torch is not None:
        x = torch.from_numpy(padded(seqs, MAX_LEN))
        lengths = torch.from_numpy(np.fromiter(map(len, seqs), np.int64, count=n))
        fn, what = torch_encoder(torch, config, params)
        result["torch_baseline"] = what

        def theirs():
            with torch.inference_mode():
                return fn(x, lengths).numpy()

        a, b = ours(), theirs()
        err = float(np.abs(a - b).max())
        result["max_abs_diff_vs_torch"] = err
        print(f"  outputs agree with torch: max |diff| = {err:.2e}")
        if not err < 1e-3:
            raise SystemExit(f"bench_embed: {network} disagrees with its torch baseline ({err})")
        threads = common.pick_threads_by_timing(torch, theirs)
        result["torch_threads"] = threads
        print(f"  torch intra-op threads: {threads}")
        fns["torch"] = theirs
    times = common.interleaved(fns, repeat)
    med = {k: common.median(v) for k, v in times.items()}
    result["seconds"] = med
    result["sequences_per_second"] = {k: n / v for k, v in med.items()}
    result["tokens_per_second"] = {k: tokens / v for k, v in med.items()}
    for k, v in med.items():
        print(f"  {k:8s} {v * 1e3:8.1f} ms  {common.fmt_rate(n / v):>9} seq/s  "
              f"{common.fmt_rate(tokens / v):>11} real tokens/s")
    if "torch" in med:
        result["ratio_vs_torch"] = med["torch"] / med["o2v-jax"]
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(ap)
    ap.add_argument("--networks", default="pooled_embedding,hcnn,bilstm")
    ap.add_argument("--sequences", type=int, help="pooled_embedding sequences (default 8192)")
    ap.add_argument("--no-torch", action="store_true")
    common.add_layout_arg(ap)
    args = ap.parse_args(argv)
    layout = common.layout_from(args)
    print(f"o2v-jax code layout: {layout}")
    torch = None if args.no_torch else common.try_import_torch()
    repeat = args.repeat or (3 if args.quick else 9)

    bw = stream_bandwidth(128 if args.quick else 512)
    # The pooled table (V * D * 4 = 51 MB) fits this machine's L3 cache, so gathers from it
    # can beat a DRAM stream; a streaming read of a table-sized array is the cache-side bound.
    table_mib = VOCAB * DIM * 4 >> 20
    bw_table = stream_bandwidth(table_mib, repeat=9)
    print(f"memory bandwidth, numpy streaming read (1 thread): {bw / 1e9:.1f} GB/s from a "
          f"{128 if args.quick else 512} MiB array (DRAM); {bw_table / 1e9:.1f} GB/s from a "
          f"{table_mib} MiB array (the pooled table's size)", flush=True)
    results = {"bandwidth_bytes_per_second": bw, "table_sized_read_bytes_per_second": bw_table,
               "networks": []}
    import jax

    bw_device = None
    if jax.default_backend() != "cpu":  # the host figures above then bound only host work
        bw_device = device_bandwidth()
        results["device_bandwidth_bytes_per_second"] = bw_device
        print(f"device memory bandwidth, jitted sum over 2 GiB on {jax.devices()[0]}: "
              f"{bw_device / 1e9:.0f} GB/s", flush=True)
    for network in args.networks.split(","):
        if network == "pooled_embedding":
            n = args.sequences or (1024 if args.quick else 8192)
        else:
            n = 256 if args.quick else 2048
        r = measure(network, n, repeat, torch, args.quick, layout)
        if network == "pooled_embedding":
            rate = r["tokens_per_second"]["o2v-jax"]
            limit = bw / (r["dim"] * 4)
            r["bandwidth_limit_tokens_per_second"] = limit
            r["fraction_of_bandwidth_limit"] = rate / limit
            r["fraction_of_table_sized_read"] = rate / (bw_table / (r["dim"] * 4))
            print(f"  bandwidth limit: {common.fmt_rate(limit)} tokens/s (D*4 = {r['dim'] * 4} "
                  f"bytes per token); o2v-jax reaches {rate / limit:.0%} of it "
                  f"({r['fraction_of_table_sized_read']:.0%} of the table-sized read's rate)")
            if bw_device:
                r["fraction_of_device_bandwidth"] = rate / (bw_device / (r["dim"] * 4))
                print(f"  device bandwidth limit: {common.fmt_rate(bw_device / (r['dim'] * 4))} "
                      f"tokens/s; o2v-jax reaches {r['fraction_of_device_bandwidth']:.1%} of it "
                      f"(end to end from Python lists: host work bounds it)")
        if "ratio_vs_torch" in r:
            print(f"  ratio o2v-jax / torch (throughput): {r['ratio_vs_torch']:.2f}x")
        results["networks"].append(r)
    common.write_json(args.json, "bench_embed", results, layout=layout)
    print("\nsummary (throughput ratio o2v-jax / torch):")
    for r in results["networks"]:
        extra = (f", {r['fraction_of_bandwidth_limit']:.0%} of the bandwidth limit"
                 if "fraction_of_bandwidth_limit" in r else "")
        ratio = f"{r['ratio_vs_torch']:.2f}x" if "ratio_vs_torch" in r else "n/a"
        print(f"  {r['network']:17s} {common.fmt_rate(r['sequences_per_second']['o2v-jax']):>9} "
              f"seq/s  ratio {ratio}{extra}")


if __name__ == "__main__":
    main()
