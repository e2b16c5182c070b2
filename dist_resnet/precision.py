"""Mixed precision in one object: the resolved `train.precision`, its autocast dtype, and the autocast
context every forward runs under (training, evaluation, predict, the warm-up)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ConfigError, Precision

DTYPES = {Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16, Precision.fp32: torch.float32}


def resolve_precision(precision: Precision, cuda: bool) -> Precision:
    """`auto` is bf16 on GPU and fp32 on CPU."""
    return precision if precision != Precision.auto else (Precision.bf16 if cuda else Precision.fp32)


@dataclass(frozen=True)
class Amp:
    """`train.precision` on a device: `with amp.autocast(): ...`; `amp.dtype` is what batches arrive in."""

    precision: Precision  # resolved: never auto
    device: torch.device

    @classmethod
    def on(cls, precision: Precision, device: torch.device) -> "Amp":
        """The precision for `device`; ConfigError for bf16 on a GPU that has none."""
        cuda = device.type == "cuda"
        resolved = resolve_precision(precision, cuda)
        if resolved == Precision.bf16 and cuda and not torch.cuda.is_bf16_supported():
            raise ConfigError("train.precision=bf16 but this GPU has no bf16; use train.precision=fp16")
        return cls(resolved, device)

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
