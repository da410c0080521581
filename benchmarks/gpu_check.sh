#!/usr/bin/env bash
# One short accelerator check: bench_embed (pooled_embedding) and bench_train's Wikipedia
# job (spec §7.3, row_sparse) on the first JAX device, printing their numbers.
#
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh [--full]
#
# Needs an environment with jax for the accelerator already installed (e.g.
# `pip install -e '.[cuda12]'`): it installs nothing and reaches no network. The torch
# baselines are skipped (they run on the CPU; comparing them with a GPU says nothing).
# Sizes are the scripts' --quick ones unless --full; the whole check is bounded by
# TIMEOUT seconds per step (default 240). CI never runs this.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
TIMEOUT=${TIMEOUT:-240}
SIZE=--quick
if [[ "${1:-}" == "--full" ]]; then SIZE=""; fi
OUT=${OUT:-$(mktemp -d -t o2v-gpu-check-XXXXXX)}

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

run embed "$PY" benchmarks/bench_embed.py $SIZE --no-torch --networks pooled_embedding \
  --json "$OUT/embed.json"
run train "$PY" benchmarks/bench_train.py $SIZE --no-torch --job wikipedia --storage row_sparse \
  --json "$OUT/train.json"

echo
echo "== summary (JSON in $OUT)"
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
if (out / "embed.json").exists():
    for n in json.loads((out / "embed.json").read_text())["results"]["networks"]:
        print(f"embed {n['network']}: {n['sequences_per_second']['o2v-jax']:,.0f} seq/s, "
              f"{n['tokens_per_second']['o2v-jax']:,.0f} real tokens/s")
if (out / "train.json").exists():
    for j in json.loads((out / "train.json").read_text())["results"]:
        print(f"train {j['job']}: {j['records_per_second']['o2v-jax']:,.0f} records/s "
              f"(SageMaker, 1 K80: ~{j['sagemaker_k80_records_per_second']:,} records/s)")
EOF
exit $status
