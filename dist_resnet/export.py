"""Export a trained model: a self-describing ONNX graph (fp32 or int8), or safetensors weights, each with
a model card beside it.

examples:
  python -m dist_resnet.export runs/cpu/best.pt --format onnx --out model.onnx --verify-test-set
  python -m dist_resnet.export runs/cpu/best.pt --format onnx --int8 --out model-int8.onnx --verify-test-set
  python -m dist_resnet.export runs/cpu/best.pt --format onnx --int8 --out model-int8.onnx --calibration 1000
  python -m dist_resnet.export runs/cpu/best.pt --format safetensors --out model.safetensors --ema
  python -m dist_resnet.export runs/cpu/best.pt --format onnx --out model.onnx data.dir=/data/cifar10

- ONNX: the input is float32 RGB, N x 3 x H x W in [0, 1], with a dynamic batch; normalisation (and
  `data.resize`) are inside the graph. Metadata: class names, input size, mean/std, the checkpoint's
  sha256, the dist_resnet version. It is exported with torch's current exporter (torch.export-based),
  after exact rewrites that let onnxruntime fold and quantize more (dist_resnet.rewrite: a max-pool moved
  after its BN and ReLU, a global max as a MaxPool; the card names them),
  then checked: `onnx.checker` (full check), and onnxruntime against PyTorch on 256 test images drawn per
  class (seeded): the largest logit difference and the top-1 agreement are printed, and the export fails
  (exit 1, nothing written) if the difference is above 1e-3.
- int8 (`--int8`): that fp32 graph, quantized by onnxruntime (static, QDQ, per-channel weights:
  dist_resnet.quantize), calibrated on N train images (never the test set); it must agree with the fp32
  graph on the check images (>= 90 %).
- `--verify-test-set`: the whole test beton, streamed in batches, through PyTorch and every graph: each
  one's accuracy, the file's per class, and with --int8 both graphs' speed at batch 1 and 64.
- The checks need the test (and for int8 the train) images: they come from the checkpoint's `data.dir`;
  where the data lives elsewhere now, override it with `data.dir=DIR`.
- Every export writes its model card beside the file, named after it: `model.onnx` -> `model.onnx.md`
  (dist_resnet.model_card). It says what each figure was measured on, and names files by name and sha256.
- safetensors: the weights, plus the config, class names, normalisation and image size as metadata.
  `model.pretrained` and `dist_resnet.predict` accept the file.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

from .checkpoint import CheckpointError
from .config import ConfigError
from .data.manifest import DataError
from .fileio import atomic_write, sha256, write_json
from . import model_card, rewrite, verify
from .models import PixelInput, files, widths
from .quantize import QuantizeError
from .trained import arguments, build_trained, open_trained

TOLERANCE = 1e-3  # largest logit difference allowed between onnxruntime and PyTorch (timm's tolerance)
CALIBRATION_IMAGES = 256  # --int8: train images for calibration
INT8_AGREEMENT = 0.9  # --int8: the least top-1 agreement with the fp32 graph an int8 export may have


class ExportError(RuntimeError):
    """The export ran, but its result is wrong (exit 1)."""


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as v

    try:
        return v("dist_resnet")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


def pixel_model(path: str, overrides: list[str], ema: bool):
    """(the trained net as a user calls it: [0, 1] RGB in, logits out; its file; its config)."""
    mf, trained, cfg = open_trained(path, overrides, ema)
    if mf.classes is None or mf.mean is None:
        raise CheckpointError(f"{path} was written before checkpoints held their class names and normalisation: "
                              "export needs a checkpoint from this version")
    net = build_trained(mf, trained, cfg, len(mf.classes))
    return PixelInput(net, mf.mean, mf.std, cfg.data.resize).eval(), mf, cfg


def bare(model: PixelInput) -> torch.nn.Module:
    """The net inside the normalisation and the resize, if any."""
    return model.net.net if hasattr(model.net, "size") else model.net


def metadata(mf: files.ModelFile, cfg_dict: dict, size: tuple[int, int], net: torch.nn.Module) -> dict[str, str]:
    """The safetensors and ONNX metadata: what a loader needs besides the weights (every layer's width included:
    a pruned model is rebuilt from it)."""
    data = cfg_dict.get("data", {})
    crop = data.get("test_crop_ratio") if data.get("test_res") else None  # photos: predict's centre crop
    return {"format": files.META_FORMAT, "classes": json.dumps(mf.classes), "input_size": json.dumps(list(size)),
            "crop_ratio": json.dumps(crop),
            "image_shape": json.dumps(list(size)), "mean": json.dumps(mf.mean), "std": json.dumps(mf.std),
            "config": json.dumps(cfg_dict), "widths": json.dumps(widths.record(net)), "source_sha256": sha256(mf.path),
            "dist_resnet_version": version()}


def export_onnx(model: PixelInput, meta: dict[str, str], size: tuple[int, int], out: str) -> bytes:
    """The ONNX bytes of `model`, with a dynamic batch and `meta`, after onnx.checker's full check."""
    import onnx

    example = torch.rand(2, 3, *size)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(model, (example,), str(path), dynamo=True, input_names=["image"], output_names=["logits"],
                          dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, verbose=False)
        proto = onnx.load(str(path))
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def int8_graph(args, fp32: bytes, cfg, x: torch.Tensor) -> tuple[bytes, dict]:
    """--int8: the graph quantized from `fp32`, which must agree with it on the check sample."""
    from . import quantize

    calibration = quantize.calibration_images(cfg, args.calibration)
    int8 = quantize.quantize_int8(fp32, calibration)
    agree = (verify.onnx_logits(verify.onnx_session(fp32), x).argmax(1) ==
             verify.onnx_logits(verify.onnx_session(int8), x).argmax(1)).float().mean().item()
    print(f"int8 vs fp32 graph on the {len(x)} check images: top-1 agreement {agree:.2%}")
    if agree < INT8_AGREEMENT:
        raise ExportError(f"the int8 graph agrees with the fp32 one on only {agree:.1%} of {len(x)} test images "
                          f"(< {INT8_AGREEMENT:.0%}); nothing was written to {args.out}")
    return int8, {"calibration_images": len(calibration), "check_agreement": agree}


