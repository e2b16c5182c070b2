"""What a resume may change. Every key not listed here shapes the run's trajectory and must match the
checkpoint's: the trainer refuses the resume and names each such key with its old and new value."""
from __future__ import annotations

from .load import flatten, to_dict
from .schema import Config

RESUME_HARMLESS = (
    "run.dir", "run.progress", "run.pictures", "run.csv", "run.mlflow", "run.mlflow_experiment", "run.mlflow_parent", "run.wandb",
    "run.wandb_project", "run.wandb_group", "train.resume", "train.log_every", "train.stop_check_every", "train.eval_every",
    "train.tta", "train.keep_last", "train.checkpoint_every", "train.eval_test_every", "train.timeout_s", "train.nonfinite", "train.max_rollbacks",
    "train.ema", "train.ema_decay",  # the EMA only watches the weights; a new one starts from the restored ones
    "data.dir",  # compared by the betons' sha256 instead: a moved folder resumes, different data does not
    "data.num_workers", "data.batches_ahead", "data.os_cache", "data.verify",
    "model.pretrained",  # only the first start reads it: a resume takes the weights from the checkpoint
    "distill.teacher",  # compared by the teacher's sha256 instead (engine/distill.py): a moved file resumes
    "data.pipeline",  # ffcv and device give the very same batches (tests/test_loader.py)
    "train.warmup_steps",  # restores the state exactly (tests/test_train.py)
    "train.eval_attack", "adv.eval_alpha", "adv.eval_steps", "adv.eval_restarts", "adv.eval_every",  # evaluation
    "adv.check_images", "adv.check_steps",  # the collapse check reads the weights; it changes none
)
# Allowed too, but the resumed run is then no longer bit-identical to an uninterrupted one.
RESUME_NUMERICS = ("train.device", "model.compile", "model.compile_mode", "model.channels_last", "train.deterministic")


def resume_changes(old: Config, new: Config) -> tuple[dict, dict]:
    """(refused, numerics): the changed keys that alter the run's trajectory, and those that only
    alter its floating point; each maps key -> (old value, new value)."""
    a, b = flatten(to_dict(old)), flatten(to_dict(new))
    changed = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    numerics = {k: v for k, v in changed.items() if k in RESUME_NUMERICS}
    refused = {k: v for k, v in changed.items() if k not in RESUME_HARMLESS and k not in RESUME_NUMERICS}
    return refused, numerics
