#!/usr/bin/env bash
# The cluster check: docs/runs.md's Slurm job-array recipe, end to end, on a single-node Slurm made here.
#   1. installs Debian's slurm-wlm and munge where they are missing (needs root and Debian's packages)
#   2. starts munged, slurmctld and slurmd with a private configuration (SLURM_CONF in a temporary folder;
#      /etc/slurm is left alone)
#   3. writes the commands of a small sweep (b1 and mean_teacher, drop rates 0 and 0.4, seeds 0 and 1,
#      2 epochs: 8 runs) with --dry-run and submits them as an array, at most 2 tasks at once
#   4. cancels the last task before it starts, and shows that --collect reports it missing (exit 1)
#   5. resubmits only what is missing (a second --dry-run lists just that) and collects (exit 0)
#   6. stops the daemons it started
# usage: bash benchmarks/slurm_check.sh [--python PY]       (not part of the test suite; about 2 minutes)
# Exit 0 when every step passed, 1 when one failed, 2 when Slurm cannot be installed or started here.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=$(command -v python3)
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PY="${2:?--python needs a value}"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "slurm_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")  # the jobs run it by its absolute path

if ! command -v slurmctld > /dev/null || ! command -v munged > /dev/null; then
  echo "### installing slurm-wlm and munge from Debian's packages"
  if [ "$(id -u)" != 0 ]; then echo "slurm_check: installing Slurm needs root" >&2; exit 2; fi
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge > /dev/null \
    || { echo "slurm_check: apt-get could not install slurm-wlm and munge" >&2; exit 2; }
fi

WORK=$(mktemp -d /tmp/slurm_check.XXXXXX)
chmod 755 "$WORK"
export SLURM_CONF=$WORK/etc/slurm.conf
mkdir -p "$WORK/etc" "$WORK/state" "$WORK/spool" "$WORK/log" "$WORK/munge"
NODE=$(hostname -s)
CPUS=$(nproc)
MEMORY=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
cat > "$SLURM_CONF" <<EOF
ClusterName=check
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool
SlurmctldPidFile=$WORK/slurmctld.pid
SlurmdPidFile=$WORK/slurmd.pid
SlurmctldLogFile=$WORK/log/slurmctld.log
SlurmdLogFile=$WORK/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
NodeName=$NODE CPUs=$CPUS RealMemory=$MEMORY State=UNKNOWN
PartitionName=check Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF

started=()
stop() {  # the daemons this script started, and nothing else
  for pid in "${started[@]}"; do kill "$pid" 2> /dev/null; done
  sleep 1
}
trap stop EXIT

echo "### starting munged, slurmctld and slurmd"
if ! pgrep -x munged > /dev/null; then
  munged --force --socket="$WORK/munge/munge.socket" --pid-file="$WORK/munge/munged.pid" \
    --log-file="$WORK/log/munged.log" --seed-file="$WORK/munge/seed" || { echo "slurm_check: munged did not start" >&2; exit 2; }
  started+=("$(cat "$WORK/munge/munged.pid")")
  echo "AuthInfo=socket=$WORK/munge/munge.socket" >> "$SLURM_CONF"
fi
slurmctld -f "$SLURM_CONF" && started+=("$(cat "$WORK/slurmctld.pid")")
slurmd -f "$SLURM_CONF" && started+=("$(sleep 1; cat "$WORK/slurmd.pid")")
for _ in $(seq 30); do sinfo -h -o %T 2> /dev/null | grep -q idle && break; sleep 1; done
sinfo -h -o "%P %D %T %C" | grep -q idle || { echo "slurm_check: the node did not come up" >&2; sinfo; exit 2; }
sinfo

cd "$WORK"
wait_for_array() {  # until no task of job $1 is pending or running
  for _ in $(seq 300); do [ -z "$(squeue -h -j "$1" 2> /dev/null)" ] && return 0; sleep 1; done
  echo "slurm_check: job $1 did not end in 5 minutes" >&2; return 1
}
failed=0
check() {  # check WHAT COMMAND...: run, report, remember a failure
  local what=$1; shift
  if "$@"; then echo "### ok: $what"; else echo "### FAILED: $what"; failed=1; fi
}
SWEEP=("$PY" "$REPO/simulate_missing.py" --methods b1 mean_teacher --rates 0 0.4 --seeds 0 1 --epochs 2 --out sweep)

echo; echo "### the documented recipe: commands, a job array, collect"
"${SWEEP[@]}" --dry-run > commands.txt
cat commands.txt
mkdir -p logs
cat > sweep.sbatch <<'EOF'
#!/bin/bash
#SBATCH --cpus-per-task=1
#SBATCH --mem=2G
#SBATCH --time=00:30:00
#SBATCH --output=logs/slurm-%A_%a.log
eval "$(sed -n "${SLURM_ARRAY_TASK_ID}p" commands.txt)"
EOF
N=$(wc -l < commands.txt)
JOB=$(sbatch --parsable --array=1-"$N"%2 sweep.sbatch)
scancel "${JOB}_${N}"  # the last task, cancelled while it waits
echo "submitted array job $JOB with $N tasks, 2 at a time; cancelled task $N"
wait_for_array "$JOB" || failed=1
ls logs
"${SWEEP[@]}" --collect > collect1.txt 2>&1
rc=$?
cat collect1.txt
check "--collect exits 1 and names the cancelled run" test "$rc" = 1 -a "$(grep -c '^missing: ' collect1.txt)" = 1

echo; echo "### resubmit only what is missing, then collect"
"${SWEEP[@]}" --dry-run > commands.txt
cat commands.txt
check "--dry-run lists just the missing run" test "$(wc -l < commands.txt)" = 1
JOB2=$(sbatch --parsable --array=1-"$(wc -l < commands.txt)" sweep.sbatch)
wait_for_array "$JOB2" || failed=1
"${SWEEP[@]}" --collect > collect2.txt 2>&1
rc=$?
tail -n 25 collect2.txt
check "--collect exits 0 with all 8 runs finished" test "$rc" = 0 -a -n "$(grep '8 runs: 8 finished' collect2.txt)"
check "each task's log kept apart (slurm-%A_%a)" test "$(ls logs | wc -l)" -ge "$N"
check "every run recorded 1 thread" test "$(grep -l '"threads": 1' sweep/*/metrics.json | wc -l)" = 8

echo; echo "slurm_check: $([ $failed -eq 0 ] && echo 'every step passed' || echo 'a step FAILED') (work folder $WORK)"
exit $failed
