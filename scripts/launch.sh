#!/usr/bin/env bash
# Run the whole pipeline on a cluster node: `python -m engine run` on the chosen GPUs, with
# the pathway step spread over all of them by torch's launcher (one rank per GPU).
#
#   scripts/launch.sh [--gpus 0,1,2,3 | --cpu] [--dry-run] --config FILE [run options ...]
#
# GPUs: --gpus LIST, else CUDA_VISIBLE_DEVICES as set by the scheduler (SLURM sets it), else
# every GPU `nvidia-smi -L` lists. Steps other than pathways run on the first of them.
# Every other option goes to `python -m engine run` (--from, --only, --force, --cache,
# --checkpoints, --responses, --set KEY=VALUE, ...). The unchanged steps are skipped, so the
# same command resumes a run that was stopped. Output is also written to
# $LOG_DIR/run-<time>.log (LOG_DIR defaults to cache/logs in the repository).
# Environment: PYTHON (interpreter, default python3).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
GPUS=""
DRY=0
CPU=0
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --gpus) GPUS="${2:?--gpus needs a list such as 0,1}"; shift 2 ;;
    --gpus=*) GPUS="${1#--gpus=}"; shift ;;
    --cpu) CPU=1; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done

if [ "$CPU" = 1 ]; then
  DEVICE=cpu
  NPROC=1
  export CUDA_VISIBLE_DEVICES=""
else
  if [ -n "$GPUS" ]; then
    export CUDA_VISIBLE_DEVICES="$GPUS"
  elif [ -z "${CUDA_VISIBLE_DEVICES:-}" ]; then
    if command -v nvidia-smi >/dev/null 2>&1; then
      CUDA_VISIBLE_DEVICES="$(nvidia-smi -L | awk -F'[ :]' '/^GPU/ {print $2}' | paste -sd, -)"
      export CUDA_VISIBLE_DEVICES
    fi
  fi
  if [ -z "${CUDA_VISIBLE_DEVICES:-}" ]; then
    echo "launch.sh: no GPU found (set CUDA_VISIBLE_DEVICES, pass --gpus, or use --cpu)" >&2
    exit 2
  fi
  DEVICE=cuda
  NPROC="$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)"
fi

export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
CMD=("$PYTHON" -m engine run --device "$DEVICE" --nproc "$NPROC" "${ARGS[@]}")

echo "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-} ${CMD[*]}"
if [ "$DRY" = 1 ]; then
  exit 0
fi
LOG_DIR="${LOG_DIR:-$ROOT/cache/logs}"
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/run-$(date +%Y%m%d-%H%M%S).log"
echo "log: $LOG"
cd "$ROOT"
set +e
"${CMD[@]}" 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
set -e
exit "$rc"
