#!/usr/bin/env bash
# One short accelerator check: bench_embed and bench_train (the Wikipedia job of spec
# §7.3, and MovieLens) on the first JAX device, each next to its baseline in the same
# run: the same benchmark with --layout cpu, i.e. the code shape o2v-jax uses on CPU
# (cache-sized loops, host-side row plans) run on the accelerator.
#
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh [--full] [--no-baseline]
#
# Needs an environment with jax for the accelerator already installed (e.g.
# `pip install -e '.[cuda12]'`): it installs nothing and reaches no network. The torch
# baselines are skipped (they run on the CPU; comparing them with a GPU says nothing).
# Sizes are the scripts' --quick ones unless --full (the --layout cpu baselines are
# always --quick: that layout compiles a shape per row count); --no-baseline skips them
# (when device time is short). Every step is bounded by TIMEOUT seconds (default 240).
# CI never runs this.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
TIMEOUT=${TIMEOUT:-240}
SIZE=--quick
BASELINE=1
for arg in "$@"; do
  case $arg in
    --full) SIZE="" ;;
    --no-baseline) BASELINE="" ;;
    *) echo "usage: $0 [--full] [--no-baseline]" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-$(mktemp -d -t o2v-gpu-check-XXXXXX)}
mkdir -p "$OUT"

echo "== machine"
date
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
  || echo "(nvidia-smi not available)"
"$PY" - <<'EOF'
import sys
import jax
backend = jax.default_backend()
print(f"jax {jax.__version__}, backend {backend}, devices {jax.devices()}")
if backend == "cpu":
    sys.exit("gpu_check: JAX sees no accelerator (install jax for CUDA, e.g. .[cuda12]); stopping")
EOF

status=0
run() {  # run NAME CMD...: bounded, keeps going after a failure, remembers it
  local name=$1; shift
  echo
  echo "== $name: $*"
  if ! timeout "$TIMEOUT" "$@"; then
    echo "!! $name failed or timed out (limit ${TIMEOUT}s)"
    status=1
  fi
}

if [[ -n "$BASELINE" ]]; then
  run train-cpu-layout "$PY" benchmarks/bench_train.py --quick --no-torch --layout cpu \
    --job wikipedia --storage row_sparse --json "$OUT/train_cpu_layout.json"
fi
run train-quick "$PY" benchmarks/bench_train.py --quick --no-torch --job wikipedia \
  --storage row_sparse --json "$OUT/train_quick.json"
if [[ -n "$SIZE" ]]; then  # --quick: train-quick above is the measurement
  echo "(train: --quick, same as train-quick)"
else
  run train "$PY" benchmarks/bench_train.py --no-torch --json "$OUT/train.json"
fi
if [[ -n "$BASELINE" ]]; then
  run embed-cpu-layout "$PY" benchmarks/bench_embed.py --quick --no-torch --layout cpu \
    --networks pooled_embedding --json "$OUT/embed_cpu_layout.json"
fi
run embed "$PY" benchmarks/bench_embed.py $SIZE --no-torch --json "$OUT/embed.json"

echo
echo "== summary (JSON in $OUT)"
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from run_all import summarize
out = Path(sys.argv[1])
for name in ("train_cpu_layout", "train_quick", "train", "embed_cpu_layout", "embed"):
    if (out / f"{name}.json").exists():
        doc = json.loads((out / f"{name}.json").read_text())
        layout = doc["machine"].get("o2v_layout", "?")
        for line in summarize(name.split("_")[0], doc):
            print(f"[{name}, {layout} layout] {line}")
EOF
exit $status
