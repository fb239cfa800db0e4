#!/usr/bin/env bash
# The GPU checks, prepared to run in one go on a lent GPU machine (a few minutes):
#   1. the real-shape pathway benchmark (LLaMA-3.1-8B shape, random bf16 weights, 32K SAEs)
#      side by side with the naive baseline;
#   2. the tests marked gpu (CUDA against CPU: resid_post, prototype, tokens, pathways);
#   3. `python -m engine prototype --device cuda` on a fixture model.
# Results go to $OUT (default /tmp/gpu-checks). Wheels for packages the machine lacks may sit
# in .whl/ (see docs/benchmarks.md). Dry run on a CPU machine:
#   SKIP_WHEELS=1 DEVICE=cpu SCALE=16 bash scripts/gpu_checks.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu-checks}
DEVICE=${DEVICE:-cuda}
SCALE=${SCALE:-1}
BUDGET=${BUDGET:-120}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
if [ -z "${SKIP_WHEELS:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import sys, torch, transformers, pandas; print(sys.version.split()[0], torch.__version__, transformers.__version__, pandas.__version__)"
} | tee "$OUT/machine.txt"

echo "== 1. real-shape pathway benchmark"
timeout 300 python3 scripts/bench_pathways.py --real-shape --device "$DEVICE" --scale-down "$SCALE" --baseline-budget-s 60 \
  --budget-s "$BUDGET" --json "$OUT/real_shape.json" >"$OUT/real_shape.log" 2>&1
echo "exit $?"; tail -n 12 "$OUT/real_shape.log"

echo "== 2. tests marked gpu"
timeout 180 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_model.py tests/test_prototype.py \
  tests/test_tokens_views.py tests/test_pathways_cli.py >"$OUT/pytest_gpu.txt" 2>&1
echo "exit $?"; tail -n 15 "$OUT/pytest_gpu.txt"

echo "== 3. prototype on $DEVICE"
python3 scripts/make_fixtures.py --out /tmp/gpu-fixture >/dev/null 2>&1
timeout 60 python3 -m engine prototype --config /tmp/gpu-fixture/config.yaml --cache /tmp/gpu-cache \
  --feature L3-234 --prompt both --device "$DEVICE" >"$OUT/prototype.txt" 2>&1
echo "exit $?"; cat "$OUT/prototype.txt"
cp /tmp/gpu-cache/prototype/L3-234.json "$OUT/prototype_L3-234.json" 2>/dev/null
exit 0
