"""End to end on CPU: the `cpu` preset trains on real data, writes its run record and refuses to
overwrite. Same seed -> same run is proven in test_reliability.py and test_distributed.py, where
stopped, killed, requeued and restarted runs must equal an uninterrupted one bit for bit."""
import json

import pytest
import torch

from dist_resnet import train as train_module
from tests.conftest import TRAINED_EPOCHS as EPOCHS

ACC_FLOOR = 0.45  # measured 54.3% (seed 0) and 54.0% (seed 1) on 2 cores; chance is 10%


@pytest.fixture(scope="module")
def cpu_run(trained_run):
    return trained_run, json.loads((trained_run / "metrics.json").read_text()), (trained_run / "stdout.txt").read_text()


def test_cpu_preset_learns_and_writes_its_run_record(cpu_run):
    run_dir, m, stdout = cpu_run
    assert m["test_acc"] >= ACC_FLOOR, m
    assert m["test_count"] == 1000 and m["epochs"] == EPOCHS and len(m["history"]) == EPOCHS
    assert m["train_time_s"] > 0 and all(r["test_count"] == 1000 for r in m["history"])
    assert (run_dir / "config.yaml").is_file() and "resnet9" in (run_dir / "config.yaml").read_text()
    assert (run_dir / "last.pt").is_file() and (run_dir / "best.pt").is_file()
    assert "done: test acc" in stdout
    per_class = json.loads((run_dir / "per_class.json").read_text())  # the final evaluation, per class
    assert sum(map(sum, per_class["confusion"])) == 1000 and len(per_class["accuracy"]) == 10
    assert sum(per_class["accuracy"].values()) / 10 == pytest.approx(m["test_acc"])  # 100 test images per class
    assert (run_dir / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tensorboard_events_hold_the_promised_tags(cpu_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _, _ = cpu_run
    ea = EventAccumulator(str(run_dir))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/img_per_s", "test/loss", "test/acc", "time/step_ms",
            "time/data_wait_pct"} <= tags
    assert len(ea.Scalars("test/acc")) == EPOCHS
    waits = [e.value for e in ea.Scalars("time/data_wait_pct")]
    steps = [e.value for e in ea.Scalars("time/step_ms")]
    assert waits and all(0 <= w < 100 for w in waits) and all(s > 0 for s in steps)  # a share of the step time


def test_checkpoint_holds_everything_needed_to_resume(cpu_run):
    from dist_resnet.checkpoint import FORMAT_VERSION, load

    run_dir, m, _ = cpu_run
    ckpt = load(run_dir / "last.pt")  # weights_only=True: a real run's checkpoint needs nothing more
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "config", "data", "classes"} <= set(ckpt)
    assert ckpt["epoch"] == EPOCHS and ckpt["config"]["model"]["name"] == "resnet9"
    assert ckpt["format_version"] == FORMAT_VERSION and len(ckpt["classes"]) == 10
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    best = load(run_dir / "best.pt")
    assert max(r["test_acc"] for r in best["history"]) == m["best_test_acc"]
    assert sorted(p.name for p in run_dir.glob("ckpt-*.pt")) == ["ckpt-00000057.pt", "ckpt-00000076.pt"]  # keep_last=2


def test_the_checkpoint_keeps_its_keys_and_format(cpu_run):
    """The keys every version of the trainer wrote (FORMAT_VERSION 1), whatever component now owns each:
    older checkpoints resume, and tools that read them keep working."""
    from dist_resnet.checkpoint import FORMAT_VERSION, load
    from dist_resnet.engine.state import KEYS

    keys = ["format_version", "model", "optimizer", "scheduler", "scaler", "epoch", "step", "position", "best_acc",
            "history", "ema", "lookahead", "rollbacks", "config", "world_size", "best_robust", "collapses", "data",
            "classes", "normalize", "image_shape", "monitor", "comm_hook", "precision", "distill", "widths"]  # monitor,
    # comm_hook, precision, distill, widths: added with early stopping, the DDP communication hooks (None without
    # PowerSGD), the precision record (each stretch of steps' precision), distillation (None without a teacher) and
    # pruning (every layer's width)
    assert FORMAT_VERSION == 1 and list(KEYS) == keys[1:]
    ckpt = load(cpu_run[0] / "last.pt")
    assert list(ckpt) == keys and ckpt["ema"] is None and ckpt["lookahead"] is None and ckpt["rollbacks"] == []
    assert ckpt["distill"] is None and ckpt["widths"]["fc"] == [128, 10]  # resnet9 at width 16: 8 x 16 features
    assert ckpt["comm_hook"] is None and ckpt["precision"] == [{"from_step": 0, "precision": "fp32", "why": "as set"}]
    assert ckpt["scaler"] == {} and ckpt["best_robust"] == -1.0 and ckpt["collapses"] == []


