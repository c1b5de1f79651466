#!/usr/bin/env bash
# The GPU check: one prepared script, at most 9 minutes on one GPU, run from the repository root.
#   1. the CUDA tests: every method eager and --fast, dropout 0, 32 epochs; per-epoch losses
#      within 1e-3 relative, learning rates halved at epoch 31, model.pt on the CPU     <= 4 min
#   2. the speed benchmark, eager and --fast, OpenMIC and SONYC-UST sizes             <= 3 min
#   3. a 100-epoch --fast mean teacher on the synthetic data, whose learning rate
#      must be halved at epochs 31, 61 and 91 (benchmarks/check_lr.py)                <= 2 min
# usage: bash benchmarks/gpu_check.sh [--python PY] [--out DIR]
# Exit 0 when every step passed; 2 without a CUDA device or on bad arguments; 1 when a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=python
OUT=runs/gpu_check
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PY="${2:?--python needs a value}"; shift 2 ;;
    --out) OUT="${2:?--out needs a value}"; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA device here (or no torch in $PY); run it on a machine with a GPU" >&2
  exit 2
fi
failed=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, report, remember failures
  local name=$1 limit=$2; shift 2
  echo; echo "### $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@"; local rc=$?
  echo "### $name: $([ $rc -eq 0 ] && echo passed || echo "FAILED (exit $rc)") in $((SECONDS - t0))s"
  [ $rc -eq 0 ] || failed=1
}
"$PY" -c "import torch; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '|', torch.cuda.get_device_name(0))"
rm -rf "$OUT"
step "CUDA tests: --fast against eager" 240 "$PY" -m pytest -q -rs tests/test_methods.py -k cuda
step "benchmark, eager and --fast" 180 "$PY" benchmarks/bench.py --device cuda --fast --epochs 3 \
  --shape openmic sonyc --methods b1 mean_teacher
step "100-epoch --fast mean teacher" 100 "$PY" mean_teacher.py --device cuda --fast --out "$OUT"
step "learning-rate schedule of that run" 20 "$PY" benchmarks/check_lr.py "$OUT/synthetic__mean_teacher__seed0"
echo; echo "gpu_check: $([ $failed -eq 0 ] && echo 'every step passed' || echo 'a step FAILED')"
exit $failed
