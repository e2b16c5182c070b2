"""torchvision's ImageNet ResNets (stride-4 stem with max-pool), for fine-tuning from pretrained weights.

The state-dict keys are torchvision's own, so torchvision's `.pth` files and the `torchvision` weights
enums load directly; the head `fc` is built for the dataset's classes. Inputs smaller than about 128 px
lose most of their detail in the stem: upsample them with `data.resize` (configs/finetune.yaml: 224).
torchvision is imported when one of these is built (1.5 s here), not by every command that checks a config.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from .layers import Norm

# model name -> (torchvision's block, layers, weights enum name)
ARCHS = {
    "tv_resnet18": ("BasicBlock", [2, 2, 2, 2], "ResNet18_Weights"),
    "tv_resnet34": ("BasicBlock", [3, 4, 6, 3], "ResNet34_Weights"),
    "tv_resnet50": ("Bottleneck", [3, 4, 6, 3], "ResNet50_Weights"),
}


@functools.cache
def resnet_class() -> type:
    """torchvision.models.ResNet, plus the stage list that freezing and layer-wise LR decay use."""
    from torchvision.models import resnet

    class TVResNet(resnet.ResNet):
        def stage_modules(self) -> list[tuple[str, list[nn.Module]]]:
            """stem (conv1, bn1), layer1..4; the head is `fc`."""
            return [("stem", [self.conv1, self.bn1]), ("layer1", [self.layer1]), ("layer2", [self.layer2]),
                    ("layer3", [self.layer3]), ("layer4", [self.layer4])]

    return TVResNet


@functools.cache
def block_classes() -> dict[str, type]:
    """torchvision's BasicBlock and Bottleneck with a `drop_path` on the branch (model.drop_path): the same
    modules and keys, so torchvision's weights load."""
    from torchvision.models import resnet

    def branch_forward(last: str):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            if last == "bn3":
                out = self.bn3(self.conv3(self.relu(out)))
            return self.relu(self.drop_path(out) + identity)
        return forward

    def init(base: type):
        def __init__(self, *args, **kwargs):
            base.__init__(self, *args, **kwargs)
            self.drop_path = nn.Identity()
        return __init__

    return {name: type(name, (base,), {"__init__": init(base), "forward": branch_forward(last)})
            for name, base, last in (("BasicBlock", resnet.BasicBlock, "bn2"), ("Bottleneck", resnet.Bottleneck, "bn3"))}


def build(name: str, num_classes: int, norm: Norm) -> nn.Module:
    block, layers, _ = ARCHS[name]
    return resnet_class()(block_classes()[block], layers, num_classes=num_classes, norm_layer=norm)


class BlurConv2d(nn.Conv2d):
    """A strided convolution that first blurs its input with a 3x3 binomial filter, per channel (BlurPool,
    Zhang 2019, as FFCV's ResNet-50 recipe applies it). Its keys are the convolution's own (the filter is
    not saved), so torchvision's weights load into it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blur = self.blur_filter.to(x.dtype).expand(self.in_channels, 1, 3, 3)
        return super().forward(nn.functional.conv2d(x, blur, padding=1, groups=self.in_channels))


def apply_blurpool(model: nn.Module) -> int:
    """Every strided convolution of 16 or more input channels becomes a BlurConv2d (FFCV's rule); how many."""
    n = 0
    for conv in model.modules():
        if type(conv) is nn.Conv2d and max(conv.stride) > 1 and conv.in_channels >= 16:
            conv.__class__ = BlurConv2d
            k = torch.tensor([1.0, 2.0, 1.0], device=conv.weight.device)
            conv.register_buffer("blur_filter", (k[:, None] * k[None, :] / 16).view(1, 1, 3, 3), persistent=False)
            n += 1
    return n


def default_weights(name: str):
    """torchvision's default ImageNet weights enum entry for `name` (e.g. ResNet50_Weights.DEFAULT)."""
    import torchvision.models as tvm

    return getattr(tvm, ARCHS[name][2]).DEFAULT
