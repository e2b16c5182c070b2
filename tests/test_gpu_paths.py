"""The GPU-only paths, shown on CPU: what compiles when, what DDP sees, what an out-of-memory says."""
from __future__ import annotations

import pytest
import torch

from tests.runs import build_trainer


ATTACKS = ["train.adversarial=fgsm", "train.eval_attack=pgd", "adv.eval_steps=2", "adv.check_images=50",
           "adv.check_steps=2", "train.precision=bf16", "model.width=4"]  # width 4: bf16 is emulated where the CPU
# lacks it (40 s of the suite at width 8 on an AVX2 EPYC); the graphs counted are the same


@pytest.mark.parametrize("extra", [[], ["train.accum_steps=2"], ATTACKS], ids=["plain", "accumulation", "attacks"])
def test_the_warm_up_compiles_every_shape_the_run_will_see(tiny_betons, tmp_path, eager_compile, extra):
    """The test split's last batch is partial (200 images in batches of 60: 20 left), and with accumulation
    the evaluation's batch (60) is not the training micro-batch (30): each is a new shape, which used to be
    compiled inside the timed run. With attacks, the robust evaluation and the collapse check run the
    forward on inputs that need their gradient, and used to feed them in fp32 beside bf16 batches: graphs
    that counted towards dynamo's limit of 8, past which the forward silently runs uncompiled. After the
    warm-up, steps, two evaluations and the collapse check compile nothing more."""
    trainer = build_trainer(tiny_betons, tmp_path, "model.compile=true", "train.batch_size=60",
                            "train.warmup_steps=2", "train.tta=flip", *extra)
    trainer.warmup(trainer.state)
    graphs = eager_compile()
    assert graphs > 0
    batches = trainer.batches()
    for _ in range(3):
        trainer.train_step(next(batches))
    batches.close()
    trainer.evaluate()
    trainer.evaluate()
    trainer.evaluator.check.after_epoch({}, 1)  # adversarial training's collapse check (a no-op without)
    assert eager_compile() == graphs < 8  # dynamo's default limit, which these runs stay under
    trainer.close()


def test_fast_preset_under_ddp_trains_across_the_whitening_bias_switch(tiny_betons, tmp_path):
    """fast.yaml's whitening bias stops training after model.whiten_bias_epochs; under DDP
    (find_unused_parameters=False) the first step after that used to fail ("Expected to have finished
    reduction in the prior iteration"). 2 gloo ranks across the switch: the run ends, the bias moved in
    epoch 1 and not in epoch 2, on both ranks alike (one checkpoint)."""
    from dist_resnet.checkpoint import load
    from tests.conftest import ROOT
    from tests.launch import launch

    run_dir = tmp_path / "run"
    argv = ["--config", str(ROOT / "configs" / "fast.yaml"), f"data.dir={tiny_betons}", f"run.dir={run_dir}",
            "model.width=8", "train.batch_size=100", "train.epochs=2", "train.max_steps=0", "optim.warmup_epochs=0.5",
            "model.whiten_bias_epochs=1", "model.compile=false", "train.warmup_steps=0", "train.device=cpu",
            "data.num_workers=1", "run.progress=false", "train.tta=none"]
    codes = launch("dist_resnet.train", argv, tmp_path / "log", 2)
    assert codes == [0, 0], (tmp_path / "log").read_text()[-3000:]
    first, last = (load(p)["model"]["stem.bias"] for p in sorted(run_dir.glob("ckpt-*.pt")))
    assert first.abs().sum() > 0 and torch.equal(first, last)


def test_tta_keeps_the_first_view_when_the_model_returns_one_buffer():
    """CUDA-graph compile modes hand back the same output buffer at every call; with fp32 logits `.float()`
    is that buffer, and the mirrored view's call used to overwrite the first view's logits."""
    from dist_resnet.config import TTA
    from dist_resnet.engine.evaluation import predict

    class OneBuffer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.out = torch.zeros(2, 3)

        def forward(self, x):
            self.out.copy_(x.mean((2, 3)))  # every call writes the same tensor, as a CUDA graph's output does
            return self.out

    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4) ** 2
    expected = 0.5 * (x.mean((2, 3)) + x.flip(3).mean((2, 3)))
    assert torch.equal(predict(OneBuffer(), x, TTA.flip), expected)


def test_an_out_of_memory_in_the_warm_up_gets_the_exit_2_advice(tiny_betons, tmp_path, monkeypatch):
    """A CUDA out-of-memory raised in the warm-up's steps used to escape the handler as a raw traceback."""
    from dist_resnet.distributed import EXIT_BAD_INPUT, JobExit
    from dist_resnet.engine import step as step_module

    trainer = build_trainer(tiny_betons, tmp_path, "train.warmup_steps=1")

    def oom(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(step_module.Step, "__call__", oom)
    with pytest.raises(JobExit) as e:
        trainer.fit()
    assert e.value.code == EXIT_BAD_INPUT and "Raise train.accum_steps" in str(e.value)
