"""Knowledge distillation (distill.*, dist_resnet/engine/distill.py): the loss against its formula, 2 ranks
against 1, a kill mid-epoch resumed bit-exactly, the teacher's identity in the checkpoint, metrics.json and the
card, and every bad input in one line (exit 2) before anything starts. The teacher is the suite's trained run
(the cpu preset, 4 epochs on the subset); the students train on the tiny betons (the same classes and size)."""
from __future__ import annotations

import math
import shutil

import pytest
import torch

from dist_resnet.fileio import sha256
from tests.conftest import TINY
from tests.launch import launch
from tests.runs import assert_same_run, metrics, relative_distance

TEACH = ["distill.alpha=0.7", "distill.temperature=3"]


def student(tiny_betons, run_dir, teacher, *overrides) -> list[str]:
    return [*TINY, f"data.dir={tiny_betons}", f"run.dir={run_dir}", f"distill.teacher={teacher}", *TEACH,
            *overrides]


def test_the_loss_is_t_squared_times_the_softened_kl_plus_the_rest(trained_run):
    from dist_resnet.engine.distill import Teacher
    from dist_resnet.models import files

    mf = files.read(trained_run / "last.pt")
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    teacher = Teacher(mf, lambda x: t, mf.mean, mf.std, alpha=0.7, temperature=3.0, device=torch.device("cpu"))
    loss = torch.tensor(1.25)
    pt, ps = (t / 3).softmax(1), (s / 3).softmax(1)
    kl = (pt * (pt.log() - ps.log())).sum(1).mean()
    expected = 0.7 * 9 * kl.item() + 0.3 * 1.25  # alpha T^2 KL + (1 - alpha) loss
    assert teacher(torch.zeros(8, 3, 32, 32), s, loss).item() == pytest.approx(expected, rel=1e-5)
    assert teacher.identity == {"file": "last.pt", "sha256": sha256(trained_run / "last.pt")}
    assert teacher.accuracy == metrics(trained_run)["test_acc"] and teacher.same  # the same data: no re-normalising


@pytest.fixture(scope="module")
def distilled(tiny_betons, trained_run, tmp_path_factory):
    """An uninterrupted 2-epoch distilled run; a second one killed at step 13 (mid-epoch, after its checkpoint at
    step 12) and resumed."""
    d = tmp_path_factory.mktemp("distill")
    teacher = trained_run / "last.pt"
    opts = ["train.epochs=2", "train.checkpoint_every=4"]
    assert launch("dist_resnet.train", student(tiny_betons, d / "ref", teacher, *opts), d / "ref.log") == [0]
    codes = launch("dist_resnet.train", student(tiny_betons, d / "cut", teacher, *opts), d / "cut.log",
                   env={"DIST_RESNET_FAULT": "step:13"})
    assert codes == [-9], (d / "cut.log").read_text()[-2000:]
    resumed = launch("dist_resnet.train", student(tiny_betons, d / "cut", teacher, *opts, "train.resume=true"),
                     d / "resume.log")
    assert resumed == [0], (d / "resume.log").read_text()[-2000:]
    return d


def test_a_distilled_run_killed_mid_epoch_resumes_bit_exactly(distilled):
    assert "resumed from" in (distilled / "resume.log").read_text()
    assert_same_run(distilled / "ref", distilled / "cut")


