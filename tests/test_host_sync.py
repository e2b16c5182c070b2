"""No host sync in the training step, checked on CPU over the configs that change the step (issue 26).

On a GPU, anything that reads a device value on the host (`.item()`, `bool(t)`, `.tolist()`, `.cpu()`,
`nonzero`, boolean-mask indexing) makes the host wait for the GPU's stream to drain. The GPU-only test
(`test_train.py::test_no_host_sync_in_the_training_step_on_a_gpu`) catches them with CUDA's sync debug mode,
on one config; this one records the same operations on CPU, with a TorchDispatchMode (what reaches the
kernels: `_local_scalar_dense` is what `.item()` and `bool()` become) and a TorchFunctionMode (the Python
calls, which on CPU need no kernel: `.cpu()`, `.tolist()`, `__bool__`, `.item()`, `.numpy()`)."""
from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from tests.runs import build_trainer

aten = torch.ops.aten
SYNC_OPS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.unique_consecutive, aten._unique2}
SYNC_CALLS = {torch.Tensor.cpu, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.numpy}


class HostReads(TorchDispatchMode):
    """The kernels that read a device value on the host, by name, with boolean-mask indexing among them."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if packet in SYNC_OPS:
            self.seen.append(str(packet))
        elif packet in (aten.index, aten.index_put, aten.index_put_) and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())):
            self.seen.append(f"{packet} with a boolean mask")
        return func(*args, **(kwargs or {}))


class HostCalls(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in SYNC_CALLS:
            self.seen.append(f"Tensor.{func.__name__}")
        return func(*args, **(kwargs or {}))


def host_reads_in_steps(trainer, steps: int) -> list[str]:
    """What `steps` training steps (none of them a logging step) read on the host. Two steps first, outside
    the record: the epoch's order and the first step's lazy set-ups."""
    batches = trainer.batches()
    for _ in range(2):
        trainer.train_step(next(batches))
    kernels, calls = HostReads(), HostCalls()
    with calls, kernels:
        for _ in range(steps):
            trainer.train_step(next(batches))
    batches.close()
    return kernels.seen + calls.seen


CONFIGS = {
    "device pipeline": [],
    "ffcv": ["data.pipeline=ffcv"],
    "accumulation": ["train.accum_steps=2"],
    "lookahead, EMA": ["optim.lookahead_every=2", "train.ema=true"],
    "mixup and cutmix": ["data.mixup_alpha=0.2", "data.cutmix_alpha=1.0"],
    "fixed fp16 scale": ["train.precision=fp16", "train.loss_scale=1024"],
    "bf16": ["train.precision=bf16"],
    "fgsm": ["train.adversarial=fgsm"],
    "pgd": ["train.adversarial=pgd", "adv.steps=2"],
}


@pytest.mark.parametrize("extra", CONFIGS.values(), ids=CONFIGS.keys())
def test_no_host_read_in_the_training_step(tiny_betons, tmp_path, extra):
    trainer = build_trainer(tiny_betons, tmp_path, "train.log_every=100", *extra)
    try:
        assert host_reads_in_steps(trainer, 5) == []
    finally:
        trainer.close()


def test_no_host_read_in_a_compiled_step(tiny_betons, tmp_path, eager_compile):
    trainer = build_trainer(tiny_betons, tmp_path, "train.log_every=100", "model.compile=true",
                            "train.warmup_steps=2")
    try:
        trainer.warmup(trainer.state)
        assert host_reads_in_steps(trainer, 3) == []
    finally:
        trainer.close()


def test_dynamic_fp16_reads_the_overflow_flag_once_per_step(tiny_betons, tmp_path):
    """GradScaler's dynamic scale must know on the host whether to skip a step: one read per step, where
    GradScaler.step would add a second."""
    trainer = build_trainer(tiny_betons, tmp_path, "train.log_every=100", "train.precision=fp16")
    try:
        assert host_reads_in_steps(trainer, 4) == ["aten._local_scalar_dense"] * 4 + ["Tensor.item"] * 4
    finally:
        trainer.close()


def test_the_recorder_sees_what_it_looks_for():
    """The modes catch each kind of read (a test that sees nothing must see nothing for a reason)."""
    kernels, calls = HostReads(), HostCalls()
    t = torch.arange(4.0)
    with calls, kernels:
        t.sum().item(), bool(t[0]), t.tolist(), t.cpu(), t[t > 1], t.nonzero()
    assert kernels.seen == ["aten._local_scalar_dense", "aten._local_scalar_dense", "aten.index with a boolean mask",
                            "aten.nonzero"], kernels.seen
    assert calls.seen == ["Tensor.item", "Tensor.__bool__", "Tensor.tolist", "Tensor.cpu"], calls.seen
