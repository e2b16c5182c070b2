"""int8 ONNX: static post-training quantization of an exported fp32 graph with onnxruntime, and the
measurements that say what it costs and gains.

- `quantize_int8`: onnxruntime's pre-processing (`quant_pre_process`: shape inference and graph
  optimisation), then `quantize_static` in QDQ format with per-channel int8 weights and uint8 activations,
  calibrated (MinMax) on images of the **train** beton, never the test set. The weights use 7 of their 8 bits
  (`reduce_range`): on x86 CPUs without VNNI (AVX2, AVX512 before VNNI), onnxruntime multiplies uint8 by int8
  with VPMADDUBSW, whose int16 pair sums saturate for 8-bit weights (onnxruntime's quantization docs). On a
  2-core AVX2 EPYC the trained test checkpoint's int8 graph agreed with its fp32 graph on 89.1 % of the 256
  check images with 8-bit weights and 98.0 % with 7-bit ones; the file then runs the same on any CPU. The
  normalisation stays inside the graph (the input is still float RGB in [0, 1]), and the fp32 graph's
  metadata is carried over.
- `speed`: both graphs' throughput at batch 1 and 64, measured side by side (the two alternate, round
  after round); their accuracy on the test set is measured by dist_resnet.verify, with every other graph.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .data.loader import read_resident
from .data.manifest import Betons, DataError

CALIBRATION_SEED = 0xCA1


class QuantizeError(RuntimeError):
    """The graph could not be quantized; the message names what."""


def calibration_images(cfg, count: int) -> torch.Tensor:
    """`count` train images (seeded, without replacement) as float RGB in [0, 1]: what calibration sees."""
    try:
        betons = Betons.open(cfg.data.dir)
    except DataError as e:
        raise DataError(f"int8 calibration needs real train images: {e}; pass data.dir=DIR") from None
    n = betons.count("train")
    idx = np.sort(np.random.default_rng(CALIBRATION_SEED).choice(n, min(count, n), replace=False))
    x, _ = read_resident(betons, cfg.data, "train", idx, torch.device("cpu"), torch.float32, False)
    return x / 255


class Batches:
    """onnxruntime's CalibrationDataReader over fixed images, 32 at a time."""

    def __init__(self, name: str, x: torch.Tensor, batch: int = 32):
        self.items = iter([{name: x[i:i + batch].numpy()} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self.items, None)


def quantize_int8(fp32: bytes, calibration: torch.Tensor) -> bytes:
    """The int8 QDQ graph of `fp32`, calibrated on `calibration`, with the fp32 graph's metadata."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    with tempfile.TemporaryDirectory() as tmp:
        src, pre, out = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(fp32)
        try:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            quantize_static(str(pre), str(out), Batches("image", calibration), quant_format=QuantFormat.QDQ,
                            per_channel=True, reduce_range=True, weight_type=QuantType.QInt8,
                            activation_type=QuantType.QUInt8, calibrate_method=CalibrationMethod.MinMax,
                            # a BatchNormalization left after a max-pool has a 1-D scale: per channel along axis
                            # 0, not conv weights' axis 1 (onnxruntime warned "Axis 1 is out-of-range for weight
                            # ... with rank 1" for each, and fell back to per-tensor)
                            extra_options={"QDQOpTypePerChannelSupportToAxis": {"BatchNormalization": 0}})
        except Exception as e:  # noqa: BLE001 - onnxruntime raises many types; name the failure
            raise QuantizeError(f"onnxruntime could not quantize this graph ({type(e).__name__}: "
                                f"{str(e).strip().splitlines()[0] if str(e).strip() else e!r})") from None
        proto = onnx.load(str(out))
    source = onnx.load_from_string(fp32)
    del proto.metadata_props[:]
    for p in source.metadata_props:
        entry = proto.metadata_props.add()
        entry.key, entry.value = p.key, p.value
    entry = proto.metadata_props.add()
    entry.key, entry.value = "quantization", f"int8 static QDQ, per-channel 7-bit weights, {len(calibration)} train images"
    return proto.SerializeToString()


# operators onnxruntime's CPU provider runs in int8 when a QDQ pair surrounds them
INT8_KERNELS = {"Conv", "MatMul", "Gemm", "Add", "Mul", "MaxPool", "AveragePool", "GlobalAveragePool", "Relu", "Resize"}
COMPUTE = INT8_KERNELS | {"Sub", "Div", "Gelu", "Erf", "ReduceMean", "ReduceMax", "BatchNormalization", "Sigmoid",
                          "Tanh", "Softmax", "Pow", "Sqrt"}


def float_ops(data: bytes) -> list[str]:
    """The compute operators of a QDQ graph left in float: without an int8 kernel, or not quantized."""
    import onnx

    graph = onnx.load_from_string(data).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return sorted({n.op_type for n in graph.node if n.op_type in COMPUTE
                   and (n.op_type not in INT8_KERNELS or not set(n.input) & dequantized)})


def session(data: bytes, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def logits(sess, x: torch.Tensor, batch: int = 256) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch].numpy()})[0] for i in range(0, len(x), batch)])


def throughput(sessions: dict, x: torch.Tensor, batch: int, rounds: int = 5, seconds: float = 0.5) -> dict:
    """Images per second of each session at `batch`, as mean and std over `rounds`; the sessions take turns
    within each round, so the machine's load falls on both alike."""
    feed = x[:batch].numpy()
    rates: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():  # warm-up
        s.run(None, {s.get_inputs()[0].name: feed})
    for _ in range(rounds):
        for name, s in sessions.items():
            inp, n, t0 = {s.get_inputs()[0].name: feed}, 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                s.run(None, inp)
                n += 1
            rates[name].append(n * batch / (time.perf_counter() - t0))
    return {k: (statistics.fmean(v), statistics.stdev(v)) for k, v in rates.items()}


def speed(fp32: bytes, int8: bytes, x: torch.Tensor, seconds: float = 0.5) -> dict:
    """Throughput of the two graphs at batch 1 and 64 (mean ± std over 5 rounds of `seconds` each, the two
    taking turns), the speed-ups, the sizes, and the operators the int8 graph leaves in float."""
    sessions = {"fp32": session(fp32), "int8": session(int8)}
    out = {"fp32_bytes": len(fp32), "int8_bytes": len(int8), "size_ratio": len(int8) / len(fp32),
           "float_ops": float_ops(int8), "threads": torch.get_num_threads(), "seconds_per_round": seconds}
    for batch in (1, 64):
        for k, (mean, std) in throughput(sessions, x, batch, seconds=seconds).items():
            out[f"{k}_img_per_s_b{batch}"], out[f"{k}_img_per_s_b{batch}_std"] = mean, std
        out[f"speedup_{batch}"] = out[f"int8_img_per_s_b{batch}"] / out[f"fp32_img_per_s_b{batch}"]
    return out


def table(r: dict) -> str:
    """The speed measurement as a Markdown table (measured figures only: no goal is claimed)."""
    rows = [("file size", f"{r['fp32_bytes'] / 2**20:.2f} MiB", f"{r['int8_bytes'] / 2**20:.2f} MiB",
             f"{r['size_ratio']:.2f}x")]
    for b in (1, 64):
        rows.append((f"img/s, batch {b}", f"{r[f'fp32_img_per_s_b{b}']:.0f} ± {r[f'fp32_img_per_s_b{b}_std']:.0f}",
                     f"{r[f'int8_img_per_s_b{b}']:.0f} ± {r[f'int8_img_per_s_b{b}_std']:.0f}",
                     f"{r[f'speedup_{b}']:.2f}x"))
    lines = ["| onnxruntime, CPU | fp32 graph | int8 graph | int8 / fp32 |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    note = f"operators left in float: {', '.join(r['float_ops']) or 'none'}"
    return "\n".join(lines) + (f"\n\n5 rounds of {r['seconds_per_round']:g} s per graph and batch size, taking turns, "
                               f"{r['threads']} threads; {note}\n")
