"""The model card `export` writes beside every exported file, named after it (`model.onnx` ->
`model.onnx.md`), as timm's hub export writes a README: exporting another file into the same folder never
touches this one's card.

Every figure comes from the source file (the checkpoint's config, history, data hashes), from the run's
metrics.json beside a checkpoint (the hardware), or from a measurement the export itself made, each
labelled with what was measured (this file, the fp32 graph it was quantized from, or the PyTorch weights)
and on how many images. A card is written to be shared: files are named by name and sha256, never by a
path of the machine that exported them.
"""
from __future__ import annotations

import json
from pathlib import Path

from . import rundir
from .fileio import sha256

# what is known about a source beyond its manifest, by the name of the file or folder it was prepared from
JPEG75 = "is re-encoded as JPEG quality 75, which costs about 3 points against the original PNGs."
SOURCE_NOTES = {
    "cifar10-jpeg.tar.gz": f"This copy of CIFAR-10 {JPEG75}",  # the shared copy every test and benchmark uses
    "cifar10-subset.tar.gz": f"This subset of CIFAR-10 (the project's test data, from the shared copy) {JPEG75}",
}


def limitations(cfg, manifest: dict, size: tuple[int, int]) -> list[str]:
    """What holds for the data this model was trained on: its source, the images' sizes and how `predict` brings
    a new image to the model's input."""
    source = Path(str(manifest.get("source", ""))).name
    d = cfg.data
    lines = ["- Trained and measured on the data named above only; accuracy on other images (other cameras, sizes, "
             "classes outside the list) is unknown." + (f" {SOURCE_NOTES[source]}" if source in SOURCE_NOTES else ""),
             "- Every input gets one of the classes: there is no 'none of these'. Confidences are not calibrated."]
    if d.test_res:  # photos: random-resized crops in training, the centre crop in evaluation
        stored = (manifest.get("storage") or {}).get("max_resolution")
        train = f"{d.res} px" + (f", growing to {d.res_end} px" if d.res_end else "")
        source = f", from photos stored at most {stored} px on their longer side" if stored else ""
        lines.append(f"- Photos: trained on random-resized crops of {train} (each {d.rrc_scale[0]:g}-"
                     f"{d.rrc_scale[1]:g} of a photo's area){source}; evaluated, and predicted by `predict`, on the "
                     f"central {d.test_crop_ratio:g} of the shorter side resized to {size[1]}x{size[0]}. An object "
                     "that fills much less of the frame than in the training photos is outside what was measured.")
    else:
        lines.append(f"- Image size: the model saw {size[1]}x{size[0]} images" +
                     (f", upsampled to {d.resize}x{d.resize} inside the model" if d.resize else "") +
                     f"; `predict` resizes any other image to {size[1]}x{size[0]}, and larger photos lose detail the "
                     "model never saw.")
    return lines


def read_manifest(cfg) -> tuple[dict, Path]:
    """The data's manifest.json where this export runs ({} where it cannot be read), and its path."""
    path = Path(cfg.data.dir) / "manifest.json"
    try:
        return json.loads(path.read_text()), path
    except (OSError, ValueError):
        return {}, path


def card_path(out: str | Path) -> Path:
    """The card of the file `out`: beside it, its name + `.md`."""
    return Path(out).with_name(Path(out).name + ".md")


def run_record(path: str) -> dict:
    """The run's metrics.json beside a checkpoint (its hardware and times), if it is there."""
    return rundir.read_metrics(Path(path).parent) or {}


def precision(record: dict, configured: str) -> str:
    """What the run trained in and why (`bf16 (auto: the CPU has AVX512-BF16 ...)`), from its metrics.json;
    without one, only what the config asked for."""
    if "precision" not in record:
        return f"train.precision={configured} (what it resolved to was not recorded)"
    parts = record.get("precision_segments") or []
    if len(parts) > 1:  # resumed where train.precision=auto resolved otherwise
        ends = [p["from_step"] for p in parts[1:]] + [None]
        return ", then ".join(f"{p['precision'] or 'not recorded'} ({p['why']}) " +
                              (f"for steps {p['from_step'] + 1}-{end}" if end is not None else
                               f"from step {p['from_step'] + 1}") for p, end in zip(parts, ends))
    why = record.get("precision_why")
    return f"{record['precision']} ({why})" if why else record["precision"]


def teacher(record: dict) -> list[str]:
    """The distillation line: the teacher's file, sha256 and accuracy, from the run's metrics.json."""
    t = record.get("teacher")
    if not t:
        return []
    acc = f"{t['test_acc']:.4f}" if t.get("test_acc") is not None else "not recorded in its file"
    return [f"- Distilled from the teacher {t['file']} (sha256 {t['sha256']}; its test accuracy {acc}), "
            f"alpha {t['alpha']:g}, temperature {t['temperature']:g}"]


