"""Structured pruning: remove whole channels from a trained model, so that it really is smaller and faster.

    python -m dist_resnet.prune runs/teacher/best.pt --ratio 0.45 --out pruned.pt [data.dir=DIR]
        [--importance l1|l2|taylor] [--scope global|layer] [--round-to 8] [--batches 8] [--ema]

Torch-Pruning (Fang et al., CVPR 2023) traces the net and groups every layer whose channels depend on each
other (a convolution, its norm, the next layer's inputs, both sides of a residual addition) and removes the
share `--ratio` of the prunable channels, group by group, by the importance named:

- `l1`/`l2`: the magnitude of each channel's weights across its group;
- `taylor`: |weight x gradient| on `--batches` batches of train images (first-order Taylor, Molchanov et al.);
- `--scope layer`: the share in every layer; `global`: the least important channels anywhere (layers differ).

The classification head keeps its outputs (the classes); a frozen stem (fastnet's whitening) keeps its own.
Each layer keeps a multiple of `--round-to` channels (8: what CPU vector units and int8 kernels like).

It prints the parameters, FLOPs and test accuracy before and after, and writes a checkpoint of the pruned model
that records every layer's width (dist_resnet.models.widths): it fine-tunes like any other file
(`model.pretrained=PRUNED.pt`, with `distill.teacher=...` or without), and evaluate, predict, export and explain
open it. The file is read and written without pickled modules (weights-only loading)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import CheckpointError, save_atomic
from .config import ConfigError
from .data.loader import Feed, TestData
from .data.manifest import Betons, DataError
from .engine.evaluation import evaluate
from .fileio import sha256
from .models import HEAD, files
from .models.widths import flops, parameters, record
from .precision import Amp
from .trained import build_trained, open_trained

IMPORTANCES = ("l1", "l2", "taylor")


def arguments() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist_resnet.prune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="one of our checkpoints (.pt) or exported .safetensors")
    p.add_argument("overrides", nargs="*", help="key=value overrides of its config (e.g. data.dir=DIR)")
    p.add_argument("--ratio", type=float, required=True, help="share of the prunable channels to remove, in (0, 1)")
    p.add_argument("--out", required=True, help="the pruned checkpoint to write (.pt; must not exist)")
    p.add_argument("--importance", choices=IMPORTANCES, default="l1", help="channel importance (default l1)")
    p.add_argument("--scope", choices=["global", "layer"], default="layer",
                   help="rank channels across all layers or within each (default layer)")
    p.add_argument("--round-to", type=int, default=8, help="keep a multiple of this many channels per layer")
    p.add_argument("--batches", type=int, default=8, help="--importance taylor: train batches for the gradients")
    p.add_argument("--ema", action="store_true", help="prune the EMA weights (a train.ema=true checkpoint)")
    return p


def check(args) -> None:
    """ConfigError for what cannot make a pruned file; before anything is read."""
    if not 0 < args.ratio < 1:
        raise ConfigError(f"--ratio {args.ratio:g} must lie in (0, 1): the share of the channels to remove")
    if args.round_to < 1 or args.batches < 1:
        raise ConfigError(f"--round-to {args.round_to} and --batches {args.batches} must be >= 1")
    if not args.out.endswith(".pt"):
        raise ConfigError(f"--out {args.out}: the pruned model is a checkpoint; name it *.pt")
    if Path(args.out).exists():
        raise ConfigError(f"--out {args.out} exists: choose another path (nothing is overwritten)")
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        raise ConfigError("pruning needs Torch-Pruning: pip install 'dist_resnet[compress]'") from None


class Measure:
    """Parameters, FLOPs and test accuracy of a net, on the test beton, in the run's precision."""

    def __init__(self, cfg, mf: files.ModelFile, betons: Betons, device: torch.device):
        self.amp = Amp.on(cfg.train.precision, device)
        mean, std = mf.mean or betons.manifest["mean"], mf.std or betons.manifest["std"]
        self.feed = Feed(device, self.amp.input_dtype(cfg.data.fp32_input), False, mean, std)
        self.cfg, self.betons, self.size = cfg, betons, tuple(mf.image_shape or (32, 32))
        self.batch = max(1, min(cfg.train.batch_size, 500))

    def __call__(self, net: torch.nn.Module) -> dict:
        acc = evaluate(net, TestData(self.betons, self.cfg.data, self.feed, self.batch), self.amp)["test_acc"]
        return {"params": parameters(net), "flops": flops(net, self.size), "test_acc": acc}

    def train_batches(self, n: int):
        """The first n batches of train images, without augmentation (Taylor importance's gradients)."""
        import numpy as np

        idx = np.arange(min(n * self.batch, self.betons.count("train")))
        return TestData(self.betons, self.cfg.data, self.feed, self.batch, split="train", indices=idx)


