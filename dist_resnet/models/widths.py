"""Every layer's width, recorded with the weights and rebuilt from that record.

A structurally pruned model (dist_resnet.prune) has fewer channels than its config's `model.width` says, and a
different number in each layer. Its shape is its own, so every file of ours records it (`record`: the input
and output channels of each convolution and linear layer, the channels of each norm), and everything that loads
weights builds the configured model first and then resizes its layers to the record (`rebuild`): train
(model.pretrained, a resume), evaluate, predict, export, explain, the model card and a distillation teacher.
Never a pickled module: the record is a dict of ints, read with the project's weights-only loading.
"""
from __future__ import annotations

import torch
from torch import nn

from ..checkpoint import CheckpointError
from . import HEAD

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)


def record(model: nn.Module) -> dict[str, list[int]]:
    """name -> [in, out] for every conv and linear layer, [channels] for every norm layer."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out[name] = [m.in_channels, m.out_channels]
        elif isinstance(m, nn.Linear):
            out[name] = [m.in_features, m.out_features]
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            out[name] = [m.num_features]
        elif isinstance(m, nn.GroupNorm):
            out[name] = [m.num_channels]
    return out


def _param(old: nn.Parameter | None, *shape: int) -> nn.Parameter | None:
    return None if old is None else nn.Parameter(old.new_empty(shape), requires_grad=old.requires_grad)


def _conv(m: nn.Conv2d, cin: int, cout: int) -> None:
    m.in_channels, m.out_channels = cin, cout
    m.weight = _param(m.weight, cout, cin // m.groups, *m.kernel_size)
    if m.bias is not None:
        m.bias = _param(m.bias, cout)
    nn.Conv2d.reset_parameters(m)


def _linear(m: nn.Linear, cin: int) -> None:
    m.in_features = cin  # the head's outputs are the data's classes: only its inputs follow the record
    m.weight = _param(m.weight, m.out_features, cin)
    m.reset_parameters()


def _norm(m: nn.Module, c: int, name: str, source: str) -> None:
    if isinstance(m, nn.GroupNorm):
        raise CheckpointError(f"{source} records {c} channels for the GroupNorm layer {name} (built with "
                              f"{m.num_channels}): pruned models are BatchNorm models")
    m.num_features = c
    m.weight, m.bias = _param(m.weight, c), _param(m.bias, c)
    if m.running_mean is not None:
        m.running_mean = m.running_mean.new_zeros(c)
        m.running_var = m.running_var.new_ones(c)
    m.reset_parameters()


def rebuild(model: nn.Module, widths: dict | None, source: str) -> nn.Module:
    """`model`, built from its config, with every layer resized to the record `widths` (None: as built).
    CheckpointError, naming `source`, for a record of another model."""
    if not widths:
        return model
    mods = dict(model.named_modules())
    own = record(model)
    foreign = sorted(set(widths) ^ set(own))
    if foreign:
        raise CheckpointError(f"{source} records the widths of another model: {len(foreign)} layers differ "
                              f"(e.g. {foreign[0]}): build it with the model.* settings it was trained with")
    for name, sizes in widths.items():
        if list(sizes) == own[name]:
            continue
        m = mods[name]
        if isinstance(m, nn.Conv2d):
            _conv(m, *sizes)
        elif isinstance(m, nn.Linear):
            if name != HEAD:
                raise CheckpointError(f"{source} records another width for the linear layer {name}")
            _linear(m, sizes[0])
        else:
            _norm(m, sizes[0], name, source)
    return model


def kept_share(widths: dict | None, config: dict | None) -> float | None:
    """The share of its conv channels (outputs) a file's record keeps of the model its own training config builds:
    a pruned model's, whose shape a fine-tune takes over; None where it keeps them all (an unpruned file's record is
    its config's) or the file has no record."""
    if not widths or not config:
        return None
    from . import build_model

    m = config["model"]
    with torch.device("meta"):
        full = record(build_model(m["name"], widths.get(HEAD, [0, 1])[1], m["width"], m["norm"],
                                  m.get("residual", False), m.get("blurpool", False)))
    convs = [k for k, v in full.items() if len(v) == 2 and k != HEAD]
    kept, total = sum(widths[k][1] for k in convs), sum(full[k][1] for k in convs)
    return None if kept == total else kept / total


def flops(model: nn.Module, size: tuple[int, int]) -> int:
    """Forward FLOPs of one image (torch's counter: 2 per multiply-add of the convolutions and linear layers)."""
    from torch.utils.flop_counter import FlopCounterMode

    p = next(model.parameters())
    was = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, *size, dtype=p.dtype, device=p.device))
    model.train(was)
    return int(counter.get_total_flops())


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
