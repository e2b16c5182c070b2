#!/usr/bin/env bash
# Train on every GPU of this machine (torchrun, one process per GPU), or with the
# cpu preset when there is none. Extra arguments are key=value config overrides.
#   launch/single_node.sh train.epochs=10
# Environment: CONFIG (preset), DATA_DIR (betons), RUN_DIR (output), NPROC (processes).
set -euo pipefail
DATA_DIR=${DATA_DIR:-data/cifar10}
NGPU=$(python -c 'import torch; print(torch.cuda.device_count())')
if [ "$NGPU" -gt 0 ]; then
  CONFIG=${CONFIG:-configs/resnet18.yaml}
else
  CONFIG=${CONFIG:-configs/cpu.yaml}
fi
NPROC=${NPROC:-$(( NGPU > 0 ? NGPU : 1 ))}
RUN_DIR=${RUN_DIR:-runs/$(basename "$CONFIG" .yaml)-$(date +%Y%m%d-%H%M%S)}
# every check the run makes before it starts, made here first: a mistake is one line and exit 2, not torchrun's
# 25-line report
python -m dist_resnet.train --check --world-size "$NPROC" --config "$CONFIG" data.dir="$DATA_DIR" run.dir="$RUN_DIR" \
  "$@" >/dev/null || exit
echo "training $CONFIG on $NPROC process(es) ($NGPU GPUs) -> $RUN_DIR"
exec torchrun --standalone --nproc_per_node="$NPROC" -m dist_resnet.train \
  --config "$CONFIG" data.dir="$DATA_DIR" run.dir="$RUN_DIR" "$@"
