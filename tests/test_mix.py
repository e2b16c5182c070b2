"""Mixup and CutMix (data.mixup_alpha, data.cutmix_alpha): seeded per step, the same on any world size,
the loss timm's soft targets give, and real runs that resume bit-exactly and agree across world sizes."""
from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dist_resnet.checkpoint import load
from dist_resnet.data.mix import Mixed, Mixer, Plain
from tests.conftest import TINY, run
from tests.launch import launch
from tests.runs import assert_same_run, metrics, relative_distance


def batch(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=g).contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("mixup, cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_a_global_batch_mixes_the_same_whichever_rank_or_micro_batch_holds_its_rows(mixup, cutmix):
    x, y = batch()
    mixer = Mixer(mixup, cutmix, 1.0, 0.5, seed=3)
    for step in range(6):
        whole, target = mixer(x, y, step)
        parts = [mixer(x[i:i + 4], y[i:i + 4], step) for i in range(0, 16, 4)]  # 4 ranks, or micro-batches
        assert torch.equal(torch.cat([p[0] for p in parts]), whole)
        assert torch.equal(torch.cat([p[1].label for p in parts]), target.label)
        assert whole.is_contiguous(memory_format=torch.channels_last)


def test_mixup_blends_each_image_with_its_neighbour_and_cutmix_pastes_its_box():
    x, y = batch()
    mixed, t = Mixer(0.8, 0.0, 1.0, 0.5, seed=1)(x, y, 0)
    assert isinstance(t, Mixed) and torch.equal(t.partner, y.view(-1, 2).flip(1).reshape(-1))
    assert torch.allclose(mixed, t.lam * x + (1 - t.lam) * x.view(8, 2, 3, 8, 8).flip(1).reshape(16, 3, 8, 8))
    for step in range(20):
        mixed, t = Mixer(0.0, 1.0, 1.0, 0.5, seed=1)(x, y, step)
        from_partner = (mixed != x).any(1)  # pixels taken from the partner (they differ: random images)
        assert from_partner.float().mean().item() == pytest.approx(1 - t.lam, abs=1e-6)  # lam is the box actually cut
        assert torch.equal(t.label, y if t.lam >= 0.5 else t.partner)
    draws = [Mixer(0.8, 1.0, 0.5, 0.5, seed=1).draw(s, 8, 8) for s in range(400)]
    assert 150 < sum(d is None for d in draws) < 250  # data.mix_prob=0.5
    boxed = [d for d in draws if d is not None and d[1] is not None]
    assert 60 < len(boxed) < 140  # data.switch_prob=0.5 of the mixed steps use CutMix
    assert draws == [Mixer(0.8, 1.0, 0.5, 0.5, seed=1).draw(s, 8, 8) for s in range(400)]  # seeded
    assert draws != [Mixer(0.8, 1.0, 0.5, 0.5, seed=2).draw(s, 8, 8) for s in range(400)]


def test_the_loss_is_timms_soft_target_cross_entropy_with_label_smoothing():
    logits, y = torch.randn(16, 10), torch.randint(0, 10, (16,))
    t = Mixed(y, y.view(-1, 2).flip(1).reshape(-1), 0.7)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)

    def smooth(labels):  # timm.data.mixup.mixup_target
        return F.one_hot(labels, 10).float() * (1 - 0.1) + 0.1 / 10

    soft = 0.7 * smooth(t.y) + 0.3 * smooth(t.partner)
    assert t.loss(criterion, logits).item() == pytest.approx((-soft * logits.log_softmax(1)).sum(1).mean().item())
    assert Plain(y).loss(criterion, logits) == criterion(logits, y)


MIXING = [*TINY, "model.norm=group", "optim.lr=0.02", "data.mixup_alpha=0.8", "data.cutmix_alpha=1.0",
          "data.mix_prob=0.8"]


@pytest.fixture(scope="module")
def mixed_runs(tiny_betons, tmp_path_factory):
    """w1: 2 epochs on 1 rank (the resume test's reference); s1, s2: 6 steps on 1 and 2 ranks (GroupNorm,
    as tests/test_distributed.py: over 20 steps the runs' fp32 rounding differences grow to ~2e-3, mixing
    or not, which would hide a real discrepancy)."""
    d = tmp_path_factory.mktemp("mix")
    argv = [*MIXING, f"data.dir={tiny_betons}"]
    for name, nproc, extra in (("w1", 1, ["train.epochs=2"]), ("s1", 1, ["train.epochs=1", "train.max_steps=6"]),
                               ("s2", 2, ["train.epochs=1", "train.max_steps=6"])):
        codes = launch("dist_resnet.train", [*argv, *extra, f"run.dir={d / name}"], d / f"{name}.log", nproc)
        assert codes == [0] * nproc, (d / f"{name}.log").read_text()
    return d, [*argv, "train.epochs=2"]


def test_two_ranks_mix_as_one_rank_with_the_doubled_batch(mixed_runs):
    d, _ = mixed_runs
    rel = relative_distance(d / "s1", d / "s2")
    print(f"Mixup/CutMix, 2 ranks vs 1: relative L2 {rel:.1e}")
    # the fp32 reduction order only, grown over 20 steps: 6.4e-5 on an AVX2 EPYC, below 5e-5 on an AVX512 one
    # (tests/test_distributed.py, without mixing: ~6e-6); a batch mixed with the wrong partner is ~1e-1
    assert rel < 2e-4, rel
    a, b = metrics(d / "s1")["history"][0], metrics(d / "s2")["history"][0]
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5) and a["train_acc"] == b["train_acc"]


def test_a_killed_mixing_run_resumes_bit_exactly(mixed_runs, tmp_path):
    d, argv = mixed_runs
    log = tmp_path / "log"
    codes = launch("dist_resnet.train", [*argv, f"run.dir={tmp_path / 'r'}"], log, env={"DIST_RESNET_FAULT": "step:14"})
    assert codes == [-9] and load(tmp_path / "r" / "last.pt")["epoch"] == 1
    codes = launch("dist_resnet.train", [*argv, f"run.dir={tmp_path / 'r'}", "train.resume=true"], log)
    assert codes == [0], log.read_text()
    assert_same_run(d / "w1", tmp_path / "r")


@pytest.mark.parametrize("overrides, message", [
    (["train.adversarial=fgsm"], "and train.adversarial=fgsm do not combine here"),
    (["train.batch_size=102", "train.accum_steps=2"], "every micro-batch must be even"),
    (["data.mix_prob=1.5"], "bad value for 'data.mix_prob': 1.5; it must be in [0, 1]"),
])
def test_mixing_that_cannot_work_is_a_one_line_error(tiny_betons, tmp_path, overrides, message):
    p = run([sys.executable, "-m", "dist_resnet.train", *TINY, f"data.dir={tiny_betons}", f"run.dir={tmp_path / 'r'}",
             "data.cutmix_alpha=1.0", *overrides], check=False)
    assert p.returncode == 2 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (tmp_path / "r").exists()
