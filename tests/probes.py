"""The real trainer with one thing changed from outside, for the tests that need a fault on cue.

    launch("tests.probes", ["nan", *train_argv], ..., env={"PROBE_STEP": "15", "PROBE_RANK": "1"})

- nan: the loss of optimizer step PROBE_STEP (1-based, global) on rank PROBE_RANK is NaN, once: its
  gradients, and so every rank's weights after DDP's all-reduce, turn NaN, as in a real divergence.
- stop_in_final_eval: a STOP file appears while the last evaluation runs.
- boundscheck: numba checks its array bounds, so a damaged beton raises in FFCV's decode thread.
- count_allreduce: a DDP communication hook counts the gradient buckets all-reduced and the elements in
  them; each rank writes the counts to PROBE_OUT.<rank> at the end.
- held_after_save: after each checkpoint, each rank writes how many ranks' PowerSGD states it still holds.
"""
from __future__ import annotations

import os

from dist_resnet import rundir, train
from dist_resnet.train import Trainer


def after_build(change) -> None:
    """`change(components, env)` runs on what the trainer's build made, before the trainer uses it."""
    build = train.build

    def patched(cfg, env):
        components = build(cfg, env)
        change(components, env)
        return components

    train.build = patched


def nan() -> None:
    step, rank = int(os.environ["PROBE_STEP"]), int(os.environ["PROBE_RANK"])

    def poison(c, env):
        criterion, fired = c.step.criterion, []

        def poisoned(logits, y):
            loss = criterion(logits, y)
            if c.state.step + 1 == step and env.rank == rank and not fired:
                fired.append(True)
                return loss * float("nan")
            return loss

        c.step.criterion = poisoned

    after_build(poison)


def stop_in_final_eval() -> None:
    end_epoch = Trainer.end_epoch

    def patched(self, record):
        if self.state.epoch + 1 == self.cfg.train.epochs:
            run = self.evaluator.run

            def touching(*args, **kwargs):
                rundir.request_stop(self.cfg.run.dir)
                return run(*args, **kwargs)

            self.evaluator.run = touching
        return end_epoch(self, record)

    Trainer.end_epoch = patched


def boundscheck() -> None:
    import numba

    numba.config.BOUNDSCHECK = 1


def count_allreduce() -> None:
    import json

    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    fit = Trainer.fit
    counts = {"buckets": 0, "elements": 0}

    def hook(state, bucket):
        counts["buckets"] += 1
        counts["elements"] += bucket.buffer().numel()
        return allreduce_hook(state, bucket)

    def register(c, env):
        if env.distributed:
            c.step.ddp.register_comm_hook(dist.group.WORLD, hook)

    def counted_fit(self):
        out = fit(self)
        with open(f"{os.environ['PROBE_OUT']}.{self.env.rank}", "w") as f:
            json.dump({**counts, "steps": self.state.step}, f)
        return out

    after_build(register)
    Trainer.fit = counted_fit


def held_after_save() -> None:
    """After each checkpoint, how many ranks' PowerSGD states this rank still holds (gathered for rank 0's
    file); each rank writes the counts to PROBE_OUT.<rank> at the end."""
    import json

    held: list[int] = []

    def watch(c, env):
        save = c.checkpointer.save

        def watched(*args, **kwargs):
            save(*args, **kwargs)
            hook = next(p for p in c.checkpointer.parts if hasattr(p, "gather"))
            held.append(len(getattr(hook, "gathered", None) or []))
            with open(f"{os.environ['PROBE_OUT']}.{env.rank}", "w") as f:
                json.dump(held, f)

        c.checkpointer.save = watched

    after_build(watch)


def main(argv: list[str]) -> None:
    globals()[argv[0]]()
    train.main(argv[1:])
