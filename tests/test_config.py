import sys
from pathlib import Path

import pytest

from dist_resnet.config import ConfigError, Precision, Schedule, load_config, to_yaml
from tests.conftest import ROOT, python_module

PRESETS = sorted((ROOT / "configs").glob("*.yaml"))
REQUIRED = ["data.dir=/d", "run.dir=/r"]


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_loads(preset):
    cfg = load_config(preset, REQUIRED)
    assert cfg.train.epochs > 0 and cfg.train.batch_size > 0


def test_required_keys_are_named_when_missing():
    with pytest.raises(ConfigError, match="data.dir.*run.dir"):
        load_config(ROOT / "configs" / "cpu.yaml")


def test_overrides_apply_with_types():
    cfg = load_config(ROOT / "configs" / "resnet18.yaml",
                      REQUIRED + ["train.epochs=3", "optim.lr=0.05", "model.compile=false", "optim.schedule=cosine",
                                  "train.precision=fp16"])
    assert cfg.train.epochs == 3 and cfg.optim.lr == 0.05 and cfg.model.compile is False
    assert cfg.optim.schedule == Schedule.cosine and cfg.train.precision == Precision.fp16
    assert cfg.model.name == "resnet18" and cfg.data.dir == "/d"


def test_unknown_key_names_the_key_and_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        load_config(None, REQUIRED + ["train.epoch=3"])
    msg = str(e.value)
    assert "train.epoch" in msg and "epochs" in msg and "batch_size" in msg


