"""torchvision's ImageNet ResNets (stride-4 stem with max-pool), for fine-tuning from pretrained weights.

The state-dict keys are torchvision's own, so torchvision's `.pth` files and the `torchvision` weights
enums load directly; the head `fc` is built for the dataset's classes. Inputs smaller than about 128 px
lose most of their detail in the stem: upsample them with `data.resize` (configs/finetune.yaml: 224).
torchvision is imported when one of these is built (1.5 s here), not by every command that checks a config.
"""
from __future__ import annotations

import functools

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


def build(name: str, num_classes: int, norm: Norm) -> nn.Module:
    from torchvision.models import resnet

    block, layers, _ = ARCHS[name]
    return resnet_class()(getattr(resnet, block), layers, num_classes=num_classes, norm_layer=norm)


def default_weights(name: str):
    """torchvision's default ImageNet weights enum entry for `name` (e.g. ResNet50_Weights.DEFAULT)."""
    import torchvision.models as tvm

    return getattr(tvm, ARCHS[name][2]).DEFAULT
