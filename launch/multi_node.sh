#!/usr/bin/env bash
# Manual multi-node training: run this same command on every node.
#   MASTER_ADDR=node0.example NNODES=2 launch/multi_node.sh train.epochs=40
#   MASTER_ADDR=node0.example NNODES=1:2 MAX_RESTARTS=3 launch/multi_node.sh train.epochs=40   # elastic
# Environment:
#   MASTER_ADDR  rendezvous host (any one of the nodes)   (required)
#   MASTER_PORT  rendezvous port                           (default 29500)
#   NNODES       number of nodes, or MIN:MAX (elastic)    (default 1)
#   MAX_RESTARTS restarts of the worker group after a failure (default 0; elastic: 3)
#   NPROC        processes per node                        (default: GPUs on this node, or 1)
#   RDZV_ID      a job id shared by all nodes, unique per job (default: derived from RUN_DIR)
#   RDZV_CONF    torchrun's --rdzv-conf (e.g. last_call_timeout=5,join_timeout=300)
#   CONFIG, DATA_DIR, RUN_DIR as for launch/single_node.sh; RUN_DIR must be on a shared filesystem.
# Elastic (NNODES=MIN:MAX): when a node dies, the others restart their workers, which resume from the last
# checkpoint at the smaller world size; a node started later joins, and all restart at the larger one
# (docs/DISTRIBUTED.md, "Many nodes"). Each restart loses the steps since the last checkpoint:
# train.checkpoint_every bounds that.
set -euo pipefail
: "${MASTER_ADDR:?set MASTER_ADDR to the rendezvous host (one of the nodes)}"
MASTER_PORT=${MASTER_PORT:-29500}
NNODES=${NNODES:-1}
CONFIG=${CONFIG:-configs/resnet18.yaml}
DATA_DIR=${DATA_DIR:-data/cifar10}
RUN_DIR=${RUN_DIR:?set RUN_DIR to a folder on a filesystem all nodes share}
NGPU=$(python -c 'import torch; print(torch.cuda.device_count())')
NPROC=${NPROC:-$(( NGPU > 0 ? NGPU : 1 ))}
RDZV_ID=${RDZV_ID:-$(printf '%s' "$RUN_DIR" | cksum | cut -d' ' -f1)}
# every check the run makes before it starts, made here first, at both ends of an elastic range: a mistake is
# one line and exit 2, not torchrun's 25-line report
python -m dist_resnet.train --check --world-size $(( ${NNODES%%:*} * NPROC )) $(( ${NNODES##*:} * NPROC )) \
  --config "$CONFIG" data.dir="$DATA_DIR" run.dir="$RUN_DIR" train.resume=true "$@" >/dev/null || exit
echo "node $(hostname): $NPROC process(es), $NNODES node(s), rendezvous $MASTER_ADDR:$MASTER_PORT id $RDZV_ID"
MAX_RESTARTS=${MAX_RESTARTS:-$([ "${NNODES#*:}" != "$NNODES" ] && echo 3 || echo 0)}
# torch >= 2.4 shares the rendezvous store's TCP server with the workers' process group: a node that joins
# after a failure then waits 60 s and every agent exits 1 ("DistStoreError ... MASTER_ADDR"; pytorch#147064).
# A store of its own for the rendezvous makes the rejoin work.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
exec torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC" --max-restarts="$MAX_RESTARTS" \
  ${RDZV_CONF:+--rdzv-conf="$RDZV_CONF"} \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$RDZV_ID" \
  -m dist_resnet.train --config "$CONFIG" data.dir="$DATA_DIR" run.dir="$RUN_DIR" train.resume=true "$@"