def shape(mf) -> tuple[str, list[str]]:
    """A pruned model's shape for the architecture line (the share of conv channels its widths record keeps), and
    where it came from, for a file dist_resnet.prune wrote."""
    from .models.widths import kept_share

    share = kept_share(mf.widths, mf.config)
    p = mf.state.get("pruned")
    made = [f"- Pruned by dist_resnet.prune from `{p['source']}` (sha256 `{p['source_sha256']}`): ratio "
            f"{p['ratio']:g}, {p['importance']} importance ({p['scope']}); FLOPs {p['before']['flops'] / 1e6:.1f} M -> "
            f"{p['after']['flops'] / 1e6:.1f} M; test accuracy {p['before']['test_acc']:.4f} -> "
            f"{p['after']['test_acc']:.4f} before any fine-tuning"] if p else []
    return ("" if share is None else f", structurally pruned to {share:.0%} of its conv channels"), made


def _training(mf, cfg, ema: bool) -> list[str]:
    s, record = mf.state, run_record(mf.path)
    hist = s.get("history") or []
    if not hist:
        return ["- Not recorded in the source file (a safetensors export carries the config only)."]
    t, prefix = cfg.train, "ema_" if ema else ""
    times = sum(r.get("epoch_time_s", 0.0) for r in hist)
    o = cfg.optim
    optimizer = (f"Muon for the conv filters (lr {o.muon_lr:g}, momentum {o.muon_momentum:g}), SGD lr {o.lr:g} for the "
                 "rest" if o.name.value == "muon" else f"SGD lr {o.lr:g}")
    lines = [f"- {len(hist)} of {t.epochs} epochs, global batch {t.batch_size}, optimizer {optimizer} "
             f"({o.schedule.value}), label smoothing {o.label_smoothing:g}, seed {t.seed}",
             f"- Hardware: {record.get('device', 'not recorded')} x {s.get('world_size', '?')}, precision "
             f"{precision(record, t.precision.value)}; training time {times:.0f} s", *teacher(record)]
    evals = [r for r in hist if f"{prefix}test_acc" in r]
    which = f"the EMA weights (decay {t.ema_decay:g})" if ema else "the weights"
    if evals:
        tta = f" (test-time augmentation: {t.tta.value})" if t.tta.value != "none" else ""
        lines.append(f"- Test accuracy of {which} at epoch {evals[-1]['epoch']}, as the run measured it{tta}: "
                     f"{evals[-1][f'{prefix}test_acc']:.4f} on {evals[-1].get('test_count', '?')} images")
        robust = [r for r in evals if "test_robust_acc" in r and not ema]
        if robust:
            a = cfg.adv
            lines.append(f"- Robust accuracy under PGD (eps {a.eps:g}/255, {a.eval_steps} steps, step {a.eval_alpha:g}/255, "
                         f"{a.eval_restarts} restart(s)): {robust[-1]['test_robust_acc']:.4f}")
    vals = [r for r in hist if f"{prefix}val_acc" in r]
    if vals:
        lines.append(f"- Validation accuracy of {which} (held-out train images): {vals[-1][f'{prefix}val_acc']:.4f}")
    lines.append("- The whole config: below.")
    return lines


def _data(mf, cfg, manifest: dict, path: Path) -> list[str]:
    shas = mf.state.get("data") or {}
    source = Path(str(manifest.get("source", "not recorded"))).name
    lines = [f"- Source: `{source}`; manifest.json sha256 "
             f"`{sha256(path) if manifest else 'not available where this was exported'}`"]
    for split in ("train", "test"):
        count = (manifest.get(split) or {}).get("count", "?")
        lines.append(f"- {split}.beton: {count} images, sha256 `{shas.get(split, 'not recorded')}`")
    if cfg.data.val_fraction or cfg.data.folds:
        how = (f"fold {cfg.data.fold} of {cfg.data.folds}" if cfg.data.folds else f"{cfg.data.val_fraction:g}")
        lines.append(f"- Validation split held out of train: {how} (seed {cfg.data.val_seed})")
    return lines


def _check(result: dict, name: str) -> list[str]:
    c = result["check"]
    counts = c["per_class"].values()
    lines = [f"- Check sample: {c['images']} test images, class-stratified ({min(counts)}-{max(counts)} per class), "
             f"seed {c['seed']:#x}.",
             f"- The fp32 graph against PyTorch (the weights) on the check sample: largest logit difference "
             f"{c['fp32_max_logit_diff']:.2e}, top-1 agreement {c['fp32_top1_agreement']:.2%}"
             + (f" (this file, `{name}`)." if result["written"] == "fp32" else " (the graph this file was quantized "
                                                                             "from; not written).")]
    if c.get("rewrites"):
        lines.append(f"- Rewritten before export, computing the same: {'; '.join(c['rewrites'])}.")
    if "int8" in result:
        q = result["int8"]
        lines += [f"- This file (int8) against the fp32 graph on the check sample: top-1 agreement "
                  f"{q['check_agreement']:.2%}.",
                  f"- int8: static post-training quantization (onnxruntime, QDQ, per-channel int8 weights in 7 bits, "
                  f"so that CPUs without VNNI cannot saturate, uint8 activations), calibrated on "
                  f"{q['calibration_images']} train images (seeded; never test images)."]
    return lines


