"""Adversarial training: the robustness it buys against standard training of twice its budget, DDP
equivalence with counted all-reduces, a bit-identical resume, and AMP, channels_last and compile.
The attacks themselves: tests/test_adversarial.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dist_resnet import evaluate as evaluate_cli
from dist_resnet.checkpoint import load
from tests.conftest import ROOT, TINY, TRAINED_EPOCHS, shared
from tests.launch import launch
from tests.runs import assert_same_run, metrics, relative_distance


# ---------------------------------------------------------------- adversarial training buys robustness
ADV_EPOCHS = TRAINED_EPOCHS // 2


@pytest.fixture(scope="session")
def adversarial_run(betons, tmp_path_factory) -> Path:
    """The trained_run's recipe (cpu preset, subset) with FGSM-RS training at eps 8, for half its 4 epochs."""
    import contextlib
    import io

    from dist_resnet import train

    def build(run_dir: Path) -> None:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            train.main(["--config", str(ROOT / "configs" / "cpu.yaml"), f"data.dir={betons}", f"run.dir={run_dir}",
                        f"train.epochs={ADV_EPOCHS}", "run.progress=false", "train.adversarial=fgsm",
                        "train.eval_attack=pgd", "adv.eval_steps=10", "adv.check_images=100",
                        f"train.eval_every={ADV_EPOCHS}"])  # the test set (and its attack) once, at the end;
        # precision auto: bf16 on a CPU that computes it, fp32 elsewhere (the cpu preset steps 1.7x faster in bf16
        # there: docs/reports/cpu-2026-12-06). This fixture was the suite's longest: 148 s of a 10-minute budget
        # at 4 epochs in bf16 on an AVX512 EPYC, 270-304 s in fp32 on an AVX2 one; 2 epochs halve it
        (run_dir / "stdout.txt").write_text(out.getvalue())

    return shared(tmp_path_factory, "adversarial_run", build)


@pytest.mark.slow  # the suite's longest fixture (206 s of a worker on an AVX2 CPU); the collapse check and
# best_robust.pt are also checked on the resume test's tiny run below
def test_adversarial_training_is_clearly_more_robust_in_half_the_budget(adversarial_run, trained_run, betons):
    """Same recipe, half the epochs (2 of the standard run's 4); PGD-10 at eps 8 on the 1,000 test images."""
    adv = metrics(adversarial_run)
    r = evaluate_cli.main([str(trained_run / "last.pt"), f"data.dir={betons}", "--attack", "pgd", "--steps", "10",
                           "train.precision=auto"])  # evaluated in the adversarial run's precision
    print(f"standard: clean {r['test_acc']:.3f} PGD-10 {r['test_robust_acc']:.3f}; adversarial: clean "
          f"{adv['test_acc']:.3f} PGD-10 {adv['test_robust_acc']:.3f}")
    assert adv["robust_eval"] == "PGD-10, 1 restart(s), eps 8/255, alpha 2/255" and adv["test_count"] == 1000
    # 4 epochs in bf16: 0.188 vs 0.034 (clean 0.31 vs 0.52); 2 epochs in fp32 on 2 threads: 0.165 (clean 0.24)
    assert adv["test_robust_acc"] > r["test_robust_acc"] + 0.10
    # the collapse check ran every epoch on its 100 train images and best_robust.pt holds its best epoch
    history = adv["history"]
    assert all(0 <= h["check_robust_acc"] <= h["check_acc"] for h in history) and len(history) == ADV_EPOCHS
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
    ref = metrics(tmp_path / "ref")  # the collapse check ran on its 50 train images; best_robust.pt holds the epoch
    h = ref["history"][0]
    assert 0 <= h["check_robust_acc"] <= h["check_acc"] and ref["collapses"] == []
    assert load(tmp_path / "ref" / "best_robust.pt")["epoch"] == 1
    assert ref["best_check_robust_acc"] == h["check_robust_acc"]
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
    # width 2 and a small collapse check: fp16's convolution backward has no fast kernel on a CPU (75x bf16's
    # time here), and what is checked is that the loss-scaled attack trains and evaluates, not the accuracy
    argv = [*TINY, f"data.dir={tiny_betons}", f"run.dir={tmp_path / 'run'}", "train.epochs=1", "model.width=2",
            f"train.precision={precision}", f"data.pipeline={pipeline}", f"model.compile={str(compiled).lower()}",
            "train.adversarial=fgsm", "train.eval_attack=pgd", "adv.eval_steps=3", "adv.check_images=20",
            "adv.check_steps=2"]
    codes = launch("dist_resnet.train", argv, tmp_path / "log")
    assert codes == [0], (tmp_path / "log").read_text()
    m = metrics(tmp_path / "run")
    assert m["precision"] == precision and m["completed"] and 0 <= m["test_robust_acc"] <= m["test_acc"]
    assert m["history"][0]["train_loss"] < 2.4  # finite and learning (ln 10 = 2.30 at chance, smoothing 0.2)
