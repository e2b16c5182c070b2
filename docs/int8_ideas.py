"""What each idea for a faster int8 graph measures (issue 26 §2), side by side on one trained checkpoint.

    python docs/int8_ideas.py RUN/best.pt [data.dir=DIR] [--seconds 0.5] [--rounds 5] [--torch]

Every variant is built from the same weights and calibrated on the same train images as `export --int8`
(dist_resnet.quantize). For each: its test accuracy on the whole test split, and its throughput at batch 1
and 64 with onnxruntime on this CPU, all the sessions taking turns round after round (so load falls on
each alike), as mean ± std. The rows `fp32 (export)` and `int8 (export --int8)` are what export writes
now, after dist_resnet.rewrite's exact rewrites (resnet9's max-pools moved after their BN and ReLU, so the BNs
fold into the convolutions; the global max as a MaxPool, which has an int8 kernel); every ratio is against
`fp32 (export)`. The rows `no rewrite (before)` are the graphs export wrote before them.

The ideas:
- `no pre-processing`: quantize_static straight on the exported graph, without quant_pre_process.
- `QOperator`: onnxruntime's QLinearConv & co. in place of QDQ pairs.
- `normalisation folded`: (x - mean) / std folded into the first conv's weights and bias. Not exact: the
  conv's zero padding is then a pixel of 0, not of the mean; the accuracy column says what that costs.
- `1 thread` / `basic optimisation`: session options of the shipped int8 graph (the others use this
  machine's cores and onnxruntime's full graph optimisation, as export does).
- `--torch`: torch's own int8 (PT2E with X86InductorQuantizer, compiled by inductor; needs torchao), at
  batch 64 and 1, beside torch's fp32 eager forward.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dist_resnet import quantize, rewrite, verify  # noqa: E402
from dist_resnet.export import CALIBRATION_IMAGES, export_onnx, pixel_model  # noqa: E402


def fold_normalisation(pixel: nn.Module) -> nn.Module:
    """(x - mean) / std folded into the first conv (zero padding then pads a 0 pixel, not the mean)."""
    pixel = copy.deepcopy(pixel)
    conv = next(m for m in pixel.net.modules() if isinstance(m, nn.Conv2d))
    mean, std = pixel.mean.view(1, 3, 1, 1), pixel.std.view(1, 3, 1, 1)
    with torch.no_grad():
        w = conv.weight / std
        bias = -(w * mean).sum(dim=(1, 2, 3))
        if conv.bias is not None:
            bias += conv.bias
        conv.weight.copy_(w)
        conv.bias = nn.Parameter(bias)
    pixel.mean.zero_()
    pixel.std.fill_(1.0)
    return pixel


def quantized(fp32: bytes, calibration: torch.Tensor, pre: bool = True, fmt: str = "QDQ") -> bytes:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    with tempfile.TemporaryDirectory() as tmp:
        src, pre_path, out = Path(tmp) / "a.onnx", Path(tmp) / "b.onnx", Path(tmp) / "c.onnx"
        src.write_bytes(fp32)
        if pre:
            quant_pre_process(str(src), str(pre_path), skip_symbolic_shape=True)
        quantize_static(str(pre_path if pre else src), str(out), quantize.Batches("image", calibration),
                        quant_format=getattr(QuantFormat, fmt), per_channel=True, weight_type=QuantType.QInt8,
                        activation_type=QuantType.QUInt8, calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"QDQOpTypePerChannelSupportToAxis": {"BatchNormalization": 0}})
        return out.read_bytes()


def session(data: bytes, threads: int = 0, basic: bool = False):
    import onnxruntime as ort

    o = ort.SessionOptions()
    if threads:
        o.intra_op_num_threads = threads
    if basic:
        o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(data, o, providers=["CPUExecutionProvider"])


def accuracy(run, betons, cfg) -> float:
    hits = n = 0
    for x, y in verify.test_batches(betons, cfg):
        hits += int((run(x).argmax(1) == y).sum())
        n += len(y)
    return hits / n


def rates(runs: dict, x: torch.Tensor, batch: int, rounds: int, seconds: float) -> dict:
    """Images per second of each callable at `batch`, taking turns within each round."""
    feed, out = x[:batch], {k: [] for k in runs}
    for r in runs.values():
        r(feed)
    for _ in range(rounds):
        for name, r in runs.items():
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                r(feed)
                n += 1
            out[name].append(n * batch / (time.perf_counter() - t0))
    return {k: (statistics.fmean(v), statistics.stdev(v)) for k, v in out.items()}


def onnx_runner(s):
    name = s.get_inputs()[0].name
    return lambda x: torch.from_numpy(s.run(None, {name: x.numpy()})[0])


def torch_int8(model: nn.Module, calibration: torch.Tensor, size: tuple[int, int]):
    """PT2E: export, X86InductorQuantizer, calibrate, convert, compile with inductor (freezing on)."""
    import torch._inductor.config as inductor_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    inductor_config.freezing = True
    example = torch.rand(64, 3, *size)
    batch = torch.export.Dim("batch", min=1, max=1024)
    gm = torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch}}).module()
    q = xiq.X86InductorQuantizer()
    q.set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(gm, q)
    with torch.no_grad():
        for i in range(0, len(calibration), 32):
            prepared(calibration[i:i + 32])
    converted = convert_pt2e(prepared)
    compiled = torch.compile(converted)
    return lambda x: compiled(x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--seconds", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--torch", action="store_true", help="also torch's PT2E int8 (X86InductorQuantizer + inductor)")
    args = p.parse_args()
    model, mf, cfg = pixel_model(args.checkpoint, args.overrides, False)
    size = tuple(mf.image_shape or (32, 32))
    betons = verify.open_betons(cfg)
    x, _, _ = verify.check_sample(betons, cfg)
    calibration = quantize.calibration_images(cfg, CALIBRATION_IMAGES)
    rewritten, notes = rewrite.for_export(model, size)
    with torch.no_grad():
        diff = (model(x) - rewritten(x)).abs().max().item()
    print(f"rewrites ({'; '.join(notes)}): largest logit difference to the model {diff:.2e}")
    fp32_old = export_onnx(model, {}, size, "")
    fp32 = export_onnx(rewritten, {}, size, "")
    folded = export_onnx(fold_normalisation(rewritten), {}, size, "")
    graphs = {
        "fp32 (export)": (fp32, {}),
        "int8 (export --int8)": (quantize.quantize_int8(fp32, calibration), {}),
        "fp32, no rewrite (before)": (fp32_old, {}),
        "int8, no rewrite (before)": (quantize.quantize_int8(fp32_old, calibration), {}),
        "int8, no rewrite, no pre-processing": (quantized(fp32_old, calibration, pre=False), {}),
        "int8, no rewrite, QOperator": (quantized(fp32_old, calibration, fmt="QOperator"), {}),
        "int8, QOperator": (quantized(fp32, calibration, fmt="QOperator"), {}),
        "int8, 1 thread": (None, {"threads": 1}),
        "int8, basic optimisation": (None, {"basic": True}),
        "fp32, 1 thread": (fp32, {"threads": 1}),
        "int8, normalisation folded too": (quantize.quantize_int8(folded, calibration), {}),
    }
    shipped = graphs["int8 (export --int8)"][0]
    runs = {k: onnx_runner(session(g if g is not None else shipped, **o)) for k, (g, o) in graphs.items()}
    if args.torch:
        runs["torch fp32 (eager, no_grad)"] = torch.no_grad()(lambda t: model(t))
        runs["torch int8 (PT2E, X86InductorQuantizer, inductor)"] = torch_int8(model, calibration, size)
    acc = {k: accuracy(r, betons, cfg) for k, r in runs.items()}
    speed = {b: rates(runs, x, b, args.rounds, args.seconds) for b in (1, 64)}
    base = {b: speed[b]["fp32 (export)"][0] for b in (1, 64)}
    print(f"\n{args.rounds} rounds of {args.seconds:g} s per variant and batch size, taking turns; "
          f"{torch.get_num_threads()} threads; {len(x)} check images fed; test accuracy on {betons.count('test')}\n")
    print("| variant | test acc | img/s, batch 1 | vs fp32 | img/s, batch 64 | vs fp32 |")
    print("|---|---|---|---|---|---|")
    for k in runs:
        cells = [f"{speed[b][k][0]:.0f} ± {speed[b][k][1]:.0f} | {speed[b][k][0] / base[b]:.2f}x" for b in (1, 64)]
        print(f"| {k} | {acc[k]:.4f} | {' | '.join(cells)} |")
    print(f"\nfloat ops left: int8 (export --int8) {quantize.float_ops(shipped)}; before the rewrites "
          f"{quantize.float_ops(graphs['int8, no rewrite (before)'][0])}")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
