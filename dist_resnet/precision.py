"""Mixed precision in one object: the resolved `train.precision`, its autocast dtype, and the autocast
context every forward runs under (training, evaluation, predict, the warm-up)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .config import ConfigError, Precision

DTYPES = {Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16, Precision.fp32: torch.float32}


# oneDNN's ISA caps (ONEDNN_MAX_CPU_ISA) under which its convolutions still have bf16 kernels
ONEDNN_BF16_ISAS = {"AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "ALL"}


def cpu_bf16_support() -> dict:
    """Whether this CPU computes bf16 natively, and why: the CPU must have AMX tiles or AVX512-BF16, torch's
    kernels must run at AVX512 (ATEN_CPU_CAPABILITY may lower them) and oneDNN's ISA cap
    (ONEDNN_MAX_CPU_ISA) must allow its bf16 convolutions. Without all three, bf16 autocast is emulated
    with conversions and runs slower than fp32."""
    amx, avx512_bf16 = torch.cpu._is_amx_tile_supported(), torch.cpu._is_avx512_bf16_supported()
    aten = torch.backends.cpu.get_cpu_capability()
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    native = False
    if not (amx or avx512_bf16):
        why = "the CPU has neither AMX nor AVX512-BF16"
    elif not aten.startswith("AVX512"):
        why = f"torch's CPU kernels run at {aten} (ATEN_CPU_CAPABILITY), below AVX512"
    elif onednn and onednn not in ONEDNN_BF16_ISAS:
        why = f"ONEDNN_MAX_CPU_ISA={onednn} leaves oneDNN no bf16 convolutions"
    else:
        native, why = True, f"the CPU has {'AMX' if amx else 'AVX512-BF16'} and torch's kernels run at {aten}"
    return {"native": native, "why": why, "amx": amx, "avx512_bf16": avx512_bf16, "aten_capability": aten,
            "onednn_max_isa": onednn or None}


def resolve_precision(precision: Precision, device: torch.device) -> tuple[Precision, str]:
    """The one rule for `train.precision` (training, evaluate, predict and bench all come here), and why:
    `auto` is bf16 on a GPU that has it (fp16 on one that has not), and on a CPU bf16 where the CPU computes
    it natively (cpu_bf16_support), fp32 elsewhere."""
    if precision != Precision.auto:
        return precision, "as set"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision.bf16, "auto: this GPU computes bf16"
        return Precision.fp16, "auto: this GPU has no bf16"
    support = cpu_bf16_support()
    return (Precision.bf16 if support["native"] else Precision.fp32), f"auto: {support['why']}"


@dataclass(frozen=True)
class Amp:
    """`train.precision` on a device: `with amp.autocast(): ...`; `amp.dtype` is what batches arrive in."""

    precision: Precision  # resolved: never auto
    device: torch.device
    why: str = "as set"  # how it was chosen: "as set", or "auto: " and the reason

    @classmethod
    def on(cls, precision: Precision, device: torch.device) -> "Amp":
        """The precision for `device`; ConfigError for bf16 on a GPU that has none."""
        resolved, why = resolve_precision(precision, device)
        if resolved == Precision.bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("train.precision=bf16 but this GPU has no bf16; use train.precision=fp16")
        return cls(resolved, device, why)

    def describe(self) -> str:
        """`bf16 (auto: the CPU has AVX512-BF16 and ...)`, or `fp32 (as set)`: the start line, metrics.json
        and the model card say it so."""
        return f"{self.precision.value} ({self.why})"

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.precision]

    def input_dtype(self, fp32_input: bool) -> torch.dtype:
        """What images are normalised in and handed to the model: the AMP dtype, or fp32 with
        `data.fp32_input`. Training, evaluate and predict all take it from here."""
        return torch.float32 if fp32_input else self.dtype

    @property
    def enabled(self) -> bool:
        return self.precision != Precision.fp32

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.enabled)