def onnx_file(args, model: PixelInput, mf: files.ModelFile, cfg, size: tuple[int, int], meta: dict) -> dict:
    """The ONNX export (fp32, or int8 with --int8), checked; what was measured, each figure of the graph it
    names (`written`: the graph in the file)."""
    betons = verify.open_betons(cfg)
    x, y, per_class = verify.check_sample(betons, cfg)
    graph_model, rewrites = rewrite.for_export(model, size)
    fp32 = export_onnx(graph_model, meta, size, args.out)
    a, b = verify.torch_logits(model, x), verify.onnx_logits(verify.onnx_session(fp32), x)
    check = {"images": len(x), "per_class": per_class, "seed": verify.CHECK_SEED, "rewrites": rewrites,
             "fp32_max_logit_diff": (a - b).abs().max().item(),
             "fp32_top1_agreement": (a.argmax(1) == b.argmax(1)).float().mean().item()}
    print(f"onnxruntime vs PyTorch on {len(x)} test images ({min(per_class.values())}-{max(per_class.values())} "
          f"per class): largest logit difference {check['fp32_max_logit_diff']:.2e}, top-1 agreement "
          f"{check['fp32_top1_agreement']:.2%}")
    if not check["fp32_max_logit_diff"] <= TOLERANCE:
        raise ExportError(f"the ONNX graph does not compute what the model does: largest logit difference "
                          f"{check['fp32_max_logit_diff']:.2e} > {TOLERANCE:g}; nothing was written to {args.out}")
    result, graphs = {"written": "int8" if args.int8 else "fp32", "check": check}, {"fp32": fp32}
    if args.int8:
        graphs["int8"], result["int8"] = int8_graph(args, fp32, cfg, x)
    if args.verify_test_set:
        result["test"] = verify.score_test_set(model, graphs, result["written"], betons, cfg)
        if args.int8:
            from . import quantize

            result["int8"]["speed"] = quantize.speed(fp32, graphs["int8"], x, args.speed_seconds)
            print(quantize.table(result["int8"]["speed"]))
    data = graphs[result["written"]]
    atomic_write(args.out, lambda f: f.write(data))
    result["bytes"] = len(data)
    print(f"wrote {args.out} ({len(data) / 2**20:.1f} MiB, {'int8' if args.int8 else 'float32'}): float32 RGB "
          f"N x 3 x {size[0]} x {size[1]} in [0, 1] -> logits over {len(mf.classes)} classes")
    return result