def importance(name: str):
    import torch_pruning as tp

    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    return tp.importance.GroupMagnitudeImportance(p=1 if name == "l1" else 2)


def round_to(net: torch.nn.Module, frozen: list, args) -> int:
    """--round-to, lowered where the narrowest prunable layer would keep fewer channels than it (Torch-Pruning rounds
    what a layer keeps down to the multiple: 4 of 8 channels at --round-to 8 would be none)."""
    narrowest = min(m.out_channels for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m not in frozen)
    keep = int(narrowest * (1 - args.ratio))
    if keep >= args.round_to:
        return args.round_to
    print(f"note: --round-to {args.round_to} lowered to {max(1, keep)}: the narrowest layer ({narrowest} channels) "
          f"keeps {keep} at --ratio {args.ratio:g}")
    return max(1, keep)


def prune(net: torch.nn.Module, args, measure: Measure) -> None:
    """Remove the channels in place (Torch-Pruning), the head's outputs and frozen layers kept."""
    import torch_pruning as tp

    frozen = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and not m.weight.requires_grad]
    example = torch.zeros(1, 3, *measure.size, device=next(net.parameters()).device)
    pruner = tp.pruner.MetaPruner(net, example, importance(args.importance), global_pruning=args.scope == "global",
                                  pruning_ratio=args.ratio, max_pruning_ratio=0.95,
                                  round_to=round_to(net, frozen, args), ignored_layers=[getattr(net, HEAD), *frozen])
    if args.importance == "taylor":
        net.zero_grad()
        for x, y in measure.train_batches(args.batches):
            F.cross_entropy(net(x.float()), y).backward()
    pruner.step()
    net.zero_grad(set_to_none=True)


def pruned_file(mf: files.ModelFile, net: torch.nn.Module, args, before: dict, after: dict) -> dict:
    """The checkpoint of the pruned model: what a trained file of ours holds for loading, and where it came
    from."""
    return {"model": {k: v.detach().cpu() for k, v in net.state_dict().items()}, "widths": record(net),
            "config": mf.config, "classes": mf.classes, "normalize": {"mean": mf.mean, "std": mf.std},
            "image_shape": mf.image_shape, "history": [],
            "pruned": {"source": Path(mf.path).name, "source_sha256": sha256(mf.path), "ratio": args.ratio,
                       "importance": args.importance, "scope": args.scope, "round_to": args.round_to,
                       "ema": args.ema, "before": before, "after": after}}


def main(argv: list[str] | None = None) -> dict:
    args = arguments().parse_intermixed_args(argv)
    try:
        check(args)
        mf, trained, cfg = open_trained(args.checkpoint, args.overrides, args.ema)
        betons = Betons.open(cfg.data.dir, cfg.data.verify)
        net = build_trained(mf, trained, cfg, len(betons.classes)).float()
        if trained.model.norm.value != "batch":
            raise ConfigError(f"{args.checkpoint} is a model.norm={trained.model.norm.value} model: structured "
                              "pruning takes BatchNorm models (GroupNorm's groups would not survive it)")
    except (ConfigError, CheckpointError, DataError) as e:
        print(f"dist_resnet.prune: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    cuda = cfg.train.device.value != "cpu" and torch.cuda.is_available()
    measure = Measure(cfg, mf, betons, torch.device("cuda" if cuda else "cpu"))
    net = net.to(measure.feed.device)
    before = measure(net)
    prune(net, args, measure)
    after = measure(net.eval())
    save_atomic(pruned_file(mf, net, args, before, after), args.out)
    result = {"source": args.checkpoint, "out": args.out, "ratio": args.ratio, "importance": args.importance,
              "scope": args.scope, "before": before, "after": after, "flops_share": after["flops"] / before["flops"]}
    print(f"pruned {args.checkpoint} -> {args.out}: params {before['params']:,} -> {after['params']:,}, FLOPs "
          f"{before['flops'] / 1e6:.1f} M -> {after['flops'] / 1e6:.1f} M ({result['flops_share']:.2f}x), test "
          f"accuracy {before['test_acc']:.4f} -> {after['test_acc']:.4f} (before fine-tuning)")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