def test_the_teacher_is_named_in_metrics_and_the_card_and_another_one_is_refused(distilled, trained_run,
                                                                                tiny_betons, tmp_path, capsys):
    from dist_resnet import export, train

    m = metrics(distilled / "ref")
    sha = sha256(trained_run / "last.pt")
    assert m["teacher"] == {"file": "last.pt", "sha256": sha, "test_acc": metrics(trained_run)["test_acc"],
                            "alpha": 0.7, "temperature": 3.0}
    out = tmp_path / "student.safetensors"
    export.main([str(distilled / "ref" / "last.pt"), "--format", "safetensors", "--out", str(out)])
    card = (tmp_path / "student.safetensors.md").read_text()
    acc = m["teacher"]["test_acc"]
    assert f"Distilled from the teacher last.pt (sha256 {sha}; its test accuracy {acc:.4f})" in card
    run_dir = tmp_path / "run"
    shutil.copytree(distilled / "cut", run_dir)
    other = distilled / "ref" / "last.pt"  # a real teacher of these classes and size, another file
    with pytest.raises(SystemExit) as e:
        train.main(student(tiny_betons, run_dir, other, "train.epochs=2", "train.checkpoint_every=4",
                           "train.resume=true"))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert f"with last.pt (sha256 {sha[:12]})" in err and f"(sha256 {sha256(other)[:12]})" in err


def test_two_ranks_distil_as_one_rank_does(betons, trained_run, tmp_path):
    """4 steps of a global batch of 1024 with GroupNorm (batch-independent) and a small LR, as
    tests/test_distributed.py's equivalence runs (measured: 4.0e-6 distilled, 6.4e-6 without a teacher; on the
    tiny betons' 10 steps of 100 both are chaotic, 1e-5 to 6e-4); each rank's teacher scores its half."""
    opts = ["train.epochs=1", "model.norm=group", "optim.lr=0.02", "train.batch_size=1024"]
    for name, nproc in (("w1", 1), ("w2", 2)):
        argv = student(betons, tmp_path / name, trained_run / "last.pt", *opts)
        assert launch("dist_resnet.train", argv, tmp_path / f"{name}.log", nproc) == [0] * nproc
    rel = relative_distance(tmp_path / "w1", tmp_path / "w2")
    print(f"2 ranks against 1, distilled: relative L2 {rel:.1e}")
    assert rel < 5e-5 and math.isfinite(metrics(tmp_path / "w2")["history"][0]["train_loss"])


def teacher_variant(trained_run, tmp_path, **changes) -> str:
    """The trained run's checkpoint with some facts changed (classes, image size), saved as a new file."""
    from dist_resnet.checkpoint import load

    state = load(trained_run / "last.pt")
    state.update(changes)
    path = tmp_path / "teacher.pt"
    torch.save(state, path)
    return str(path)


class Pickled:
    def __reduce__(self):
        return (print, ("a pickle that runs code",))


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist: give one of our checkpoints"),
    ("unsafe", "Loading it fully could run code it carries, so it is not loaded"),
    ("classes", "a teacher must know the data's classes, in the same order"),
    ("size", "takes 64x64 images, but this run's are 32x32"),
    ("alpha", "bad value for 'distill.alpha': 1.5; it must be in [0, 1]"),
    ("temperature", "bad value for 'distill.temperature': 0; it must be > 0"),
    ("no teacher", "distill.alpha=0.7 applies only with distill.teacher=PATH"),
])
def test_bad_distillation_input_is_one_line_before_anything_starts(tiny_betons, trained_run, tmp_path, capsys, case,
                                                                   message):
    from dist_resnet import train

    teacher = trained_run / "last.pt"
    if case == "missing":
        teacher = tmp_path / "nowhere.pt"
    elif case == "unsafe":
        torch.save({"model": Pickled(), "config": {}}, tmp_path / "teacher.pt")
        teacher = tmp_path / "teacher.pt"
    elif case == "classes":
        teacher = teacher_variant(trained_run, tmp_path, classes=list(reversed(metrics_classes(trained_run))))
    elif case == "size":
        teacher = teacher_variant(trained_run, tmp_path, image_shape=[64, 64])
    argv = student(tiny_betons, tmp_path / "run", teacher, "--check")
    argv = {"alpha": argv + ["distill.alpha=1.5"], "temperature": argv + ["distill.temperature=0"],
            "no teacher": [a for a in argv if not a.startswith("distill.teacher=")]}.get(case, argv)
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "run").exists()


def metrics_classes(trained_run) -> list[str]:
    from dist_resnet.checkpoint import load

    return load(trained_run / "last.pt")["classes"]