def main(argv: list[str] | None = None) -> dict:
    p = arguments("dist_resnet.export", __doc__, "export the EMA weights (a train.ema=true run); the card says so")
    p.add_argument("--format", choices=["onnx", "safetensors"], required=True, help="what to write")
    p.add_argument("--out", required=True, help="the file to write; its model card is written beside it as OUT.md")
    p.add_argument("--verify-test-set", action="store_true",
                   help="onnx: run the whole test beton through onnxruntime and PyTorch, print both accuracies "
                        "(with --int8: the fp32 and int8 graphs' accuracy, agreement, size and speed)")
    p.add_argument("--int8", action="store_true", help="onnx: static int8 quantization (onnxruntime, QDQ)")
    p.add_argument("--calibration", type=int, default=CALIBRATION_IMAGES,
                   help=f"--int8: train images to calibrate on (default {CALIBRATION_IMAGES})")
    p.add_argument("--json", metavar="PATH", help="also write what was measured as JSON here")
    p.add_argument("--speed-seconds", type=float, default=0.5,
                   help="--int8 --verify-test-set: seconds per graph in each of the 5 rounds of the speed measurement")
    args = p.parse_intermixed_args(argv)
    try:
        if args.int8 and args.format != "onnx":
            raise ConfigError("--int8 quantizes an ONNX graph: use it with --format onnx")
        if args.calibration < 1 or args.speed_seconds <= 0:
            raise ConfigError(f"--calibration {args.calibration} must be >= 1 train images and --speed-seconds "
                              f"{args.speed_seconds:g} > 0")
        model, mf, cfg = pixel_model(args.checkpoint, args.overrides, args.ema)
        size = tuple(mf.image_shape or (32, 32))
        meta = metadata(mf, mf.config, size, bare(model))
        result = (save_safetensors(model, meta, args.out) if args.format == "safetensors"
                  else onnx_file(args, model, mf, cfg, size, meta))
        params = sum(t.numel() for t in model.parameters())
        print(f"wrote {model_card.write(Path(args.out), mf, cfg, size, params, result, args.ema)}")
        if args.json:
            write_json(args.json, result)
        return result
    except (ConfigError, CheckpointError, DataError) as e:
        print(f"dist_resnet.export: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except ImportError as e:
        print(f"dist_resnet.export: error: {e.name or e} is not installed: pip install 'dist_resnet[export]'",
              file=sys.stderr)
        raise SystemExit(2) from None
    except (ExportError, QuantizeError) as e:
        print(f"dist_resnet.export: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def save_safetensors(model: PixelInput, meta: dict[str, str], out: str) -> dict:
    from safetensors.torch import load, save

    weights = {k: v.detach().contiguous() for k, v in bare(model).state_dict().items()}
    data = save(weights, metadata=meta)
    back = load(data)
    same = back.keys() == weights.keys() and all(torch.equal(back[k], weights[k]) for k in weights)
    if not same:
        raise ExportError("the safetensors file does not hold the model's weights exactly")
    atomic_write(out, lambda f: f.write(data))
    print(f"wrote {out} ({len(data) / 2**20:.1f} MiB): {len(weights)} tensors, read back exactly; metadata: "
          f"{', '.join(k for k in meta if k != 'format')}")
    return {"tensors": len(weights), "bytes": len(data)}


if __name__ == "__main__":
    main()
