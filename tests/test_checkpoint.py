"""Checkpoint files: atomic and kept N deep; loaded weights-only, so a crafted file cannot run code;
and a clear error, naming the file, for anything that is not a checkpoint of ours."""
import os
import pickle
import subprocess
import sys

import pytest
import torch

from dist_resnet import checkpoint
from dist_resnet.checkpoint import FORMAT_VERSION, CheckpointError, load, load_latest, save, save_atomic
from dist_resnet.fileio import clean_stale_tmp, write_json


class Payload:
    """Unpickling this runs `touch MARKER`: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted_checkpoint(path, marker):
    """A file that looks like one of ours (a torch zip with model and config) but carries a payload."""
    torch.save({"format_version": 1, "model": {"w": torch.zeros(1)}, "config": {}, "evil": Payload(marker)}, path)
    return path


def state(step):
    return {"model": {"w": torch.full((2,), float(step))}, "config": {"x": 1}, "step": step, "epoch": step}


def test_save_keeps_the_newest_n_and_links_last_and_best(tmp_path):
    for step in (10, 20, 30, 40):
        save(state(step), tmp_path, keep_last=2, links=("best.pt",) if step == 20 else ())
    assert sorted(p.name for p in tmp_path.glob("ckpt-*.pt")) == ["ckpt-00000030.pt", "ckpt-00000040.pt"]
    assert load(tmp_path / "last.pt")["step"] == 40
    assert load(tmp_path / "best.pt")["step"] == 20  # best.pt survives the pruning of its ckpt file
    assert os.path.samefile(tmp_path / "last.pt", tmp_path / "ckpt-00000040.pt")  # a link: no extra disk
    assert load(tmp_path / "last.pt")["format_version"] == FORMAT_VERSION
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_a_crafted_pickle_never_runs_and_is_named(tmp_path):
    marker = tmp_path / "PWNED"
    path = crafted_checkpoint(tmp_path / "evil.pt", marker)
    with pytest.raises(CheckpointError, match=rf"{path} is not a dist_resnet checkpoint.*weights-only.*could run code"):
        load(path)
    assert not marker.exists()
    plain = tmp_path / "evil.pkl"  # a bare pickle, not even a torch file
    plain.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointError, match="not a checkpoint: torch.save writes a zip archive"):
        load(plain)
    assert not marker.exists()


@pytest.mark.parametrize("damage, message", [
    ("random", "not a checkpoint: torch.save writes a zip archive"),
    ("truncated", "is truncated or not a checkpoint"),
    ("empty", "not a checkpoint"),
    ("newer", "checkpoint format 99, newer than the 1 this dist_resnet reads; upgrade"),
    ("not_ours", "not a dist_resnet checkpoint: it has no config"),
    ("not_a_dict", "it holds a Tensor, not a dict"),
    ("missing", "does not exist"),
])
def test_files_that_are_not_checkpoints_of_ours_get_a_clear_error(tmp_path, damage, message):
    path = tmp_path / "x.pt"
    good = save(state(5), tmp_path, keep_last=1)
    if damage == "random":
        path.write_bytes(os.urandom(4096))
    elif damage == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "newer":
        torch.save({**state(5), "format_version": 99}, path)
    elif damage == "not_ours":
        torch.save({"model": {}}, path)
    elif damage == "not_a_dict":
        torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match=message) as e:
        load(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_resume_falls_back_to_the_newest_checkpoint_that_loads(tmp_path):
    save(state(10), tmp_path, keep_last=2)
    save(state(20), tmp_path, keep_last=2)
    newest = tmp_path / "ckpt-00000020.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # damaged in place: last.pt is the same file
    path, st, notes = load_latest(tmp_path)
    assert path.name == "ckpt-00000010.pt" and st["step"] == 10
    assert len(notes) == 1 and "ckpt-00000020.pt is truncated" in notes[0]
    (tmp_path / "ckpt-00000010.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="no checkpoint in .* loads"):
        load_latest(tmp_path)
    assert load_latest(tmp_path / "empty") is None


def test_resume_prefers_a_newer_checkpoint_to_last_pt(tmp_path):
    """A kill between writing ckpt-<step>.pt and linking last.pt to it leaves last.pt one save behind:
    resume takes the newest step, not the link."""
    save(state(10), tmp_path, keep_last=3)
    save_atomic({"format_version": FORMAT_VERSION, **state(20)}, tmp_path / "ckpt-00000020.pt")  # written, never linked
    path, st, notes = load_latest(tmp_path)
    assert path.name == "ckpt-00000020.pt" and st["step"] == 20 and not notes
    assert os.path.samefile(tmp_path / "last.pt", tmp_path / "ckpt-00000010.pt")  # loading changes nothing
    checkpoint.adopt(path, tmp_path)  # what the resuming run's rank 0 does
    assert os.path.samefile(tmp_path / "last.pt", tmp_path / "ckpt-00000020.pt")


def test_a_kill_leaves_no_torn_file_and_stale_temp_files_are_cleaned(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"v": 1})
    code = ("import os, signal; from dist_resnet.fileio import write_json\n"
            "os.environ['DIST_RESNET_FAULT'] = 'write:1'\n"
            f"write_json({str(target)!r}, {{'v': 2}})")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert p.returncode == -9  # killed between writing the temp file and replacing the target
    assert target.read_text() == '{\n  "v": 1\n}\n'  # the old file, whole
    stale = [f for f in tmp_path.iterdir() if f.name.startswith(".metrics.json.tmp-")]
    assert len(stale) == 1
    live = tmp_path / f".other.tmp-{os.getpid()}"  # a live writer's temp file is left alone
    live.write_text("")
    assert clean_stale_tmp(tmp_path) == stale and live.exists() and not stale[0].exists()


def test_checkpoints_hold_only_weights_only_types(tmp_path):
    """What the trainer saves loads under weights_only=True (proved on a real run in test_train.py);
    here: the optimizer, scheduler and scaler states that it is made of."""
    from dist_resnet.config import OptimConfig
    from dist_resnet.models import build_model
    from dist_resnet.optim import build_optimizer, build_scheduler

    model = build_model("resnet9", width=8)
    opt = build_optimizer(model, OptimConfig())
    sched = build_scheduler(opt, OptimConfig(), 10, 2)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    sched.step()
    st = {**state(1), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
          "scaler": torch.amp.GradScaler("cpu", enabled=True).state_dict()}
    save(st, tmp_path, keep_last=1)
    back = checkpoint.load(tmp_path / "last.pt")
    assert back["scheduler"]["last_epoch"] == 1 and back["optimizer"]["state"]
