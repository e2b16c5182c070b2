"""Exact rewrites of a trained model before its ONNX export, so that onnxruntime can fold and quantize more.

- **BN and ReLU before a max-pool.** resnet9's downsampling blocks are conv -> MaxPool -> BN -> ReLU. The
  exporter folds a BatchNorm into the convolution right before it, but not across a pool, so these stay as
  float BatchNormalization nodes: in an int8 graph, each a DequantizeLinear/QuantizeLinear round trip. An
  eval-mode BN is a per-channel map x * s + b, and with every s >= 0 it is non-decreasing, as ReLU is; a
  max-pool commutes with any non-decreasing per-channel map (max f(x) = f(max x), also in floating point, as
  rounding is monotone). So where every scale is >= 0 the block becomes conv -> BN -> ReLU -> MaxPool, the BN
  folds into the conv, and the values are the same. A block with a negative scale is left as it is.
- **The global max as a MaxPool.** AdaptiveMaxPool2d(1) exports as ReduceMax, which onnxruntime has no int8
  kernel for. The export's image size is fixed (only the batch is dynamic), so the map it sees has a fixed
  size, and a MaxPool2d over all of it computes the same, with an int8 kernel.

Measured (docs/BENCHMARKS.md, "int8 that pays"): the int8 graph of the cpu preset's resnet9 has no float
operator left but the input's normalisation, and runs 1.2-1.3x faster than without these rewrites; the
fp32 graph gains 1.06-1.2x. The export still checks its graph against the model as trained.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    """The per-channel factor of an eval-mode BatchNorm."""
    w = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
    return w / torch.sqrt(bn.running_var + bn.eps)


def pool_after_activation(model: nn.Module) -> int:
    """conv -> MaxPool -> BN -> ReLU as conv -> BN -> ReLU -> MaxPool, in place, where every BN scale is
    >= 0. Returns how many blocks were rewritten."""
    done = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        kinds = [type(m) for m in seq]
        if kinds == [nn.Conv2d, nn.MaxPool2d, nn.BatchNorm2d, nn.ReLU] and seq[2].running_var is not None:
            if bool((bn_scale(seq[2]) >= 0).all()):
                conv, pool, bn, relu = list(seq)
                for i, m in enumerate([conv, bn, relu, pool]):
                    seq[i] = m
                done += 1
    return done


def global_max_as_pool(model: nn.Module, size: tuple[int, int]) -> int:
    """Each AdaptiveMaxPool2d(1) as a MaxPool2d over the map it sees for a size[0] x size[1] input, in place.
    Returns how many were rewritten."""
    seen: dict[nn.Module, tuple[int, int]] = {}
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.__setitem__(m, tuple(a[0].shape[-2:])))
             for m in model.modules() if isinstance(m, nn.AdaptiveMaxPool2d) and m.output_size in (1, (1, 1))]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, *size))
    finally:
        for h in hooks:
            h.remove()
    done = 0
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if child in seen:
                setattr(parent, name, nn.MaxPool2d(seen[child]))
                done += 1
    return done


def for_export(model: nn.Module, size: tuple[int, int]) -> tuple[nn.Module, list[str]]:
    """A copy of the eval-mode `model` that computes the same for size[0] x size[1] inputs, rewritten for
    onnxruntime; and what was rewritten, in words (empty: the copy is unchanged)."""
    model = copy.deepcopy(model).eval()
    notes = []
    if n := pool_after_activation(model):
        notes.append(f"{n} max-pool(s) moved after their BatchNorm and ReLU (every BN scale >= 0), so the BNs "
                     "fold into the convolutions")
    if n := global_max_as_pool(model, size):
        notes.append(f"{n} global max (AdaptiveMaxPool2d) as a MaxPool over the fixed feature map (onnxruntime "
                     "quantizes a MaxPool, not a ReduceMax)")
    return model, notes
