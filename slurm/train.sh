#!/usr/bin/env bash
# Multi-node training under Slurm that survives preemption and the wall-time limit.
#   sbatch slurm/train.sh                                      # defaults below
#   sbatch --nodes=2 --gpus-per-node=8 slurm/train.sh train.epochs=80
#   CONFIG=configs/resnet9.yaml DATA_DIR=/shared/cifar10 sbatch --partition=gpu --account=me slurm/train.sh
#   CONFIG=configs/cpu.yaml sbatch --nodes=2 --gpus-per-node=0 slurm/train.sh   # CPU nodes: 1 process each
# Partition and account are sbatch options (or SBATCH_PARTITION / SBATCH_ACCOUNT). On a partition without
# GPUs, the #SBATCH --gpus-per-node line below is a gres error: override it with --gpus-per-node=0 (one
# process per node, gloo; NPROC_PER_NODE=N for more). Several network interfaces: export
# GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME before sbatch (they reach every node; the first line says them).
#
# Two signals, two meanings:
# - USR1: the time-limit warning (--signal=B:USR1@120, to this shell only). The trap writes
#   RUN_DIR/STOP; every rank sees it within train.stop_check_every steps (or at the epoch's end),
#   all stop after the same step, rank 0 saves a checkpoint, and this script requeues the job. The
#   requeued job has the same SLURM_JOB_ID, hence the same RUN_DIR, and resumes from the saved step.
# - TERM: `scancel`, or a preemption. The ranks checkpoint and stop the same way, but the job is NOT
#   requeued: scancel must cancel. Where a site preempts with PreemptMode=REQUEUE, Slurm requeues
#   the job itself, and it resumes from that checkpoint.
# torchrun itself is never sent USR1: it would die of it.
#
# How a job ends: torchrun turns every worker's failure into its own exit 1, so the trainer also writes its
# outcome to a file ($DIST_RESNET_OUTCOME, below), and this script decides from that:
# - finished (0): COMPLETED. Diverged (3) or a bad input the check missed (2): FAILED with that code, never
#   requeued (another attempt would only repeat it).
# - stopped on request with a checkpoint (75) without a signal from Slurm (`touch RUN_DIR/STOP`, a signal
#   sent to the ranks): COMPLETED, not requeued; resume by submitting again with the same RUN_DIR.
# - the time-limit warning (USR1): requeued, resumes from the checkpoint. scancel (TERM): CANCELLED.
# - no outcome at all (a node lost, a rank killed or hung): requeued, at most MAX_FAILURE_REQUEUES times.
#SBATCH --job-name=dist_resnet
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=01:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -uo pipefail

CONFIG=${CONFIG:-configs/resnet18.yaml}
DATA_DIR=${DATA_DIR:-data/cifar10}
RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME:-dist_resnet}-${SLURM_JOB_ID:?not inside a Slurm job}}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}}
GPUS_PER_NODE=${GPUS_PER_NODE##*:}   # "h100:8" -> "8"
# processes per node: one per GPU; on a CPU node (no GPU allocated) one, or NPROC_PER_NODE
if [ -n "${NPROC_PER_NODE:-}" ]; then
  NPROC=$NPROC_PER_NODE
elif [ "$GPUS_PER_NODE" -gt 0 ] 2>/dev/null; then
  NPROC=$GPUS_PER_NODE
else
  NPROC=1
fi
if ! [ "$NPROC" -ge 1 ] 2>/dev/null; then
  echo "error: $NPROC processes per node: set NPROC_PER_NODE (CPU nodes) or --gpus-per-node to 1 or more" >&2
  exit 2
fi
MASTER_PORT=${MASTER_PORT:-29500}
# torch.compile's caches (FX graphs, Triton kernels, autotuning results) on the shared filesystem, so a
# requeued or later job skips most of the compile on any node (torch's default /tmp is node-local)
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/.cache/torchinductor}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
NNODES=${SLURM_NNODES:-1}

# every check the run makes before it starts (the config against the data, this machine and the world size; the
# resume point; the run folder free), made here first: a mistake is one line and exit 2 (and no requeue), not
# torchrun's 25-line report from every node
python -m dist_resnet.train --check --world-size $(( NNODES * NPROC )) --config "$CONFIG" data.dir="$DATA_DIR" \
  run.dir="$RUN_DIR" train.resume=true "$@" >/dev/null || exit