def _measured(result: dict, classes: list[str], name: str) -> list[str]:
    if "check" not in result:
        return [f"- `{name}` holds {result['tensors']} tensors ({result['bytes'] / 2**20:.1f} MiB), read back and "
                "compared with the checkpoint's weights: identical."]
    lines = ["Measured by this export with onnxruntime on the CPU, without test-time augmentation.", "",
             *_check(result, name)]
    test = result.get("test")
    if test is None:
        return lines + ["- The test set was not run through this file: export with `--verify-test-set` to measure "
                        "its test accuracy."]
    top1, written = test["top1"], result["written"]
    lines += [f"- **Test accuracy of this file (`{name}`): {top1[written]:.4f} on {test['images']} images** "
              f"(the whole test beton{', each centre-cropped as evaluated: ' + test['crop'] if test.get('crop') else ''}).",
              f"- On the same images: PyTorch (the weights, fp32) {top1['pytorch']:.4f}"
              + (f"; the fp32 graph {top1['fp32']:.4f}; this file's top-1 agreement with the fp32 graph "
                 f"{test['int8_fp32_agreement']:.4f}" if written == "int8" else "") + ".",
              "", f"| class | test accuracy of `{name}` |", "|---|---|"]
    lines += [f"| {c} | {test['per_class'][c]:.3f} |" for c in classes]
    speed = (result.get("int8") or {}).get("speed")
    if speed:
        from .quantize import table

        lines += ["", "Speed of this file against the fp32 graph, measured by this export:", "", table(speed)]
    return lines


def shareable(cfg):
    """The config with its paths cut to their last part: a card names no folder of the exporting machine."""
    from dataclasses import replace

    pretrained = cfg.model.pretrained
    return replace(cfg, data=replace(cfg.data, dir=Path(cfg.data.dir).name),
                   run=replace(cfg.run, dir=Path(cfg.run.dir).name),
                   model=replace(cfg.model, pretrained=Path(pretrained).name if pretrained not in ("", "torchvision")
                                 else pretrained))


def write(out: Path, mf, cfg, size: tuple[int, int], params: int, result: dict, ema: bool = False) -> Path:
    from .config import to_yaml
    from .fileio import write_text

    m, name = cfg.model, Path(out).name
    manifest, manifest_path = read_manifest(cfg)
    weights = (f"the EMA of the weights (train.ema_decay={cfg.train.ema_decay:g}), not the raw weights" if ema
               else "the trained weights (not an EMA)")
    pruned, lineage = shape(mf)
    card = [f"# {m.name} on {Path(cfg.data.dir).name}: `{name}`", "",
            "## Model",
            f"- Architecture: {m.name}, width {m.width}{pruned}, {m.norm.value} norm, {params:,} parameters",
            *lineage,
            f"- Exported from `{Path(mf.path).name}` ({mf.kind}, sha256 `{sha256(mf.path)}`): {weights}",
            f"- This file: `{name}`" + (f", {result['bytes']:,} bytes" if "bytes" in result else ""), "",
            "## Input and output",
            f"- float32 RGB, N x 3 x {size[0]} x {size[1]}, values in [0, 1]; normalisation (mean "
            f"{[round(v, 4) for v in mf.mean]}, std {[round(v, 4) for v in mf.std]})"
            + (f" and the resize to {cfg.data.resize} px are" if cfg.data.resize else " is") + " inside the model",
            *([f"- Photos: the central {cfg.data.test_crop_ratio:g} of the shorter side, square, resized to "
               f"{size[1]}x{size[0]} (as evaluated: data.test_res={cfg.data.test_res}); predict does this"]
              if cfg.data.test_res else []),
            f"- Output: logits over {len(mf.classes)} classes, in this order: {', '.join(mf.classes)}", "",
            "## Data", *_data(mf, cfg, manifest, manifest_path), "", "## Training", *_training(mf, cfg, ema), "",
            "## Measured by this export", *_measured(result, mf.classes, name), "",
            "## Intended use and limitations",
            "- Research and teaching: image classification into the classes above, on images like the training "
            "data. Not for decisions about people.", *limitations(cfg, manifest, size), "",
            "## Training config (paths by their last part)", "```yaml", to_yaml(shareable(cfg)).strip(), "```", ""]
    path = card_path(out)
    write_text(path, "\n".join(card))
    return path
