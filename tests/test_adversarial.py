"""The attacks and robust evaluation: the threat model in pixel units and the attacks' sanity on a trained
net and real images. Adversarial training itself: tests/test_adversarial_training.py.

The attacked net is the suite's trained checkpoint (the cpu preset, 4 epochs on the 5,000-image subset)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dist_resnet import evaluate as evaluate_cli
from dist_resnet.attacks import Adversary, RobustEval, Threat, fgsm, pgd
from dist_resnet.config import DataConfig, Pipeline
from tests.loaders import test_data

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def net_and_images(trained_run, betons):
    """The trained net (eval mode, channels_last as trained) and 250 test images, normalised, with labels."""
    from dist_resnet.trained import build_trained, open_trained

    mf, trained, cfg = open_trained(str(trained_run / "last.pt"), [f"data.dir={betons}"])
    model = build_trained(mf, trained, cfg, 10).to(memory_format=torch.channels_last)
    data = test_data(DataConfig(dir=str(betons), pipeline=Pipeline.device), 250, CPU, torch.float32, True,
                    mean=mf.mean, std=mf.std)
    x, y = next(iter(data))
    return model, x, y, mf.mean, mf.std


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def pixels(x: torch.Tensor, mean, std) -> torch.Tensor:
    return x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)


@pytest.mark.parametrize("attack", ["fgsm_zero", "fgsm_rs", "pgd", "pgd_restarts"])
def test_every_perturbation_stays_in_the_pixel_ball_and_in_the_unit_box(net_and_images, attack):
    """The threat model is in pixel units: |p_adv - p| <= eps/255 per pixel and p_adv in [0, 1], with eps
    scaled by 1/std per channel in the normalised inputs; FGSM from zero with alpha >= eps moves every pixel
    to the edge of the ball, unless the box stops it."""
    model, x, y, mean, std = net_and_images
    threat, eps = Threat.linf(8, mean, std, CPU), 8 / 255
    if attack == "fgsm_zero":
        adv = fgsm(model, x, y, threat, alpha=10, random_start=False)
    elif attack == "fgsm_rs":  # as in training: train mode (a copy: BatchNorm statistics move)
        import copy

        training = copy.deepcopy(model).train()
        adv = Adversary("fgsm", 8, 10, 1, True, mean, std, CPU, seed=0, rank=0, world=1, global_batch=len(x))(
            training, x, y, step=3, micro=0)
        assert all(p.grad is None for p in training.parameters())  # the input's gradient only
    else:
        adv = pgd(model, x, y, threat, 2, 4, restarts=2 if attack == "pgd_restarts" else 1,
                  early_stop=attack == "pgd_restarts")[0]
    assert adv.is_contiguous(memory_format=torch.channels_last)
    p, p_adv = pixels(x, mean, std), pixels(adv, mean, std)
    moved = (p_adv - p).abs()
    assert moved.max() <= eps + 1e-6 and p_adv.min() >= -1e-6 and p_adv.max() <= 1 + 1e-6
    assert moved.max() >= eps - 1e-6  # the attack uses its budget
    if attack == "fgsm_zero":  # every pixel at the edge of the ball, or at the box
        edge = (moved - eps).abs() < 1e-5
        boxed = (p_adv < 1e-6) | (p_adv > 1 - 1e-6)
        assert (edge | boxed).float().mean() > 0.99
        per_channel = (adv - x).abs().amax(dim=(0, 2, 3))  # in normalised units: eps / std_c
        assert torch.allclose(per_channel, eps / torch.tensor(std), rtol=1e-4)


def test_accuracy_falls_from_clean_to_fgsm_to_pgd_and_to_zero_at_a_large_eps(net_and_images):
    """Sanity of the attacks on a trained net and 250 real test images: clean >= FGSM >= PGD, and a large
    ball breaks every image (a gradient-masked net or a broken attack would keep some)."""
    model, x, y, mean, std = net_and_images
    clean = accuracy(model, x, y)
    threat = Threat.linf(8, mean, std, CPU)
    fgsm_acc = accuracy(model, fgsm(model, x, y, threat, alpha=10, random_start=True), y)
    robust = RobustEval(8, 2, 10, 1, mean, std, CPU)
    pgd_acc = robust(model, x, y, 0).float().mean().item()
    large = RobustEval(64, 8, 10, 1, mean, std, CPU)(model, x, y, 0).float().mean().item()  # 10 x 8 > 64
    small = RobustEval(1, 0.25, 10, 1, mean, std, CPU)(model, x, y, 0).float().mean().item()
    print(f"clean {clean:.3f}  FGSM {fgsm_acc:.3f}  PGD-10 {pgd_acc:.3f}  (eps 8)  eps 1: {small:.3f}  eps 64: {large:.3f}")
    # eps 64: PGD-10 of step 8 reaches the ball's edge (10 x 8 > 64), and must still break every image
    assert clean > 0.4  # the trained net (measured 0.59 on these 250 images, of classes 0-2; 0.47 on 500)
    assert clean >= small >= pgd_acc and clean > fgsm_acc >= pgd_acc and large <= 0.01


def test_evaluate_cli_reports_accuracy_under_pgd(trained_run, betons, tmp_path, capsys):
    out = tmp_path / "r.json"
    evaluate_cli.main([str(trained_run / "last.pt"), f"data.dir={betons}", "--attack", "pgd", "--steps", "2",
                       "--restarts", "2", "--eps", "4", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["attack"] == "PGD-2, 2 restart(s), eps 4/255, alpha 2/255" and r["test_count"] == 1000
    assert 0 < r["test_robust_acc"] < r["test_acc"]
    with pytest.raises(SystemExit) as bad:  # the CLI, in-process
        evaluate_cli.main([str(trained_run / "last.pt"), f"data.dir={betons}", "--attack", "pgd", "--eps", "0"])
    err = capsys.readouterr().err
    assert bad.value.code == 2 and "'adv.eps': 0; it must be in (0, 255]" in err and len(err.strip().splitlines()) == 1


def test_evaluate_repeats_the_runs_own_final_evaluation_exactly(tiny_betons, tmp_path):
    """A bf16 run that normalises in fp32 (data.fp32_input), attacked at evaluation with its own seed:
    `evaluate --attack pgd` on its checkpoint gives the very numbers of the run's last evaluation. The
    robust check's cadence (adv.eval_every=0): the attack runs at the end only."""
    from dist_resnet import train
    from tests.conftest import TINY

    run_dir = tmp_path / "run"
    train.main([*TINY, f"data.dir={tiny_betons}", f"run.dir={run_dir}", "train.epochs=2", "train.precision=bf16",
                "data.fp32_input=true", "train.eval_attack=pgd", "adv.eval_steps=1", "adv.eval_restarts=1",
                "adv.eps=2", "train.seed=5", "adv.eval_every=0",  # 1 step from a random start: the seed shows
                "model.width=4"])  # bf16 is emulated on a CPU without it: 59 s of the suite at width 8 on AVX2
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    assert "test_robust_acc" not in history[0] and "test_robust_acc" in history[1]
    r = evaluate_cli.main([str(run_dir / "last.pt"), f"data.dir={tiny_betons}", "--attack", "pgd",
                           "--out", str(tmp_path / "not" / "yet" / "r.json")])  # a folder made for it
    last = history[-1]
    assert (r["test_loss"], r["test_acc"], r["test_robust_acc"]) == (
        last["test_loss"], last["test_acc"], last["test_robust_acc"])
    assert json.loads((tmp_path / "not" / "yet" / "r.json").read_text())["test_robust_acc"] == last["test_robust_acc"]
    from dist_resnet.predict import TorchModel

    m = TorchModel(str(run_dir / "last.pt"), CPU, ema=False)  # predict normalises as the run did: in fp32
    assert m.inputs(np.zeros((2, 32, 32, 3), np.uint8)).dtype == torch.float32 and m.amp.dtype == torch.bfloat16