mkdir -p "$RUN_DIR"
# where the ranks record the outcome (a shared path: any node's rank 0 may write it); this attempt's own
OUTCOME=$(realpath -m "$RUN_DIR")/.outcome-$SLURM_JOB_ID
export DIST_RESNET_OUTCOME=$OUTCOME
rm -f "$OUTCOME"
# a stop request belongs to the attempt it was made for: one left by a previous attempt (whose node died
# before its trainer read it, say: Slurm then TERMs this script, whose trap writes STOP after the trainer
# is gone) would stop the resumed run at once
rm -f "$RUN_DIR/STOP"
echo "$(date -Is) job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $NNODES node(s) x $NPROC process(es)" \
  "($GPUS_PER_NODE GPUs per node), run dir $RUN_DIR; interfaces: GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-auto}" \
  "NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-auto}"

stop_signal=""
# shellcheck disable=SC2317  # called from the traps below
on_signal() {
  stop_signal=$1
  echo "$(date -Is) got $1: asking the ranks to checkpoint and stop"
  touch "$RUN_DIR/STOP"
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

# --cpus-per-task: srun no longer inherits sbatch's value on every Slurm version (the step would get 1 CPU)
srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" torchrun \
  --nnodes="$NNODES" --nproc_per_node="$NPROC" \
  --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" \
  -m dist_resnet.train --config "$CONFIG" data.dir="$DATA_DIR" run.dir="$RUN_DIR" train.resume=true "$@" &
pid=$!
# a trapped signal interrupts `wait` (status > 128); keep waiting until the job step really ends
while true; do
  wait "$pid"
  rc=$?
  kill -0 "$pid" 2>/dev/null || break
done

# what the trainer recorded: its exit code, and a stop's reason
recorded=""
reason=""
if [ -f "$OUTCOME" ]; then
  IFS=$'\t' read -r recorded reason < <(python -c 'import json, sys; r = json.load(open(sys.argv[1]))
print(r["exit"], r["reason"] or "", sep="\t")' "$OUTCOME" 2>/dev/null)
  rm -f "$OUTCOME"
fi
case "$recorded" in
  0)
    echo "$(date -Is) training finished (torchrun exited $rc)"
    exit 0 ;;
  2)
    echo "$(date -Is) bad input (the error above): not requeueing; fix it and submit again"
    exit 2 ;;
  3)
    echo "$(date -Is) training diverged (the error above): not requeueing; lower optim.lr, or set" \
      "train.nonfinite=rollback, and submit again"
    exit 3 ;;
esac
case "$stop_signal" in
  USR1)
    echo "$(date -Is) time limit near: training stopped with a checkpoint; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0 ;;
  TERM)
    echo "$(date -Is) cancelled, preempted or a node failed: training stopped (with a checkpoint where the ranks" \
      "were alive to write one); not requeueing here (after a node failure Slurm requeues a --requeue job itself)"
    echo "  (resume by hand: RUN_DIR=$RUN_DIR sbatch slurm/train.sh, with the same CONFIG and arguments)"
    exit 143 ;;
esac
if [ "$recorded" = 75 ]; then
  echo "$(date -Is) training stopped on request (${reason:-a stop request}) with a checkpoint: not requeueing;" \
    "resume with: RUN_DIR=$RUN_DIR sbatch slurm/train.sh, with the same CONFIG and arguments"
  exit 0
fi
# No outcome recorded: a failure that another attempt need not repeat (a node lost or hung, a rank killed, an
# unexpected error) requeues the job, which resumes from the last checkpoint; at most MAX_FAILURE_REQUEUES times
# over the run (counted in RUN_DIR/.failure-requeues).
failures=$(cat "$RUN_DIR/.failure-requeues" 2>/dev/null || echo 0)
if [ "$rc" -ne 0 ] && [ "$failures" -lt "${MAX_FAILURE_REQUEUES:-3}" ]; then
  echo $(( failures + 1 )) > "$RUN_DIR/.failure-requeues"
  echo "$(date -Is) training failed (exit $rc, no outcome recorded: a node lost, hung or killed?); requeueing job" \
    "$SLURM_JOB_ID (failure requeue $(( failures + 1 )) of ${MAX_FAILURE_REQUEUES:-3}); it resumes from the last checkpoint"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
echo "$(date -Is) training exited with $rc"
exit "$rc"
