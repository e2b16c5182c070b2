"""MODEL_CARD.md, written by `export` beside every exported file (as timm's hub export writes a README).

Every figure in it comes from the source file (the checkpoint's config, history, data hashes), from the
run's metrics.json beside a checkpoint (the hardware), or from a measurement the export itself made (the
ONNX checks, the test set through the exported graph, the int8 comparison). Nothing is typed in by hand.
"""
from __future__ import annotations

import json
from pathlib import Path

from . import rundir

LIMITATIONS = (
    "- Trained and measured on the data named above only; accuracy on other images (other cameras, sizes, "
    "classes outside the list) is unknown. The shared CIFAR-10 copy this project tests with is re-encoded as "
    "JPEG quality 75, which costs about 3 points against the original PNGs.",
    "- Every input gets one of the classes: there is no 'none of these'. Confidences are not calibrated.",
    "- Small images: objects are 32x32-pixel-scale unless the data said otherwise; larger photos are resized "
    "by `predict`, which loses detail the model never saw.",
)


def run_record(path: str) -> dict:
    """The run's metrics.json beside a checkpoint (its hardware and times), if it is there."""
    return rundir.read_metrics(Path(path).parent) or {}


def _training(mf, cfg) -> list[str]:
    s, record = mf.state, run_record(mf.path)
    hist = s.get("history") or []
    if not hist:
        return ["- Not recorded in the source file (a safetensors export carries the config only)."]
    t = cfg.train
    times = sum(r.get("epoch_time_s", 0.0) for r in hist)
    lines = [f"- {len(hist)} of {t.epochs} epochs, global batch {t.batch_size}, optimizer SGD lr {cfg.optim.lr:g} "
             f"({cfg.optim.schedule.value}), label smoothing {cfg.optim.label_smoothing:g}, seed {t.seed}",
             f"- Hardware: {record.get('device', 'not recorded')} x {s.get('world_size', '?')}, precision "
             f"{record.get('precision', t.precision.value)}; training time {times:.0f} s"]
    evals = [r for r in hist if "test_acc" in r]
    if evals:
        tta = f" (test-time augmentation: {t.tta.value})" if t.tta.value != "none" else ""
        lines.append(f"- Test accuracy at epoch {evals[-1]['epoch']}, as the run measured it{tta}: "
                     f"{evals[-1]['test_acc']:.4f} on {evals[-1].get('test_count', '?')} images")
        robust = [r for r in evals if "test_robust_acc" in r]
        if robust:
            a = cfg.adv
            lines.append(f"- Robust accuracy under PGD (eps {a.eps:g}/255, {a.eval_steps} steps, step {a.eval_alpha:g}/255, "
                         f"{a.eval_restarts} restart(s)): {robust[-1]['test_robust_acc']:.4f}")
    vals = [r for r in hist if "val_acc" in r]
    if vals:
        lines.append(f"- Validation accuracy (held-out train images): {vals[-1]['val_acc']:.4f}")
    lines.append("- The whole config: below.")
    return lines


def _data(mf, cfg) -> list[str]:
    shas = mf.state.get("data") or {}
    manifest = {}
    try:
        manifest = json.loads((Path(cfg.data.dir) / "manifest.json").read_text())
    except (OSError, ValueError):
        pass
    lines = [f"- Source: `{manifest.get('source', cfg.data.dir)}` (betons in `{cfg.data.dir}`)"]
    for split in ("train", "test"):
        count = (manifest.get(split) or {}).get("count", "?")
        lines.append(f"- {split}: {count} images, beton sha256 `{shas.get(split, 'not recorded')}`")
    if cfg.data.val_fraction or cfg.data.folds:
        how = (f"fold {cfg.data.fold} of {cfg.data.folds}" if cfg.data.folds else f"{cfg.data.val_fraction:g}")
        lines.append(f"- Validation split held out of train: {how} (seed {cfg.data.val_seed})")
    return lines


def _measured(result: dict, classes: list[str]) -> list[str]:
    lines = []
    if "max_logit_diff" in result:
        lines.append(f"- The exported graph against PyTorch on {result['images']} test images: largest logit "
                     f"difference {result['max_logit_diff']:.2e}, top-1 agreement {result['top1_agreement']:.2%}")
    if "onnx_test_acc" in result:
        lines.append(f"- Test accuracy of the exported graph (onnxruntime, no test-time augmentation): "
                     f"{result['onnx_test_acc']:.4f} on {result['test_images']} images")
    if result.get("per_class"):
        lines += ["", "| class | test accuracy |", "|---|---|"]
        lines += [f"| {c} | {result['per_class'][c]:.3f} |" for c in classes]
    if result.get("int8"):
        from .quantize import table

        lines += ["", "int8 (static post-training quantization, onnxruntime QDQ, per-channel weights, "
                  f"{result['int8']['calibration']} train images for calibration), measured by this export:", "",
                  table(result["int8"])]
    return lines or ["- Run the export with `--verify-test-set` to measure the exported file on the test set."]


def write(out: Path, mf, cfg, size: tuple[int, int], params: int, result: dict) -> Path:
    from .fileio import write_text
    from .config import to_yaml

    m = cfg.model
    card = [f"# {m.name} on {Path(cfg.data.dir).name}: `{Path(out).name}`", "",
            "## Model", f"- Architecture: {m.name}, width {m.width}, {m.norm.value} norm, {params:,} parameters",
            f"- Exported from `{mf.path}` ({mf.kind})", "",
            "## Input and output",
            f"- float32 RGB, N x 3 x {size[0]} x {size[1]}, values in [0, 1]; normalisation (mean "
            f"{[round(v, 4) for v in mf.mean]}, std {[round(v, 4) for v in mf.std]})"
            + (f" and the resize to {cfg.data.resize} px" if cfg.data.resize else "") + " are inside the model",
            f"- Output: logits over {len(mf.classes)} classes, in this order: {', '.join(mf.classes)}", "",
            "## Data", *_data(mf, cfg), "", "## Training", *_training(mf, cfg), "",
            "## Measured by this export", *_measured(result, mf.classes), "",
            "## Intended use and limitations",
            "- Research and teaching: image classification into the classes above, on images like the training "
            "data. Not for decisions about people.", *LIMITATIONS, "",
            "## Training config", "```yaml", to_yaml(cfg).strip(), "```", ""]
    path = Path(out).parent / "MODEL_CARD.md"
    write_text(path, "\n".join(card))
    return path
