"""Speed benchmarks that measure exactly what a training run does.

    python -m dist_resnet.bench throughput --config configs/resnet18.yaml data.dir=DIR [--ablate] [--breakdown]
    python -m dist_resnet.bench throughput --config configs/cpu.yaml data.dir=DIR --compare train.precision=fp32,bf16
    python -m dist_resnet.bench loader     --config configs/resnet18.yaml data.dir=DIR
    python -m dist_resnet.bench tta        --config configs/resnet9.yaml  data.dir=DIR --target 0.9 --seeds 5
    python -m dist_resnet.bench profile    --config configs/cpu.yaml data.dir=DIR --steps 20 --out DIR/profile.json
    python -m dist_resnet.bench report     --data DIR --out DIR [--budget-s S]
    python -m dist_resnet.bench compress   --data DIR --out DIR [--seeds 2] [--ratios 0.3,0.5]

Each measurement takes the same `--config` and `key=value` overrides as `dist_resnet.train` (also under
torchrun). Warm-up (numba, torch.compile, cudnn autotune) is timed apart and excluded; steady state is
timed with CUDA events on GPU. Output: a Markdown table on stdout and JSON (--out). `report` runs the set
of measurements this project publishes (GPU or CPU), each in its share of one time budget, and writes
report.md and report.json. A benchmark reports; it never fails on a time.
"""
from __future__ import annotations

from .cli import main as _main
from .measure import (ABLATIONS, Deadline, Timer, ablation, breakdown, loader, mean_std, peak_tflops, table,
                      throughput, train_flops_per_image, tta)


def main(argv: list[str] | None = None) -> dict:
    return _main(argv, __doc__)


__all__ = ["ABLATIONS", "Deadline", "Timer", "ablation", "breakdown", "loader", "main", "mean_std", "peak_tflops",
           "table", "throughput", "train_flops_per_image", "tta"]
