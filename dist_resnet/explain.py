"""Why a model decided what it did: Grad-CAM heat maps (Selvaraju et al., 2017) with captum.

captum is PyTorch's own interpretability library, kept by the PyTorch team; its `LayerGradCam` takes any
module of any model as the layer, so one code path serves every model family here. (grad-cam, the other
well-kept choice, wants a reshape function per architecture and its own wrappers.) The layer is the last
module of the model's last stage (`stage_modules()`): the last residual block of the CIFAR and torchvision
ResNets, resnet9's last residual pair, fastnet's last stage, whatever its resolution.

- `predict --explain OUT_DIR`: per image, the image, the heat map of the predicted class (or
  `--explain-class NAME`) overlaid, and the top-k labels, as OUT_DIR/<file name>.png.
- `evaluate --mistakes PNG`: the test set's most confident mistakes, overall or of one true class, in a
  grid: image with heat map, true and predicted label, confidence.
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .plot import _pyplot, save_figure


def target_layer(model: nn.Module) -> nn.Module:
    """The last module of the last stage: the default Grad-CAM layer of every model family."""
    net = model.net if hasattr(model, "size") and hasattr(model, "net") else model  # behind data.resize
    return net.stage_modules()[-1][1][-1]


class GradCam:
    """Heat maps in [0, 1] at the input's size: captum's LayerGradCam at `layer`, ReLU'd, upsampled."""

    def __init__(self, model: nn.Module, layer: nn.Module | None = None):
        from captum.attr import LayerGradCam

        self.model = model.eval()
        self.cam = LayerGradCam(self.forward, layer or target_layer(model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # fp32 gradients, whatever the caller's autocast
            return self.model(x.float()).float()

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from captum.attr import LayerAttribution

        with torch.enable_grad():
            attr = self.cam.attribute(x.float(), target=target.tolist(), relu_attributions=True)
        heat = LayerAttribution.interpolate(attr.detach().float(), tuple(x.shape[-2:]), "bilinear")[:, 0]
        heat = heat.clamp(min=0)
        peak = heat.flatten(1).amax(1).clamp(min=1e-12).view(-1, 1, 1)
        return (heat / peak).cpu()


def _show(ax, image: np.ndarray, heat: np.ndarray | None, title: str, size: float):
    h, w = image.shape[:2]
    ax.imshow(image, interpolation="nearest" if max(h, w) < 128 else "antialiased", extent=(0, w, h, 0))
    shown = None
    if heat is not None:
        shown = ax.imshow(heat, cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="bilinear",
                          extent=(0, w, h, 0))
    ax.set_title(title, fontsize=size)
    ax.set_xticks([])
    ax.set_yticks([])
    return shown


def overlay(path: str | Path, image: np.ndarray, heat: np.ndarray, top: list[tuple[str, float]],
            explained: str) -> Path:
    """One image: itself, its heat map for `explained` overlaid, and the top-k labels beside."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.4), gridspec_kw={"width_ratios": [1, 1, 0.9], "wspace": 0.45})
    _show(axes[0], image, None, "image", 10)
    shown = _show(axes[1], image, heat, f"Grad-CAM: {explained}", 10)
    fig.colorbar(shown, ax=axes[1], fraction=0.046, pad=0.03).set_label("heat / peak", fontsize=8)
    axes[2].axis("off")
    lines = "\n".join(f"{i + 1}. {c}  {p:.1%}" for i, (c, p) in enumerate(top))
    axes[2].text(0.0, 0.95, f"top {len(top)}\n\n{lines}", va="top", ha="left", fontsize=10, family="monospace",
                 transform=axes[2].transAxes)
    fig.suptitle(Path(path).stem, fontsize=9)
    return save_figure(fig, path)


def grid(path: str | Path, cells: list[dict], title: str, columns: int = 4) -> Path:
    """Images with heat maps in a grid; each cell: {"image", "heat", "label"}."""
    plt = _pyplot()
    rows = max(1, -(-len(cells) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 3.1 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, cell in zip(axes.flat, cells):
        ax.axis("on")
        _show(ax, cell["image"], cell["heat"], cell["label"], 8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)


def to_pixels(x: torch.Tensor, mean: list[float], std: list[float]) -> np.ndarray:
    """Normalised N x 3 x H x W back to uint8 N x H x W x 3, for display."""
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    rgb = (x.float().cpu() * s + m).clamp(0, 1).permute(0, 2, 3, 1)
    return (rgb.numpy() * 255).round().astype(np.uint8)


@torch.no_grad()
def mistakes(model: nn.Module, batches, mean: list[float], std: list[float], classes: list[str], count: int,
             true_class: int | None = None, autocast=nullcontext) -> list[dict]:
    """The `count` most confident mistakes over `batches` of (normalised x, y) (of one true class, if
    given), with their Grad-CAM heat maps for the predicted class. The mistakes are found as evaluation
    finds them, under the run's `autocast` (batches of a bf16 or fp16 run come in that dtype); the heat
    maps are computed in fp32."""
    found: list[tuple[float, torch.Tensor, int, int]] = []
    for x, y in batches:
        with autocast():
            probs = torch.softmax(model(x).float(), 1)
        conf, pred = probs.max(1)
        wrong = (pred != y) & ((y == true_class) if true_class is not None else torch.ones_like(y, dtype=torch.bool))
        for i in wrong.nonzero().flatten().tolist():
            found.append((conf[i].item(), x[i].cpu(), int(y[i]), int(pred[i])))
        found = sorted(found, key=lambda f: -f[0])[:count]
    if not found:
        return []
    x = torch.stack([f[1] for f in found])
    heat = GradCam(model)(x.to(next(model.parameters()).device), torch.tensor([f[3] for f in found])).numpy()
    pixels = to_pixels(x, mean, std)
    return [{"image": pixels[i], "heat": heat[i], "confidence": c, "true": classes[t], "pred": classes[p],
             "label": f"true {classes[t]}\npred {classes[p]} {c:.0%}"} for i, (c, _, t, p) in enumerate(found)]
