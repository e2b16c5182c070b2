#!/usr/bin/env bash
# The one device call: the GPU report (issue 26), then the GPU-only test. Run from the repo root, with .gpu/
# holding the ffcv and omegaconf wheels and cifar10-jpeg.tar.gz (../shared/GPU.md).
set -u
T0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 -c "import torch, ffcv, omegaconf; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'ffcv', ffcv.__version__)"
[ -f .gpu/data/manifest.json ] || python3 -m dist_resnet.data.prepare --source .gpu/cifar10-jpeg.tar.gz --out .gpu/data 2>&1 | tail -2
echo "set-up took $(( $(date +%s) - T0 )) s"
python3 -m dist_resnet.bench report --data .gpu/data --out /tmp/report --budget-s "${BUDGET:-440}"
cp /tmp/report/report.md /tmp/report/report.json "$OUT"/
tar czf "$OUT"/parts.tgz -C /tmp/report parts
echo "report done at $(( $(date +%s) - T0 )) s"
timeout "${TEST_S:-70}" python3 -m pytest -q -p no:cacheprovider tests/test_train.py -k no_host_sync 2>&1 | tail -5
echo "all done at $(( $(date +%s) - T0 )) s"
