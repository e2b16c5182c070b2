"""Sweeps on Optuna: the search-space syntax, trials that are normal runs (validation-selected, pruned,
failed), the results, a real PostgreSQL server shared by two workers, and the Slurm array script."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_resnet import sweep
from dist_resnet.config import load_config
from dist_resnet.sweep import SweepError, parse_param
from tests.conftest import ROOT, TINY

pytest.importorskip("optuna", reason="sweeps need optuna (pip install 'dist_resnet[sweep]'; make test does)")

# every trial: the tiny data with a 20 % validation split, 3 epochs of 10 steps
BASE = [*TINY[2:], "data.val_fraction=0.2", "train.epochs=3", "train.stop_check_every=2"]


def sweep_args(data: Path, out: Path, study: str, *extra: str) -> list[str]:
    return ["--config", TINY[1], "--study", study, "--out", str(out), *extra, f"data.dir={data}", *BASE]


def test_the_search_space_syntax():
    assert parse_param("optim.lr", "log(0.05, 2)").values == (0.05, 2)
    assert parse_param("train.epochs", "int(10,30)").kind == "int"
    assert parse_param("optim.weight_decay", "choice(5e-4,1e-3)").values == (5e-4, 1e-3)
    assert parse_param("data.flip", "[true, false]").values == (True, False)
    for bad, message in (("log(0,1)", "needs a > 0"), ("float(2,1)", "two numbers a < b"), ("normal(0,1)", "use log")):
        with pytest.raises(SweepError, match=message):
            parse_param("optim.lr", bad)
    with pytest.raises(SweepError, match="'optim.lrate' is not a config key"):
        sweep.parse_space(["optim.lrate=log(0.1,1)"], {"optim.lr"})


def test_a_sweep_refuses_to_select_on_test(tiny_betons, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        sweep.main(["--config", TINY[1], "--study", "s", "--out", str(tmp_path), "--space", "optim.lr=log(0.1,1)",
                    f"data.dir={tiny_betons}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "never on test" in err and "data.val_fraction=0.1" in err


@pytest.fixture(scope="module")
def local_sweep(tiny_betons, tmp_path_factory) -> tuple[Path, dict, dict, str]:
    """One study, three invocations (a study can be extended with new ranges of the same parameter):
    two good learning rates; then a useless one (pruned); then a diverging one (failed), with --final."""
    out = tmp_path_factory.mktemp("sweep") / "lr"
    common = ["--sampler", "random", "--seed", "0"]
    first = sweep.main(sweep_args(tiny_betons, out, "lr", *common, "--trials", "2", "--space", "optim.lr=log(0.3,0.4)"))
    pruned = sweep.main(sweep_args(tiny_betons, out, "lr", *common, "--trials", "3",
                                   "--space", "optim.lr=log(0.00001,0.00002)"))
    last = sweep.main(sweep_args(tiny_betons, out, "lr", *common, "--trials", "4",
                                 "--space", "optim.lr=log(100000,200000)", "--final"))
    return out, first, pruned, last


def test_trials_are_runs_and_the_results_name_the_best_by_validation(local_sweep):
    out, first, _, last = local_sweep
    table = {r["trial"]: r for r in last["table"]}
    assert [table[i]["state"] for i in range(4)] == ["complete", "complete", "pruned", "fail"], table
    best = max((0, 1), key=lambda i: table[i]["val_acc"])
    assert last["best"] == best and table[best]["best"] == "*"
    for i in range(4):
        run = out / f"trial-{i:04d}"
        assert (run / "config.yaml").is_file() and (run / "metrics.json").is_file()
        assert list(run.glob("events.out.tfevents.*")) and (run / "split.json").is_file()
    assert (out / "trial-0000" / "curves.png").is_file()
    assert table[2]["epochs"] < 3 and "pruned" == table[2]["state"]  # stopped early, with a checkpoint
    assert "diverged" in table[3]["note"]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["state"] for r in rows] == ["complete", "complete", "pruned", "fail"] and rows[best]["best"] == "*"
    assert "| trial | best | state | val_acc |" in (out / "results.md").read_text()
    cfg = load_config(out / "best.yaml")  # the winning config, a preset of its own
    assert cfg.optim.lr == table[best]["optim.lr"] and 0.3 <= cfg.optim.lr <= 0.4 and cfg.data.val_fraction == 0.2


def test_final_retrains_the_best_on_the_whole_train_split(local_sweep):
    out, _, _, last = local_sweep
    m = json.loads((out / "final" / "metrics.json").read_text())
    assert last["final"]["test_acc"] == m["test_acc"] and m["test_count"] == 200
    assert m["val_acc"] is None and not (out / "final" / "split.json").exists()  # no split: all 1,000 train images


def test_report_and_sweep_plot(local_sweep, capsys, tmp_path):
    from PIL import Image

    from dist_resnet import plot

    out, *_ = local_sweep
    sweep.main(["--report", str(out)])
    printed = capsys.readouterr().out
    assert "4 trials: 2 complete, 1 pruned, 1 failed" in printed and "| trial |" in printed
    png = plot.main(["--sweep", str(out), "--out", str(tmp_path / "sweep.png")])
    with Image.open(png) as im:
        assert im.size[0] > 800 and len(set(im.convert("L").getdata())) > 20  # drawn, not blank


def test_curves_png_of_runs(local_sweep, tmp_path):
    from PIL import Image

    from dist_resnet import plot

    out, *_ = local_sweep
    png = plot.main([str(out / "trial-0000"), str(out / "trial-0001"), "--out", str(tmp_path / "c.png")])
    with Image.open(png) as im:
        assert im.size[0] > 1000 and im.size[1] > 300
        pixels = list(im.convert("RGB").getdata())

    def near(color):  # matplotlib's C0 (blue) and C1 (orange): each run has its colour
        return sum(1 for p in pixels if sum(abs(a - b) for a, b in zip(p, color)) < 40)

    assert near((31, 119, 180)) > 200 and near((255, 127, 14)) > 200
    with Image.open(out / "trial-0000" / "curves.png") as im:  # what every run writes
        assert len(set(im.convert("L").getdata())) > 20


def test_two_workers_share_one_study_on_postgresql(tiny_betons, tmp_path):
    """The multi-node path against a real PostgreSQL server: two worker processes, one study, N trials,
    none run twice."""
    from tests.postgres import server

    with server() as url:
        cmd = [sys.executable, "-m", "dist_resnet.sweep", *sweep_args(tiny_betons, tmp_path / "sw", "shared",
                                                                      "--storage", url, "--trials", "4",
                                                                      "--sampler", "random", "--pruner", "none",
                                                                      "--space", "optim.lr=log(0.1,0.5)",
                                                                      "train.epochs=1")]  # sharing, not training
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        workers = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
                   for _ in range(2)]
        outs = [w.communicate(timeout=600)[0] for w in workers]
        assert [w.returncode for w in workers] == [0, 0], outs
        import optuna

        study = optuna.load_study(study_name="shared", storage=sweep.make_storage(url, tmp_path, 60))
        states = [t.state.name for t in study.trials]
        run_dirs = [t.user_attrs["run_dir"] for t in study.trials]
    print(f"PostgreSQL: {len(states)} trials by 2 workers: {states}")
    assert states.count("COMPLETE") >= 4 and len(run_dirs) == len(set(run_dirs))  # no trial run twice
    for d in run_dirs:  # each trial's folder holds exactly one run, started once, from scratch
        log = (tmp_path / "sw" / d / "train.log").read_text()
        assert log.count("holds no checkpoint yet: starting from scratch") == 1 and log.count("done: test acc") == 1


def test_slurm_sweep_array_task_stops_requeues_and_resumes_its_trial(tiny_betons, tmp_path):
    """slurm/sweep.sh with fake srun/scontrol: USR1 makes the running trial checkpoint and queues it to
    resume; the task is requeued; the requeued task resumes that trial from its checkpoint."""
    from tests.runs import finish, start
    from tests.test_distributed import fake_slurm

    log = tmp_path / "scontrol.log"
    fake_slurm(tmp_path / "bin", log)
    env = {"PATH": f"{tmp_path / 'bin'}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "SLURM_JOB_ID": "91", "SLURM_JOB_NAME": "sw", "CONFIG": TINY[1], "DATA_DIR": str(tiny_betons)}
    job = ["bash", str(ROOT / "slurm" / "sweep.sh"), "--trials", "1", "--sampler", "grid", "--space",
           "optim.lr=[0.4]", *BASE, "train.epochs=4"]
    trial = tmp_path / "sweeps" / "sw-91" / "trial-0000"
    p = start(job, env, cwd=tmp_path)
    deadline = time.time() + 300
    while not (trial / "ckpt-00000008.pt").exists() and time.time() < deadline:  # epoch 1 is checkpointed
        time.sleep(0.5)
    p.send_signal(signal.SIGUSR1)
    out = finish(p)
    assert p.returncode == 0 and "requeueing task 91" in out and "scontrol requeue 91" in log.read_text(), out
    stopped_at = json.loads((trial / "metrics.json").read_text())["epochs"]
    assert 1 <= stopped_at < 4
    p = start(job, {**env, "SLURM_RESTART_COUNT": "1"}, cwd=tmp_path)
    out = finish(p)
    assert p.returncode == 0, out
    train_log = (trial / "train.log").read_text()
    assert "resumed from" in train_log and json.loads((trial / "metrics.json").read_text())["completed"]
    assert "1 complete" in (tmp_path / "sweeps" / "sw-91" / "results.md").read_text()
    assert log.read_text().count("requeue") == 1
