"""The real trainer with one thing changed from outside, for the tests that need a fault on cue.

    launch("tests.probes", ["nan", *train_argv], ..., env={"PROBE_STEP": "15", "PROBE_RANK": "1"})

- nan: the loss of optimizer step PROBE_STEP (1-based, global) on rank PROBE_RANK is NaN, once: its
  gradients, and so every rank's weights after DDP's all-reduce, turn NaN, as in a real divergence.
- stop_in_final_eval: a STOP file appears while the last evaluation runs.
- boundscheck: numba checks its array bounds, so a damaged beton raises in FFCV's decode thread.
- count_allreduce: a DDP communication hook counts the gradient buckets all-reduced and the elements in
  them; each rank writes the counts to PROBE_OUT.<rank> at the end.
"""
from __future__ import annotations

import os

from dist_resnet import train
from dist_resnet.train import Trainer


def nan() -> None:
    step, rank = int(os.environ["PROBE_STEP"]), int(os.environ["PROBE_RANK"])
    init = Trainer.__init__

    def patched(self, cfg, env):
        init(self, cfg, env)
        criterion, fired = self.criterion, []

        def poisoned(logits, y):
            loss = criterion(logits, y)
            if self.step + 1 == step and env.rank == rank and not fired:
                fired.append(True)
                return loss * float("nan")
            return loss

        self.criterion = poisoned

    Trainer.__init__ = patched


def stop_in_final_eval() -> None:
    evaluate = Trainer.evaluate

    def patched(self, *args, **kwargs):
        if self.epoch == self.cfg.train.epochs:
            (self.run_dir / "STOP").touch()
        return evaluate(self, *args, **kwargs)

    Trainer.evaluate = patched


def boundscheck() -> None:
    import numba

    numba.config.BOUNDSCHECK = 1


def count_allreduce() -> None:
    import json

    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    init, fit = Trainer.__init__, Trainer.fit
    counts = {"buckets": 0, "elements": 0}

    def hook(state, bucket):
        counts["buckets"] += 1
        counts["elements"] += bucket.buffer().numel()
        return allreduce_hook(state, bucket)

    def patched(self, cfg, env):
        init(self, cfg, env)
        if env.distributed:
            self.ddp.register_comm_hook(dist.group.WORLD, hook)

    def counted_fit(self):
        out = fit(self)
        with open(f"{os.environ['PROBE_OUT']}.{self.env.rank}", "w") as f:
            json.dump({**counts, "steps": self.step}, f)
        return out

    Trainer.__init__, Trainer.fit = patched, counted_fit


def main(argv: list[str]) -> None:
    globals()[argv[0]]()
    train.main(argv[1:])