def test_unknown_section_is_rejected():
    with pytest.raises(ConfigError, match="unknown config key 'trian.*Valid keys.*train"):
        load_config(None, REQUIRED + ["trian.epochs=3"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(None, REQUIRED + ["train.epochs=ten"])


def test_bad_choice_lists_the_valid_choices():
    with pytest.raises(ConfigError, match="bf16.*fp16.*fp32"):
        load_config(None, REQUIRED + ["train.precision=fp8"])
    with pytest.raises(ConfigError, match="resnet9.*resnet18"):
        load_config(None, REQUIRED + ["model.name=vgg"])


def test_out_of_range_values_are_rejected():
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(None, REQUIRED + ["train.batch_size=0"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(None, REQUIRED + ["train.epochs"])


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(ROOT / "configs" / "cpu.yaml", REQUIRED + ["train.seed=7"])
    (tmp_path / "c.yaml").write_text(to_yaml(cfg))
    assert load_config(tmp_path / "c.yaml") == cfg


def test_cli_exits_2_with_a_clear_message_before_anything_starts(tmp_path):
    p = python_module("dist_resnet.train", "--config", "configs/cpu.yaml", "data.dir=/nowhere",
                      f"run.dir={tmp_path / 'run'}", "train.bogus=1", check=False, timeout=120)
    assert p.returncode == 2
    assert "unknown config key 'train.bogus'" in p.stderr
    assert not (tmp_path / "run").exists()


def test_overrides_may_come_before_and_after_the_preset():
    from dist_resnet.config import parse_args

    cfg = parse_args(["data.dir=/d", "--config", str(ROOT / "configs" / "cpu.yaml"), "run.dir=/r", "train.seed=3"])
    assert cfg.train.seed == 3 and cfg.model.width == 16 and cfg.data.dir == "/d"


def test_the_fast_preset_keys_are_checked():
    for bad, message in [
        ("optim.lr_end=1.5", "optim.lr_end"),
        ("optim.lookahead_decay=1", "lookahead_decay"),
        ("train.tta=all", "flip.*flip_translate"),
        ("model.compile_mode=fast", "max_autotune"),
        ("data.translate_pad=wrap", "reflect"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(ROOT / "configs" / "fast.yaml", REQUIRED + [bad])
    with pytest.raises(ConfigError, match="needs data.flip=true"):
        load_config(ROOT / "configs" / "fast.yaml", REQUIRED + ["data.flip=false"])
    with pytest.raises(ConfigError, match="model.norm=batch"):
        load_config(ROOT / "configs" / "fast.yaml", REQUIRED + ["model.norm=group"])


@pytest.mark.parametrize("bad, message", [
    ("train.seed=-1", "'train.seed': -1; it must be >= 0"),
    ("optim.momentum=0", "optim.nesterov=true needs optim.momentum > 0"),
    ("train.keep_last=0", "'train.keep_last'"),
    ("train.timeout_s=0", "'train.timeout_s': 0; it must be > 0"),
    ("train.nonfinite=ignore", "stop.*rollback"),
])
def test_reliability_keys_are_checked(bad, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs" / "cpu.yaml", REQUIRED + [bad])
    assert load_config(ROOT / "configs" / "cpu.yaml", REQUIRED + ["optim.momentum=0", "optim.nesterov=false"])


@pytest.mark.parametrize("bad, message", [
    ("adv.eps=0", r"'adv.eps': 0; it must be in \(0, 255\] pixel levels"),
    ("adv.eps=300", "'adv.eps': 300; it must be in"),
    ("adv.eval_steps=0", "'adv.eval_steps': 0; it must be >= 1"),
    ("adv.eval_restarts=0", "'adv.eval_restarts'"),
    ("train.adversarial=trades", "none.*fgsm.*pgd"),
    ("adv.init=gaussian", "random.*zero"),
])
def test_adversarial_keys_are_checked(bad, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs" / "adversarial.yaml", REQUIRED + [bad])


@pytest.mark.parametrize("bad, message", [
    ("train.max_steps=-1", r"'train.max_steps': -1; it must be >= 0 \(0 = off\)"),
    ("train.warmup_steps=-1", "'train.warmup_steps': -1; it must be >= 0"),
    ("model.whiten_bias_epochs=3", "apply to model.name=fastnet, not resnet9"),
    ("model.residual=true", "apply to model.name=fastnet, not resnet9"),
])
def test_speed_keys_are_checked(bad, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs" / "cpu.yaml", REQUIRED + [bad])


@pytest.mark.parametrize("bad, message", [
    ("data.mixup_alpha=inf", "'data.mixup_alpha': inf; it must be a finite number"),
    ("optim.lr=nan", "'optim.lr': nan; it must be a finite number"),
    ("train.timeout_s=inf", "'train.timeout_s': inf; it must be a finite number"),
    ("train.comm_hook=powersgd", r"train.comm_hook=powersgd needs train.warmup_steps >= 2 \(it is 0\)"),
    ("train.early_stop_monitor=foo", r"^bad value for 'train.early_stop_monitor': Invalid value 'foo', expected one "
                                     r"of \[val_acc, val_loss\]$"),
])
def test_non_finite_floats_and_bad_choices_are_one_line_errors(bad, message):
    """An infinite float passed every range check (data.mixup_alpha=inf drew a NaN lambda and the run died
    blaming optim.lr); a bad choice printed OmegaConf's 4-line block. Each is one line now."""
    with pytest.raises(ConfigError, match=message) as e:
        load_config(ROOT / "configs" / "cpu.yaml", REQUIRED + [bad])
    assert "\n" not in str(e.value)


def test_max_steps_must_fall_in_the_last_epoch(tiny_betons, tmp_path):
    import torch

    from dist_resnet.distributed import DistEnv
    from dist_resnet.train import Trainer
    from tests.conftest import TINY

    cfg = load_config(TINY[1], [*TINY[2:], f"data.dir={tiny_betons}", f"run.dir={tmp_path}", "train.epochs=3",
                                "train.max_steps=15"])  # 10 steps per epoch: 15 ends inside epoch 2, not 3
    with pytest.raises(ConfigError, match="train.max_steps=15 must fall in the last of train.epochs=3 epochs of 10 "
                                          "steps: set train.epochs=2"):
        Trainer(cfg, DistEnv(0, 1, 0, 1, torch.device("cpu")))


def test_resume_may_add_a_robust_evaluation_but_not_change_the_attack():
    from dist_resnet.config import resume_changes

    old = load_config(ROOT / "configs" / "adversarial.yaml", REQUIRED)
    new = load_config(ROOT / "configs" / "adversarial.yaml", REQUIRED + [
        "train.eval_attack=none", "adv.eval_steps=50", "adv.eval_restarts=10", "adv.eps=4", "adv.init=zero"])
    refused, _ = resume_changes(old, new)
    assert refused == {"adv.eps": (8.0, 4.0), "adv.init": ("random", "zero")}


def test_a_yaml_file_cannot_run_code(tmp_path):
    """Presets are read with a safe YAML loader: a python tag is an error, never a call."""
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"train:\n  epochs: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError):
        load_config(evil, REQUIRED)
    assert not marker.exists()


def test_resume_changes_sort_keys_into_refused_and_harmless():
    from dist_resnet.config import resume_changes

    old = load_config(ROOT / "configs" / "cpu.yaml", REQUIRED)
    new = load_config(ROOT / "configs" / "cpu.yaml", ["data.dir=/moved", "run.dir=/r2", "train.log_every=7",
                                                      "data.num_workers=1", "train.ema=true", "model.compile=true",
                                                      "optim.lr=0.1", "data.cutout=4", "train.epochs=9"])
    refused, numerics = resume_changes(old, new)
    assert refused == {"data.cutout": (0, 4), "optim.lr": (0.4, 0.1), "train.epochs": (6, 9)}
    assert numerics == {"model.compile": (False, True)}


def test_help_lists_every_key_with_its_type_default_and_comment(capsys):
    import dataclasses

    from dist_resnet.config import SECTIONS, parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f"  {section}.{f.name} (" in out, f"{section}.{f.name}"
    assert "  train.precision (auto|bf16|fp16|fp32, 'auto')" in out and "  data.dir (str, required)" in out
    assert "hold out this class-stratified fraction of the train split" in out  # the schema's own comment
    # a list's default comes from its factory (it printed `<dataclasses._MISSING_TYPE object at 0x...>`)
    assert "  data.rrc_scale (list, [0.08, 1.0])" in out and "  data.res_ramp (list, [0, 0])" in out
    assert "MISSING" not in out


def test_print_config_shows_the_resolved_config(capsys):
    from dist_resnet.config import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["--config", str(ROOT / "configs" / "cpu.yaml"), "--print-config", "train.epochs=3"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "epochs: 3" in out and "name: resnet9" in out and "dir: ???" in out
    with pytest.raises(SystemExit) as e:  # checked like a run
        parse_args(["--config", str(ROOT / "configs" / "cpu.yaml"), "--print-config", "data.dir=/d", "run.dir=/r",
                    "train.seed=-1"])
    assert e.value.code == 2 and "train.seed" in capsys.readouterr().err


def test_every_range_rule_names_a_config_key_once():
    import dataclasses

    from dist_resnet.config import SECTIONS
    from dist_resnet.config.checks import RULES

    keys = {f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    named = [k for _, _, ks in RULES for k in ks]
    assert set(named) <= keys and len(named) == len(set(named)), set(named) - keys
    for key in named:  # each is checked: its section's check refuses a value far out of range
        with pytest.raises(ConfigError, match=f"bad value for '{key}'"):
            load_config(ROOT / "configs" / "cpu.yaml", REQUIRED + [f"{key}=-1000"])


def test_the_launch_scripts_check_the_config_before_torchrun(tiny_betons, tmp_path):
    """A bad key or a missing data folder under torchrun printed the one line, then torchrun's 25-line
    ChildFailedError report, and exited 1: the scripts now check first (train --check): one line, exit 2."""
    import os
    import subprocess

    env = {**os.environ, "RUN_DIR": str(tmp_path / "run"), "MASTER_ADDR": "127.0.0.1", "NPROC": "1",
           "CONFIG": str(ROOT / "configs" / "cpu.yaml"), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for script, data, bad, message in (
            ("launch/single_node.sh", tiny_betons, "train.epochs=0", "'train.epochs': 0; it must be >= 1"),
            ("launch/multi_node.sh", tmp_path / "nowhere", "train.epochs=1",  # the hint names both sources: it
             "has no manifest.json; create it with: python -m dist_resnet.data.prepare --source SRC --out DIR (SRC: "
             "torchvision (CIFAR-10), or your ImageFolder directory or tarball")):  # named only CIFAR's download
        p = subprocess.run(["bash", str(ROOT / script), bad], capture_output=True, text=True, cwd=tmp_path,
                           env={**env, "DATA_DIR": str(data)}, timeout=120)
        assert p.returncode == 2 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert "torchrun" not in p.stdout + p.stderr and not (tmp_path / "run").exists()


def test_check_makes_every_check_the_run_makes(betons, trained_run, tmp_path, capsys):
    """`train --check` runs the very function that a run's build starts with (dist_resnet.engine.plan), so each
    refusal below is the same one line and exit 2 from both, and nothing is written. Before, `--check` only
    opened the betons and passed all of these. Where a run needs several ranks, `--world-size` says how many."""
    from dist_resnet import rundir, train

    base = ["--config", str(ROOT / "configs" / "cpu.yaml"), f"data.dir={betons}", "train.precision=fp32"]
    held = tmp_path / "held"
    held.mkdir()
    cases = [  # (arguments, the refusal's words, whether to compare with the run itself)
        ([f"run.dir={trained_run}", "train.resume=true", "train.seed=7"], "these settings differ from the checkpoint's",
         True),
        ([f"run.dir={tmp_path / 'r'}", "model.name=resnet18", f"model.pretrained={trained_run / 'last.pt'}"],
         "is it the weights of another model?", True),
        ([f"run.dir={held}"], "is in use by pid", True),
        ([f"run.dir={tmp_path / 'r'}", "train.batch_size=100", "--world-size", "1", "3"],
         "does not divide by the world size 3", False),
        ([f"run.dir={tmp_path / 'r'}", "train.batch_size=6000"], "larger than the 5000 train images", True),
    ]
    lock = rundir.lock(held)
    try:
        for args, message, compare in cases:
            said = []
            for check in (["--check"], []) if compare else (["--check"],):
                with pytest.raises(SystemExit) as e:
                    train.main([*check, *base, *args])
                said.append(capsys.readouterr().err)
                assert e.value.code == 2 and message in said[-1] and len(said[-1].strip().splitlines()) == 1, said
            assert len(set(said)) == 1, said
    finally:
        lock.close()
    assert not (tmp_path / "r").exists() and sorted(p.name for p in held.iterdir()) == [".lock"]
