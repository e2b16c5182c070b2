#!/usr/bin/env bash
# Manual multi-node training: run this same command on every node.
#   MASTER_ADDR=node0.example NNODES=2 launch/multi_node.sh train.epochs=40
# Environment:
#   MASTER_ADDR  rendezvous host (any one of the nodes)   (required)
#   MASTER_PORT  rendezvous port                           (default 29500)
#   NNODES       number of nodes                           (default 1)
#   NPROC        processes per node                        (default: GPUs on this node, or 1)
#   RDZV_ID      a job id shared by all nodes, unique per job (default: derived from RUN_DIR)
#   CONFIG, DATA_DIR, RUN_DIR as for launch/single_node.sh; RUN_DIR must be on a shared filesystem.
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
# the config and data checked here first: a mistake is one line and exit 2, not torchrun's 25-line report
python -m dist_resnet.train --check --config "$CONFIG" data.dir="$DATA_DIR" run.dir="$RUN_DIR" "$@" >/dev/null || exit
echo "node $(hostname): $NPROC process(es), $NNODES node(s), rendezvous $MASTER_ADDR:$MASTER_PORT id $RDZV_ID"
exec torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$RDZV_ID" \
  -m dist_resnet.train --config "$CONFIG" data.dir="$DATA_DIR" run.dir="$RUN_DIR" train.resume=true "$@"
