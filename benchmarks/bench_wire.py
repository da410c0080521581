"""How fast o2v_jax.wire encodes responses and decodes requests, against the obvious ways.

Encoding: N embeddings of width H (default 1,000 x 256, float32 ~N(0, 0.1)) through
``wire.encode_response`` in both formats (orjson writing the float32 rows); baselines
in the same run: msgspec on the floats widened to float64 (prints
``0.10000000149011612``), and numpy's shortest float32 strings joined by Python (right,
but slow). Decoding: ``wire.decode_request`` on a body of N instances of about
50 tokens. Reports the best and median of ``--repeat`` runs after one warm-up.

    python benchmarks/bench_wire.py [--rows 1000] [--width 256] [--repeat 20]
"""

from __future__ import annotations

import argparse
import json
import time

import msgspec
import numpy as np

from o2v_jax import media, wire


def timed(fn, repeat: int) -> tuple[float, float]:
    """(best, median) seconds of ``repeat`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[0], times[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((args.rows, args.width)) * 0.1).astype(np.float32)

    def numpy_str_join() -> bytes:
        rows = x.astype(str).tolist()
        return "".join('{"embeddings":[' + ",".join(r) + "]}\n" for r in rows).encode()

    cases = [
        ("wire.encode_response json", lambda: wire.encode_response("embeddings", x, media.JSON)),
        ("wire.encode_response jsonlines", lambda: wire.encode_lines("embeddings", x)),
        ("baseline: msgspec, float64 (long reprs)", lambda: msgspec.json.encode(x.astype(np.float64).tolist())),
        ("baseline: numpy str + Python join", numpy_str_join),
    ]
    print(f"encode {args.rows} x {args.width} float32")
    results = {}
    for name, fn in cases:
        best, median = timed(fn, args.repeat)
        results[name] = best
        print(f"  {name:42s} best {best * 1e3:7.2f} ms   median {median * 1e3:7.2f} ms")
    ours = results["wire.encode_response jsonlines"]
    print(f"  numpy str + join / ours: {results['baseline: numpy str + Python join'] / ours:.1f}x")

    seqs = [rng.integers(1, 10_000, rng.integers(25, 76)).tolist() for _ in range(args.rows)]
    bodies = {
        media.JSON: json.dumps({"instances": [{"in0": s} for s in seqs]}).encode(),
        media.JSONLINES: "".join(json.dumps({"in0": s}) + "\n" for s in seqs).encode(),
    }
    limits = {"vocab_sizes": (10_000, 10_000), "max_seq_lens": (100, 100)}
    print(f"decode {args.rows} instances, {sum(map(len, seqs))} tokens")
    for media_type, body in bodies.items():
        best, median = timed(lambda: wire.decode_request(body, media_type, **limits), args.repeat)
        print(f"  decode_request {media_type:24s} best {best * 1e3:7.2f} ms   median {median * 1e3:7.2f} ms")
    best, _ = timed(lambda: json.loads(bodies[media.JSON]), args.repeat)
    print(f"  baseline: json.loads (no checks)          best {best * 1e3:7.2f} ms")


if __name__ == "__main__":
    main()
