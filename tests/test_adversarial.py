"""Adversarial training and robust evaluation: the threat model in pixel units, the attacks' sanity on
a trained net and real images, the robustness that adversarial training buys, and DDP equivalence.

The attacked net is the suite's trained checkpoint (the cpu preset, 4 epochs on the 5,000-image subset)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_resnet import evaluate as evaluate_cli
from dist_resnet.attacks import Adversary, RobustEval, Threat, fgsm, pgd
from dist_resnet.checkpoint import load
from dist_resnet.config import DataConfig, Pipeline
from tests.loaders import test_data
from tests.conftest import ROOT, TINY, TRAINED_EPOCHS, run, shared
from tests.launch import launch
from tests.runs import assert_same_run, metrics, relative_distance

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def net_and_images(trained_run, betons):
    """The trained net (eval mode, channels_last as trained) and 500 test images, normalised, with labels."""
    from dist_resnet.trained import build_trained, open_trained

    mf, trained, cfg = open_trained(str(trained_run / "last.pt"), [f"data.dir={betons}"])
    model = build_trained(mf, trained, cfg, 10).to(memory_format=torch.channels_last)
    data = test_data(DataConfig(dir=str(betons), pipeline=Pipeline.device), 500, CPU, torch.float32, True,
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
    """Sanity of the attacks on a trained net and 500 real test images: clean >= FGSM >= PGD, and a large
    ball breaks every image (a gradient-masked net or a broken attack would keep some)."""
    model, x, y, mean, std = net_and_images
    clean = accuracy(model, x, y)
    threat = Threat.linf(8, mean, std, CPU)
    fgsm_acc = accuracy(model, fgsm(model, x, y, threat, alpha=10, random_start=True), y)
    robust = RobustEval(8, 2, 10, 1, mean, std, CPU)
    pgd_acc = robust(model, x, y, 0).float().mean().item()
    large = RobustEval(64, 8, 20, 1, mean, std, CPU)(model, x, y, 0).float().mean().item()
    small = RobustEval(1, 0.25, 10, 1, mean, std, CPU)(model, x, y, 0).float().mean().item()
    print(f"clean {clean:.3f}  FGSM {fgsm_acc:.3f}  PGD-10 {pgd_acc:.3f}  (eps 8)  eps 1: {small:.3f}  eps 64: {large:.3f}")
    assert clean > 0.4  # the trained net (measured 0.47 on these 500 images, of classes 0-4)
    assert clean >= small >= pgd_acc and clean > fgsm_acc >= pgd_acc and large <= 0.01


def test_evaluate_cli_reports_accuracy_under_pgd(trained_run, betons, tmp_path):
    out = tmp_path / "r.json"
    evaluate_cli.main([str(trained_run / "last.pt"), f"data.dir={betons}", "--attack", "pgd", "--steps", "2",
                       "--restarts", "2", "--eps", "4", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["attack"] == "PGD-2, 2 restart(s), eps 4/255, alpha 2/255" and r["test_count"] == 1000
    assert 0 < r["test_robust_acc"] < r["test_acc"]
    bad = run([*evaluate_cli_cmd(trained_run, betons), "--attack", "pgd", "--eps", "0"], check=False)
    assert bad.returncode == 2 and "'adv.eps': 0; it must be in (0, 255]" in bad.stderr, bad.stderr


def evaluate_cli_cmd(trained_run: Path, betons: Path) -> list[str]:
    import sys

    return [sys.executable, "-m", "dist_resnet.evaluate", str(trained_run / "last.pt"), f"data.dir={betons}"]


# ---------------------------------------------------------------- adversarial training buys robustness
@pytest.fixture(scope="session")
def adversarial_run(betons, tmp_path_factory) -> Path:
    """The trained_run's recipe (cpu preset, 4 epochs, subset) with FGSM-RS training at eps 8."""
    import contextlib
    import io

    from dist_resnet import train

    def build(run_dir: Path) -> None:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            train.main(["--config", str(ROOT / "configs" / "cpu.yaml"), f"data.dir={betons}", f"run.dir={run_dir}",
                        f"train.epochs={TRAINED_EPOCHS}", "run.progress=false", "train.adversarial=fgsm",
                        "train.eval_attack=pgd", "adv.eval_steps=10", "adv.check_images=100",
                        "train.eval_every=4"])  # the test set (and its attack) once, at the end
        (run_dir / "stdout.txt").write_text(out.getvalue())

    return shared(tmp_path_factory, "adversarial_run", build)


def test_adversarial_training_is_clearly_more_robust_in_the_same_budget(adversarial_run, trained_run, betons):
    """Same recipe and epochs; PGD-10 at eps 8 on the 1,000 test images."""
    adv = metrics(adversarial_run)
    r = evaluate_cli.main([str(trained_run / "last.pt"), f"data.dir={betons}", "--attack", "pgd", "--steps", "10"])
    print(f"standard: clean {r['test_acc']:.3f} PGD-10 {r['test_robust_acc']:.3f}; adversarial: clean "
          f"{adv['test_acc']:.3f} PGD-10 {adv['test_robust_acc']:.3f}")
    assert adv["robust_eval"] == "PGD-10, 1 restart(s), eps 8/255, alpha 2/255" and adv["test_count"] == 1000
    assert adv["test_robust_acc"] > r["test_robust_acc"] + 0.10  # measured: 0.199 vs 0.038 (clean 0.33 vs 0.52)
    # the collapse check ran every epoch on its 100 train images and best_robust.pt holds its best epoch
    history = adv["history"]
    assert all(0 <= h["check_robust_acc"] <= h["check_acc"] for h in history) and len(history) == TRAINED_EPOCHS
    best = max(history, key=lambda h: h["check_robust_acc"])
    assert load(adversarial_run / "best_robust.pt")["epoch"] == best["epoch"]
    assert adv["best_check_robust_acc"] == best["check_robust_acc"] and adv["collapses"] == []


