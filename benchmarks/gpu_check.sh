#!/usr/bin/env bash
# The GPU check: one prepared script, at most 8 minutes on one GPU, run from the repository root.
#   1. --fast against eager, measured for every method (benchmarks/fast_vs_eager.py): the worst relative
#      differences of the per-epoch losses on the RNG path (dropout 0.6, 3 epochs, tol 1e-4) and on the
#      schedule path (the same capturable Adam, 32 epochs, tol 1e-5), printed as a table       <= 3 min
#   2. the CUDA tests (they print their measured differences too)                           <= 2 min
#   3. the speed benchmark, eager and --fast, OpenMIC and SONYC-UST sizes                   <= 1.5 min
#   4. a 100-epoch --fast mean teacher, whose learning rate must be halved at epochs 31, 61
#      and 91 (benchmarks/check_lr.py)                                                     <= 1.5 min
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
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
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
step "--fast against eager, measured" 180 "$PY" benchmarks/fast_vs_eager.py --device cuda
step "CUDA tests" 120 "$PY" -m pytest -q -s -rs tests/test_methods.py -k cuda
step "benchmark, eager and --fast" 90 "$PY" benchmarks/bench.py --device cuda --fast --epochs 3 \
  --shape openmic sonyc --methods b1 mean_teacher
step "100-epoch --fast mean teacher" 90 "$PY" mean_teacher.py --device cuda --fast --out "$OUT"
step "learning-rate schedule of that run" 20 "$PY" benchmarks/check_lr.py "$OUT/synthetic__mean_teacher__seed0"
echo; echo "gpu_check: $([ $failed -eq 0 ] && echo 'every step passed' || echo 'a step FAILED')"
exit $failed