def test_existing_run_is_not_overwritten_without_resume(betons, cpu_run, capsys):
    run_dir, _, _ = cpu_run
    before = (run_dir / "last.pt").stat().st_mtime_ns
    with pytest.raises(SystemExit) as e:  # the CLI, in-process
        train_module.main(["--config", "configs/cpu.yaml", f"data.dir={betons}", f"run.dir={run_dir}"])
    assert e.value.code == 2 and "train.resume=true" in capsys.readouterr().err
    assert (run_dir / "last.pt").stat().st_mtime_ns == before


@pytest.mark.parametrize("overrides, message", [
    (["train.batch_size=255"], "does not divide by the world size 2 x train.accum_steps 1"),
    (["train.accum_steps=3"], "does not divide by the world size 2 x train.accum_steps 3"),
    (["model.sync_bn=true"], "on CPU use model.norm=group"),
])
def test_bad_distributed_settings_fail_before_anything_starts(betons, tmp_path, overrides, message):
    """Checked in-process with a 2-rank environment: these errors come before any collective."""
    from dist_resnet.config import ConfigError, load_config
    from dist_resnet.distributed import DistEnv
    from dist_resnet.train import Trainer
    from tests.conftest import ROOT

    cfg = load_config(ROOT / "configs" / "cpu.yaml", [f"data.dir={betons}", f"run.dir={tmp_path}", *overrides])
    with pytest.raises(ConfigError, match=message):
        Trainer(cfg, DistEnv(rank=0, world_size=2, local_rank=0, local_world_size=2, device=torch.device("cpu")))
    assert not (tmp_path / "config.yaml").exists()


FAST_FLOOR = 0.42  # measured 54.6, 56.5, 54.0, 49.5 % (seeds 0-3, 2026-12-07; airbench94's SGD recipe: 42.7 %)


def test_fast_preset_trains_with_whitening_muon_and_tta(betons, tmp_path, capsys):
    """configs/fast.yaml (airbench94_muon's recipe) on CPU at an eighth of the width, 4 epochs of batch 500:
    the whitening stem is fitted and stays frozen, its bias trains for 3 epochs, Muon keeps each filter's
    norm at sqrt(out channels), and evaluation with and without TTA agrees on the count."""
    from dist_resnet import evaluate
    from dist_resnet.checkpoint import load

    run_dir = tmp_path / "fast"
    train_module.main(["--config", "configs/fast.yaml", f"data.dir={betons}", f"run.dir={run_dir}",
                       "train.device=cpu", "model.compile=false", "model.width=8", "train.epochs=4",
                       "train.batch_size=500", "data.num_workers=2", "run.progress=false", "train.warmup_steps=0"])
    stdout = capsys.readouterr().out
    m = json.loads((run_dir / "metrics.json").read_text())
    print(f"fast preset, width 8, 4 epochs on the subset: {m['test_acc']:.3f} (6-view TTA)")
    assert m["test_acc"] >= FAST_FLOOR and m["test_count"] == 1000 and "first step after" in stdout
    assert m["first_step_s"] > 0 and m["eval_time_s"] > 0 and len(m["history"]) == 4
    ckpt = load(run_dir / "last.pt")
    w = ckpt["model"]["stem.weight"]
    assert torch.equal(w[12:], -w[:12]) and ckpt["lookahead"] is None
    assert [g["muon"] for g in ckpt["optimizer"]["param_groups"]].count(True) == 1
    filters = {k: v for k, v in ckpt["model"].items() if v.ndim == 4 and k != "stem.weight"}
    assert len(filters) == 6 and all(abs(v.norm() / len(v) ** 0.5 - 1) < 0.05 for v in filters.values())
    # the whitening bias froze after epoch 3 (of 4): epoch 4 left it as epoch 3 did, while it moved before
    # (keep_last=2 holds both checkpoints)
    assert ckpt["step"] == 40 and ckpt["scheduler"]["last_epoch"] == 40 and m["completed"]
    epoch3 = load(sorted(run_dir.glob("ckpt-*.pt"))[0])
    assert epoch3["step"] == 30 and torch.equal(epoch3["model"]["stem.bias"], ckpt["model"]["stem.bias"])
    assert epoch3["model"]["stem.bias"].abs().sum() > 0
    plain = evaluate.main([str(run_dir / "last.pt"), "train.tta=none"])  # the CLI, in-process
    assert plain["tta"] == "none" and plain["test_count"] == 1000
    assert abs(plain["test_acc"] - m["test_acc"]) < 0.1


