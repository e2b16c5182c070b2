#!/usr/bin/env bash
# A hyper-parameter sweep as a Slurm job array: every array task is one worker of the same Optuna study.
#   SWEEP_STORAGE=postgresql://user:pw@db-host/sweeps sbatch --array=0-7 slurm/sweep.sh \
#       --trials 32 --space 'optim.lr=log(0.05,2)' --space 'optim.weight_decay=choice(5e-4,1e-3)' \
#       data.val_fraction=0.1 train.epochs=10
# Arguments go to python -m dist_resnet.sweep. CONFIG, DATA_DIR, SWEEP_DIR and STUDY come from the
# environment. Several array tasks (nodes) share a study through an RDB (SWEEP_STORAGE=postgresql://...) or
# through SWEEP_DIR's journal file on a shared filesystem (SWEEP_STORAGE=journal); one task alone uses that file.
#
# Signals, as in slurm/train.sh:
# - USR1, the time-limit warning (--signal=B:USR1@180): the running trials checkpoint and stop, are
#   queued in the study to resume from their checkpoints, and this array task is requeued.
# - TERM (scancel, a preemption): the same, without the requeue; another worker resumes the queued trials.
#SBATCH --job-name=sweep
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%A_%a.out
set -uo pipefail

JOB=${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:?not inside a Slurm job}}
TASK=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID:-0}}
TASK=${TASK:-$SLURM_JOB_ID}
CONFIG=${CONFIG:-configs/resnet18.yaml}
DATA_DIR=${DATA_DIR:-data/cifar10}
STUDY=${STUDY:-${SLURM_JOB_NAME:-sweep}-$JOB}
SWEEP_DIR=${SWEEP_DIR:-sweeps/$STUDY}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/.cache/torchinductor}
# SWEEP_STORAGE=journal: the tasks share SWEEP_DIR/study.journal (Optuna's journal file, which locks with a
# symlink, as NFS allows); SWEEP_DIR must be on a filesystem every node shares
journal=""
if [ "${SWEEP_STORAGE:-}" = journal ]; then
  journal=1
  unset SWEEP_STORAGE
fi
if [ "${SLURM_ARRAY_TASK_COUNT:-1}" -gt 1 ] && [ -z "${SWEEP_STORAGE:-}" ] && [ -z "$journal" ]; then
  echo "slurm/sweep.sh: error: $SLURM_ARRAY_TASK_COUNT array tasks share one study: set SWEEP_STORAGE to an RDB URL" \
       "(e.g. postgresql://user:pw@db-host/sweeps), or SWEEP_STORAGE=journal to share SWEEP_DIR's journal file" \
       "(SWEEP_DIR on a filesystem every node shares)" >&2
  exit 2
fi

mkdir -p "$SWEEP_DIR"
echo "$(date -Is) sweep task $TASK (restart ${SLURM_RESTART_COUNT:-0}): study $STUDY in $SWEEP_DIR"

stop_signal=""
pid=""
# shellcheck disable=SC2317  # called from the traps below
on_signal() {
  stop_signal=$1
  echo "$(date -Is) got $1: asking the running trials to checkpoint and stop"
  [ -n "$pid" ] && kill -"$1" "$pid" 2>/dev/null
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

# --cpus-per-task: srun no longer inherits sbatch's value on every Slurm version (the step would get 1 CPU)
srun --ntasks=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" python -m dist_resnet.sweep --config "$CONFIG" \
  --study "$STUDY" --out "$SWEEP_DIR" \
  data.dir="$DATA_DIR" "$@" &
pid=$!
while true; do
  wait "$pid"
  rc=$?
  kill -0 "$pid" 2>/dev/null || break
done

case "$stop_signal" in
  USR1)
    echo "$(date -Is) time limit near: trials checkpointed and queued to resume; requeueing task $TASK"
    scontrol requeue "$TASK"
    exit 0 ;;
  TERM)
    echo "$(date -Is) cancelled or preempted: trials checkpointed and queued to resume; not requeueing"
    exit 143 ;;
esac
echo "$(date -Is) sweep worker exited with $rc"
exit "$rc"
