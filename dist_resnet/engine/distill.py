"""Knowledge distillation (Hinton, Vinyals and Dean, 2015): `distill.teacher=PATH`, one of our checkpoints
or exported .safetensors, teaches the model being trained.

The step's loss becomes alpha x T^2 x KL(teacher || student, both softened by T) + (1 - alpha) x the usual loss
(label smoothing, Mixup/CutMix targets included). The teacher runs in eval mode without gradients on the very
batch the student sees (augmented, mixed, attacked), under the run's autocast, in its own memory format; its
inputs are re-normalised when it was trained with another mean/std. Under DDP each rank's teacher scores its
own shard, as the student does, so 2 ranks equal 1 with the doubled batch.

The checkpoint holds the teacher's file name and sha256: a resume with another teacher, or without one, is
refused naming both. metrics.json and the model card name the teacher and its test accuracy, which the
teacher's own checkpoint records (`teacher_acc`: None for a safetensors export, which holds no history).
The checks (file, safety, classes, input size) are made by `engine.plan`, so `--check` makes them too.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..checkpoint import CheckpointError
from ..config import Config, ConfigError
from ..data import sizes
from ..data.manifest import Betons
from ..fileio import sha256
from ..models import files


def no_distill(x: torch.Tensor, logits: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """No teacher: the loss as it is (the teacher's place in the step)."""
    return loss


def teacher_file(cfg: Config, betons: Betons) -> files.ModelFile | None:
    """distill.teacher, opened safely and checked against the data: its classes and its input size
    (ConfigError or CheckpointError, one line)."""
    path = cfg.distill.teacher
    if not path:
        return None
    if not Path(path).is_file():
        raise ConfigError(f"distill.teacher={path} does not exist: give one of our checkpoints (.pt) or an "
                          "exported .safetensors")
    mf = files.read(path)
    if not mf.ours:
        raise CheckpointError(f"distill.teacher={path} holds weights without a dist_resnet training config: "
                              "the teacher must be one of our checkpoints or exported .safetensors")
    if list(mf.classes or []) != list(betons.classes):
        raise ConfigError(f"distill.teacher={path} was trained on the classes {', '.join(mf.classes or [])}, "
                          f"but data.dir={cfg.data.dir} holds {', '.join(betons.classes)}: a teacher must know "
                          "the data's classes, in the same order")
    side = list(sizes.shapes(cfg.data, betons)[1])
    if mf.image_shape and list(mf.image_shape) != side:
        raise ConfigError(f"distill.teacher={path} takes {mf.image_shape[0]}x{mf.image_shape[1]} images, but this "
                          f"run's are {side[0]}x{side[1]}: train the teacher at the run's size")
    return mf


class Teacher:
    """`loss = teacher(x, logits, loss)`: the distillation loss; its state (the teacher's identity) in the
    checkpoint."""

    def __init__(self, mf: files.ModelFile, net: Callable, mean: list[float], std: list[float], alpha: float,
                 temperature: float, device: torch.device):
        self.net, self.alpha, self.t = net, alpha, temperature  # in eval mode, without gradients
        self.identity = {"file": Path(mf.path).name, "sha256": sha256(mf.path)}
        hist = mf.state.get("history") or []
        self.accuracy = next((r["test_acc"] for r in reversed(hist) if "test_acc" in r), None)
        # x_teacher = (x * std + mean - mean_t) / std_t, per channel: identity when both are the same
        shape = (1, 3, 1, 1)
        m, s = torch.tensor(mean).view(shape), torch.tensor(std).view(shape)
        mt, st = torch.tensor(mf.mean or mean).view(shape), torch.tensor(mf.std or std).view(shape)
        self.scale, self.shift = (s / st).to(device), ((m - mt) / st).to(device)
        self.same = torch.equal(m, mt) and torch.equal(s, st)

    def __call__(self, x: torch.Tensor, logits: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self.net(x if self.same else x * self.scale + self.shift)
        t = self.t
        soft = F.kl_div(F.log_softmax(logits.float() / t, 1), F.log_softmax(target.float() / t, 1),
                        reduction="batchmean", log_target=True) * (t * t)
        return self.alpha * soft + (1.0 - self.alpha) * loss

    def summary(self) -> dict:
        return {"teacher": {**self.identity, "test_acc": self.accuracy, "alpha": self.alpha,
                            "temperature": self.t}}

    def state_dict(self) -> dict:
        return {"distill": self.identity}

    def load_state_dict(self, state: dict, source: str = "") -> None:
        had = state.get("distill")
        if not had or had["sha256"] != self.identity["sha256"]:  # by content: a moved or renamed file resumes
            was = f"{had['file']} (sha256 {had['sha256'][:12]})" if had else "no teacher"
            raise CheckpointError(f"{source} was trained with {was}; this run's distill.teacher is "
                                  f"{self.identity['file']} (sha256 {self.identity['sha256'][:12]}): resume with "
                                  "the same teacher, or start a new run.dir")


class NoTeacher:
    """A run without distillation; it refuses a checkpoint that was trained with a teacher."""

    __call__ = staticmethod(no_distill)

    def summary(self) -> dict:
        return {"teacher": None}

    def state_dict(self) -> dict:
        return {"distill": None}

    def load_state_dict(self, state: dict, source: str = "") -> None:
        had = state.get("distill")
        if had:
            raise CheckpointError(f"{source} was trained with distill.teacher={had['file']} (sha256 "
                                  f"{had['sha256'][:12]}); resume with that teacher, or start a new run.dir")