# ---------------------------------------------------------------- DDP
def test_two_ranks_of_adversarial_training_equal_one_rank_with_the_doubled_batch(tiny_betons, tmp_path):
    """FGSM-RS on GroupNorm, one step of 1,000 images: 2 ranks x 500 and 1 rank x 2 micro-batches of 500
    give the weights of 1 rank x 1,000 up to fp32 reduction order, so each sample got the same random start
    and the same attack wherever it ran. (Over more steps the sign of the input gradient amplifies fp32
    noise: 2 steps measured 8e-5, against 6e-8 for one.) DDP all-reduces exactly as many gradient elements
    as a standard run does: the attack's backward adds none. The robust evaluation counts each test image
    once."""
    opts = [*TINY[2:], f"data.dir={tiny_betons}", "train.epochs=1", "model.norm=group", "train.batch_size=1000",
            "train.eval_attack=pgd", "adv.eval_steps=2", "adv.check_images=64"]
    runs = {"w1": (1, ["train.adversarial=fgsm"]), "w2": (2, ["train.adversarial=fgsm"]),
            "accum": (1, ["train.adversarial=fgsm", "train.accum_steps=2"]), "standard": (2, [])}
    for name, (nproc, extra) in runs.items():
        argv = ["count_allreduce", TINY[0], TINY[1], *opts, f"run.dir={tmp_path / name}", *extra]
        codes = launch("tests.probes", argv, tmp_path / f"{name}.log", nproc,
                       env={"PROBE_OUT": str(tmp_path / f"{name}.count")})
        assert codes == [0] * nproc, (tmp_path / f"{name}.log").read_text()
    one = metrics(tmp_path / "w1")
    for other in ("w2", "accum"):
        rel = relative_distance(tmp_path / "w1", tmp_path / other)
        m = metrics(tmp_path / other)
        print(f"{other}: relative L2 {rel:.1e}, robust {m['test_robust_acc']} vs {one['test_robust_acc']}")
        assert rel < 1e-6, rel  # measured 6e-8
        assert m["history"][0]["train_loss"] == pytest.approx(one["history"][0]["train_loss"], rel=1e-6)
        assert m["test_count"] == 200 and m["history"][0]["check_robust_acc"] is not None
        assert 0 <= m["test_robust_acc"] <= m["test_acc"]
    counts = [json.loads((tmp_path / f"{name}.count.{r}").read_text()) for name in ("w2", "standard") for r in (0, 1)]
    assert counts[0]["steps"] == 1 and all(c == counts[0] for c in counts), counts
    assert counts[0]["elements"] == sum(p.numel() for p in load(tmp_path / "w2" / "last.pt")["model"].values()
                                        if p.is_floating_point())


def test_an_adversarial_run_stopped_mid_epoch_resumes_bit_identically(tiny_betons, tmp_path):
    """The random starts are drawn from (seed, step): a run stopped at step 3 and resumed replays exactly
    the attacks of an uninterrupted one (PGD-2 training, 1 epoch of 10 steps)."""
    opts = [TINY[0], TINY[1], *TINY[2:], f"data.dir={tiny_betons}", "train.epochs=1", "train.adversarial=pgd",
            "adv.steps=2", "adv.check_images=50", "train.stop_check_every=3"]
    codes = launch("dist_resnet.train", [*opts, f"run.dir={tmp_path / 'ref'}"], tmp_path / "ref.log")
    assert codes == [0], (tmp_path / "ref.log").read_text()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "STOP").touch()
    codes = launch("dist_resnet.train", [*opts, f"run.dir={tmp_path / 'run'}"], tmp_path / "a.log")
    assert codes == [75] and load(tmp_path / "run" / "last.pt")["position"]["step"] == 3
    codes = launch("dist_resnet.train", [*opts, f"run.dir={tmp_path / 'run'}", "train.resume=true"], tmp_path / "b.log")
    assert codes == [0], (tmp_path / "b.log").read_text()
    assert_same_run(tmp_path / "ref", tmp_path / "run")


@pytest.mark.parametrize("precision, pipeline, compiled", [
    ("fp16", "ffcv", False),  # the attack's loss scaled by GradScaler's scale
    pytest.param("bf16", "device", True, marks=pytest.mark.slow),  # torch.compile: ~1 min to build on CPU
])
def test_adversarial_training_runs_under_amp_channels_last_and_compile(tiny_betons, tmp_path, precision, pipeline,
                                                                        compiled):
    argv = [*TINY, f"data.dir={tiny_betons}", f"run.dir={tmp_path / 'run'}", "train.epochs=1",
            f"train.precision={precision}", f"data.pipeline={pipeline}", f"model.compile={str(compiled).lower()}",
            "train.adversarial=fgsm", "train.eval_attack=pgd", "adv.eval_steps=3", "adv.check_images=100"]
    codes = launch("dist_resnet.train", argv, tmp_path / "log")
    assert codes == [0], (tmp_path / "log").read_text()
    m = metrics(tmp_path / "run")
    assert m["precision"] == precision and m["completed"] and 0 <= m["test_robust_acc"] <= m["test_acc"]
    assert m["history"][0]["train_loss"] < 2.4  # finite and learning (ln 10 = 2.30 at chance, smoothing 0.2)