def test_the_warm_up_is_untimed_and_leaves_the_run_bit_identical(tiny_betons, tmp_path):
    """train.warmup_steps runs training steps and an evaluation forward on throw-away data before the timed
    run (compile and autotune on GPU), then restores everything: the run equals one without it, bit for bit,
    with lookahead and EMA in the state (fp32: fp16 autocast is emulated on CPU and 4x slower here)."""
    from tests.conftest import TINY
    from tests.launch import launch
    from tests.runs import assert_same_run, metrics

    opts = [*TINY, f"data.dir={tiny_betons}", "train.epochs=2", "optim.lookahead_every=3", "train.ema=true"]
    for name, extra in (("plain", []), ("warm", ["train.warmup_steps=3"])):
        codes = launch("dist_resnet.train", [*opts, f"run.dir={tmp_path / name}", *extra], tmp_path / f"{name}.log")
        assert codes == [0], (tmp_path / f"{name}.log").read_text()
    assert_same_run(tmp_path / "plain", tmp_path / "warm")
    plain, warm = metrics(tmp_path / "plain"), metrics(tmp_path / "warm")
    assert plain["warmup_s"] is None and warm["warmup_s"] > 0 and "warm-up: 3 steps" in (tmp_path / "warm.log").read_text()
    assert warm["time_to_result_s"] == pytest.approx(
        warm["train_time_s"] + warm["init_time_s"] + warm["history"][-1]["eval_time_s"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pins docs/DISTRIBUTED.md's 'no host sync in the "
                                                          "hot loop' on the device where it matters)")
def test_no_host_sync_in_the_training_step_on_a_gpu(betons, tmp_path):
    """20 training steps (loader, augmentation, forward, backward, SGD, schedule, EMA) under
    torch.cuda.set_sync_debug_mode("error"): any operation that waits for the GPU raises. bf16, the
    device-resident pipeline; the logging step, which syncs on purpose, is outside (train.log_every)."""
    import itertools

    from dist_resnet.config import load_config
    from dist_resnet.distributed import DistEnv
    from dist_resnet.train import Trainer
    from tests.conftest import ROOT

    cfg = load_config(ROOT / "configs" / "cpu.yaml", [
        f"data.dir={betons}", f"run.dir={tmp_path / 'run'}", "train.device=cuda", "train.precision=bf16",
        "data.pipeline=device", "train.batch_size=128", "train.ema=true", "run.progress=false"])
    trainer = Trainer(cfg, DistEnv(0, 1, 0, 1, torch.device("cuda", 0)))
    steps = trainer.batches()
    for micro_batches in itertools.islice(steps, 2):  # lazy CUDA and cuDNN initialisation, the epoch's order
        trainer.train_step(micro_batches)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        done = 0
        for micro_batches in itertools.islice(steps, 20):
            trainer.train_step(micro_batches)
            done += 1
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert done == 20


def test_a_fixed_fp16_loss_scale_trains_without_a_grad_scaler(tiny_betons, tmp_path):
    """train.loss_scale: fp16 with a fixed scale and no GradScaler (so no per-step host sync). One step on the
    same batch from the same weights: the update equals the dynamic GradScaler's, whatever the fixed scale (the
    gradients are unscaled exactly). Outside fp16 the key is refused."""
    from dist_resnet.config import ConfigError, load_config
    from dist_resnet.distributed import DistEnv
    from dist_resnet.engine.step import DynamicLossScale
    from dist_resnet.train import Trainer
    from tests.conftest import TINY

    def update(name: str, *overrides: str) -> torch.Tensor:
        # width 2: fp16's convolution backward has no fast kernel on a CPU (75x bf16's time here)
        t = Trainer(load_config(TINY[1], [*TINY[2:], f"data.dir={tiny_betons}", f"run.dir={tmp_path / name}",
                                          "train.epochs=1", "model.width=2", *overrides]),
                    DistEnv(0, 1, 0, 1, torch.device("cpu")))
        before = torch.cat([p.detach().flatten().clone() for p in t.model.parameters()])
        t.train_step(next(t.batches()))
        dynamic = isinstance(t.step.loss_scale, DynamicLossScale)  # GradScaler
        assert t.step.scheduler.last_epoch == 1 and dynamic == (name == "fp16")  # not skipped
        t.close()
        return torch.cat([p.detach().flatten() for p in t.model.parameters()]) - before

    dynamic = update("fp16", "train.precision=fp16")  # GradScaler's first step (scale 65536) does not overflow here
    for scale in (1024, 65536):
        fixed = update(f"fp16_{scale}", "train.precision=fp16", f"train.loss_scale={scale}")
        rel = ((fixed - dynamic).norm() / dynamic.norm()).item()
        print(f"fp16, fixed loss scale {scale}: update vs the dynamic scale's, relative L2 {rel:.1e}")
        assert rel < 1e-2  # an unscaling error would be a factor; fp16 vs fp32 itself differs by 12 % here
    with pytest.raises(ConfigError, match="train.loss_scale=8 is for train.precision=fp16"):
        Trainer(load_config(TINY[1], [*TINY[2:], f"data.dir={tiny_betons}", f"run.dir={tmp_path / 'x'}",
                                      "train.loss_scale=8"]), DistEnv(0, 1, 0, 1, torch.device("cpu")))
