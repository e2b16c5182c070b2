"""Sweeps on Optuna: the search-space syntax, trials that are normal runs (validation-selected, pruned,
failed), what a study counts, the results and pictures, and a real PostgreSQL server shared by two workers
(slurm/sweep.sh on a real Slurm: tests/test_slurm.py)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dist_resnet import sweep
from dist_resnet.config import load_config
from dist_resnet.sweep import SweepError, parse_param
from tests.conftest import ROOT, TINY

pytest.importorskip("optuna", reason="sweeps need optuna (pip install 'dist_resnet[sweep]'; make test does)")

# every trial: the tiny data with a 20 % validation split, 3 epochs of 10 steps, and its curves.png (checked below)
BASE = [*TINY[2:], "data.val_fraction=0.2", "train.epochs=3", "train.stop_check_every=2", "run.pictures=true"]


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
        assert im.size[0] > 800 and len(np.unique(np.asarray(im.convert("L")))) > 20  # drawn, not blank


def test_plot_of_what_is_not_a_readable_sweep_says_so_in_one_line(local_sweep, tmp_path, capsys):
    from dist_resnet import plot

    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "sweep.json").write_text(json.dumps({"study": "s", "storage": "postgresql://bob:***@db/sweeps",
                                                   "params": ["optim.lr"]}))
    for folder, message in ((tmp_path, "holds no sweep"), (locked, "pass --storage URL with its password")):
        with pytest.raises(SystemExit) as e:
            plot.main(["--sweep", str(folder), "--out", str(tmp_path / "s.png")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    png = plot.main([str(local_sweep[0] / "trial-0000"), "--out", str(tmp_path / "new" / "folder" / "c.png")])
    assert png.read_bytes()[:4] == b"\x89PNG"  # --out into a folder that does not exist yet


def shown_tick_labels(ax) -> list:
    lo, hi = sorted(ax.get_xlim())
    ticks = [*ax.xaxis.get_major_ticks(), *ax.xaxis.get_minor_ticks()]
    return [t.label1 for t in ticks if t.label1.get_visible() and t.label1.get_text() and lo <= t.get_loc() <= hi]


def test_the_sweep_picture_names_choices_steps_the_best_and_keeps_labels_apart(local_sweep, grid_sweep):
    """Choices are drawn at their own labelled places, the best so far is a step, trials are whole
    numbers, and no two tick labels run into each other, on a log axis either."""
    from dist_resnet import plot
    from dist_resnet.sweep.storage import load_study

    fig = plot.sweep_figure(*load_study(grid_sweep[0]))  # optim.lr=[0.3,0.4]
    fig.canvas.draw()
    history, lr = fig.axes[:2]
    assert [t.get_text() for t in shown_tick_labels(lr)] == ["0.3", "0.4"]
    assert [line.get_drawstyle() for line in history.get_lines() if line.get_label() == "best so far"] == ["steps-post"]
    assert all(float(t.get_text().replace("\u2212", "-")).is_integer() for t in shown_tick_labels(history))
    for lo, hi in ((1e-5, 2e5), (0.3, 0.4)):  # a log axis over ten decades, and within one
        fig = plot.sweep_figure(*study_of({"optim.lr": ("log", (lo, hi))}, [{"optim.lr": min(hi, lo * (hi / lo) ** (i / 5))}
                                                                          for i in range(6)]))
        fig.canvas.draw()
        ax = fig.axes[1]
        boxes = sorted((t.get_window_extent() for t in shown_tick_labels(ax)), key=lambda b: b.x0)
        assert ax.get_xscale() == "log" and len(boxes) >= 2
        assert all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:])), [t.get_text() for t in shown_tick_labels(ax)]
    fig = plot.sweep_figure(*study_of({"model.name": ("choice", ("resnet9", "resnet18"))},
                                      [{"model.name": n} for n in ("resnet18", "resnet9", "resnet18")]))
    fig.canvas.draw()
    assert [t.get_text() for t in shown_tick_labels(fig.axes[1])] == ["resnet9", "resnet18"]
    assert sorted(fig.axes[1].collections[0].get_offsets()[:, 0].tolist()) == [0, 1, 1]


def study_of(space: dict, points: list[dict]):
    """An in-memory study of completed trials at `points`, with the sweep.json a sweep would write."""
    import optuna

    dists = {k: optuna.distributions.CategoricalDistribution(v) if kind == "choice"
             else optuna.distributions.FloatDistribution(*v, log=kind == "log") for k, (kind, v) in space.items()}
    study = optuna.create_study(direction="maximize")
    for i, point in enumerate(points):
        study.add_trial(optuna.trial.create_trial(params=point, distributions=dists, value=0.5 + 0.1 * (i % 3)))
    return study, {"params": list(space), "space": {k: [kind, list(v)] for k, (kind, v) in space.items()}}


def test_curves_png_of_runs(local_sweep, tmp_path):
    from PIL import Image

    from dist_resnet import plot

    out, *_ = local_sweep
    png = plot.main([str(out / "trial-0000"), str(out / "trial-0001"), "--out", str(tmp_path / "c.png")])
    with Image.open(png) as im:
        assert im.size[0] > 1000 and im.size[1] > 300
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3).astype(int).tolist()

    def near(color):  # matplotlib's C0 (blue) and C1 (orange): each run has its colour
        return sum(1 for p in pixels if sum(abs(a - b) for a, b in zip(p, color)) < 40)

    assert near((31, 119, 180)) > 200 and near((255, 127, 14)) > 200
    with Image.open(out / "trial-0000" / "curves.png") as im:  # what every run writes
        assert len(np.unique(np.asarray(im.convert("L")))) > 20


def test_curves_draw_every_logged_step_whole_epoch_ticks_and_name_each_run_once(local_sweep):
    from dist_resnet import plot, rundir

    out, *_ = local_sweep
    trials = [out / "trial-0000", out / "trial-0001"]
    fig = plot.curves_figure(trials)
    loss, acc, lr = fig.axes[:3]
    m = rundir.read_metrics(trials[0])
    steps = [p[0] for r in m["history"] for p in r["steps"]]  # every train.log_every-th step, the first, epoch ends
    spe, total = m["steps_per_epoch"], m["epochs"] * m["steps_per_epoch"]
    assert steps == sorted({1, *range(5, total + 1, 5), *range(spe, total + 1, spe)}) and len(steps) > m["epochs"]
    assert list(loss.lines[0].get_xdata()) == [s / m["steps_per_epoch"] for s in steps]
    assert list(lr.lines[0].get_ydata()) == [p[2] for r in m["history"] for p in r["steps"]]
    assert [t.get_text() for t in loss.get_legend().get_texts()] == ["trial-0000", "trial-0001"]  # once each
    assert [t.get_text() for t in acc.get_legend().get_texts()] == ["train", "val", "test"]
    for ax in (loss, acc, lr):
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    val = [line for line in acc.lines if line.get_linestyle() == "--"][0]
    assert list(val.get_xdata()) == [r["epoch"] for r in m["history"] if "val_acc" in r] and val.get_marker() == "s"


def test_each_split_tells_itself_apart_in_the_panels_and_legends_alike(local_sweep, grid_sweep):
    """One run: each split has its own colour, line style and marker, and its legend handle is drawn as its
    lines are, long enough to show the dash (the legend used to give train no marker and val a circle, while
    train accuracy was drawn with circles: one took the train line for val). A 1-epoch run's curves start at
    its first step and end at its last, however train.log_every falls."""
    from matplotlib.colors import to_hex

    from dist_resnet import plot, rundir

    out, *_ = local_sweep
    fig = plot.curves_figure([out / "trial-0000"])
    for ax in fig.axes[:2]:
        legend = ax.get_legend()
        assert legend.handlelength >= 4
        shown = {h.get_label().split(" ")[0]: (h.get_linestyle(), h.get_marker(), to_hex(h.get_color()))
                 for h in legend.legend_handles}
        lines = [ln for ln in ax.lines if ln.get_label().startswith("_") and ln.get_label()[1:] in shown]
        assert len(set(shown.values())) == len(shown) >= 2 and len({v[2] for v in shown.values()}) == len(shown)
        for ln in lines:
            assert (ln.get_linestyle(), ln.get_marker(), to_hex(ln.get_color())) == shown[ln.get_label()[1:]]
    assert set(shown) == {"train", "val", "test"}
    grid, *_ = grid_sweep
    m = rundir.read_metrics(grid / "trial-0000")  # 1 epoch of 8 steps, logged every 5
    loss_line = plot.curves_figure([grid / "trial-0000"]).axes[0].lines[0]
    assert list(loss_line.get_xdata()) == [s / 8 for s in (1, 5, 8)] == [p[0] / 8 for p in m["history"][0]["steps"]]


# ---------------------------------------------------------------- what a study counts, and where it lives
@pytest.fixture(scope="module")
def grid_sweep(tiny_betons, tmp_path_factory) -> tuple[Path, dict, dict]:
    """A 2-point grid with --trials 10, run twice with the same command (a requeued task, a second array
    worker, a rerun), its --config given relative to the folder it ran from."""
    out = tmp_path_factory.mktemp("grid") / "g"
    args = ["--config", os.path.relpath(TINY[1]), "--study", "g", "--out", str(out), "--sampler", "grid",
            "--trials", "10", "--pruner", "none", "--space", "optim.lr=[0.3,0.4]", f"data.dir={tiny_betons}", *BASE,
            "train.epochs=1"]
    return out, sweep.main(args), sweep.main(args)


def test_a_grid_trains_each_point_once_however_often_it_runs(grid_sweep):
    out, first, second = grid_sweep
    assert [r["state"] for r in first["table"]] == ["complete", "complete"]
    assert [r["state"] for r in second["table"]] == ["complete", "complete"], second["table"]  # no new trial
    assert sorted(r["optim.lr"] for r in second["table"]) == [0.3, 0.4]
    assert sorted(p.name for p in out.glob("trial-*")) == ["trial-0000", "trial-0001"]


def test_the_report_needs_nothing_outside_the_sweep_folder(grid_sweep, tmp_path, monkeypatch, capsys):
    out, _, second = grid_sweep
    (out / "best.yaml").unlink()
    monkeypatch.chdir(tmp_path)  # where the relative --config does not exist
    sweep.main(["--report", str(out)])
    assert "2 trials: 2 complete" in capsys.readouterr().out
    cfg = load_config(out / "best.yaml")
    assert cfg.optim.lr == second["best_params"]["optim.lr"] and cfg.model.width == 8 and cfg.train.epochs == 1


def test_a_second_study_in_the_same_folder_is_refused(grid_sweep, tiny_betons, capsys):
    out, *_ = grid_sweep
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(SystemExit) as e:
        sweep.main(["--config", TINY[1], "--study", "other", "--out", str(out), "--space", "optim.lr=[0.1]",
                    f"data.dir={tiny_betons}", *BASE])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{out} holds the sweep of study 'g': give this study its own --out folder" in err
    assert sorted(p.name for p in out.iterdir()) == before  # nothing written, no trial folder reused


def test_trials_begun_after_the_study_is_full_or_the_stop_never_train_nor_count(tmp_path):
    """Two slots (or workers) that read the count at once each begin a trial: the later one is surplus.
    A trial begun as the sweep stops is not a failure either. Neither trains, counts or shows."""
    import optuna
    from types import SimpleNamespace

    from dist_resnet.sweep.orchestrate import Sweep
    from dist_resnet.sweep.results import rows
    from dist_resnet.sweep.trials import TrialInterrupted

    params = sweep.parse_space(["optim.lr=log(0.1,1)"], {"optim.lr"})
    storage = sweep.make_storage(None, tmp_path, 60)
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    for value in (0.3, 0.4):
        t = study.ask()
        params[0].suggest(t)
        study.tell(t, value)
    args = SimpleNamespace(out=str(tmp_path), trials=2, gpus_per_trial=1, heartbeat=60, overrides=[], config=None)
    s = Sweep(args, params, storage)
    study.optimize(s.objective, n_trials=1, catch=(TrialInterrupted,))  # a slot that saw 1 to go
    s.stop.set()
    study.optimize(s.objective, n_trials=1, catch=(TrialInterrupted,))
    notes = [t.user_attrs.get("error", "") for t in study.trials[2:]]
    assert notes[0].startswith("surplus: the study already holds --trials 2") and notes[1].startswith("unstarted")
    assert s.remaining(study) == 0 and not list(tmp_path.glob("trial-*"))
    assert [r["state"] for r in rows(study, ["optim.lr"])[0]] == ["complete", "complete"]


@pytest.mark.parametrize("url, secret", [
    ("postgresql://bob:hunter2@db/sweeps", "hunter2"),
    ("postgresql://bob@db/sweeps?password=hunter2", "hunter2"),
    ("postgresql://bob:p%40ss%3Aword@db/sweeps", "40ss"),
    ("mysql+pymysql://bob@db/sweeps?passwd=hunter2&charset=utf8mb4", "hunter2"),
    ("postgresql://db/sweeps?user=bob&password=hunter2&sslmode=require", "hunter2"),
])
def test_the_storage_password_is_masked_in_every_form(url, secret):
    from dist_resnet.sweep.storage import masked, safe_url

    shown = safe_url(url)
    assert secret not in shown and "***" in shown and masked(shown), shown
    assert "db/sweeps" in shown and ("bob" in shown)


def test_the_optuna_floor_is_the_version_the_code_needs(tmp_path):
    """pyproject's `optuna>=X`: the sweep works on X itself, and not on the release before it."""
    import re
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["sweep"]
    floor = next(re.match(r"optuna>=([\d.]+)", d).group(1) for d in deps if d.startswith("optuna"))
    major, minor = (int(x) for x in floor.split(".")[:2])
    before = f"{major}.{minor - 1}.0"
    for version in (floor, before):
        p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                            str(tmp_path / version), f"optuna=={version}"], capture_output=True, text=True)
        if p.returncode:
            pytest.skip(f"cannot download optuna {version} from the package index: {p.stderr.strip()[-200:]}")
    probe = [sys.executable, str(ROOT / "tests" / "optuna_probe.py")]
    ok = subprocess.run(probe, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(tmp_path / floor)})
    assert ok.returncode == 0 and ok.stdout.startswith(f"optuna {floor}") and "ok" in ok.stdout, ok.stderr[-2000:]
    old = subprocess.run(probe, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(tmp_path / before)})
    assert old.returncode != 0, f"optuna {before} works too: lower the floor in pyproject.toml"
    print(f"optuna {floor}: ok; {before}: {old.stderr.strip().splitlines()[-1]}")


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
