"""Process-group set-up from the launcher's environment, in one place.

torchrun, `accelerate launch` and torchrun-under-srun all export RANK, WORLD_SIZE,
LOCAL_RANK and LOCAL_WORLD_SIZE; a plain `python -m dist_resnet.train` is rank 0 of 1.
"""
from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable, TypeVar

import torch
import torch.distributed as dist


T = TypeVar("T")


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    control_group: object = field(default=None, repr=False)  # gloo group for host-side agreement

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> DistEnv:
    """Init the process group when WORLD_SIZE > 1: NCCL on GPU, gloo on CPU."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but CUDA is not available; use train.device=cpu or auto")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                "launch at most one process per GPU (--nproc_per_node)"
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    control = None
    if world > 1:
        if not dist.is_initialized():
            _init_process_group("nccl" if use_cuda else "gloo", rank, world, dev if use_cuda else None)
        # stop requests are agreed on the host: a gloo group never waits on the GPU
        control = dist.new_group(backend="gloo") if use_cuda else None
    return DistEnv(rank, world, local_rank, local_world, dev, control)


def _init_process_group(backend: str, rank: int, world: int, device_id: torch.device | None) -> None:
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or "MASTER_ADDR" not in os.environ:
        dist.init_process_group(backend, device_id=device_id)
        return
    # Under torchrun the agent's store outlives a worker-group restart (--max-restarts), and
    # its keys are not namespaced per attempt: a restarted group can read the dead group's
    # addresses and fail to connect (gloo: "connectFullMesh failed ... Connection refused").
    # A prefix per attempt keeps the rounds apart.
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timedelta(minutes=10))
    dist.init_process_group(backend, store=dist.PrefixStore(f"dist_resnet/attempt_{attempt}", store), rank=rank,
                            world_size=world, device_id=device_id)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_after_success() -> None:
    """Leave a finished distributed worker without interpreter finalisation.

    Everything is written by now (atomic files, TensorBoard closed, group destroyed), but a
    gloo or numba worker thread torn down during finalisation can still abort the process
    ("terminate called without an active exception", SIGABRT; see pytorch PR #179291), and
    torchrun then reports a finished run as failed. Seen once in ~15 CPU torchrun runs here.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_job(prog: str, device: str, job: Callable[[DistEnv], T], user_errors: tuple = ()) -> T:
    """Set up, run `job(env)`, clean up: the shared shape of every entry point.

    An error in `user_errors` (bad config or data) is printed as `prog: error: ...` and exits
    with 2; anything else propagates with its traceback. A finished distributed worker leaves
    through exit_after_success.
    """
    env = setup(device)
    try:
        result = job(env)
    except user_errors as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        cleanup()
    if env.distributed:
        exit_after_success()
    return result


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics).

    DDP broadcasts them before each training forward, but each rank then updates its own copy, and
    lookahead/EMA average those per-rank copies. Evaluating after this makes every rank evaluate
    rank 0's model, which is the one checkpointed, so a resumed run evaluates exactly the same."""
    if dist.is_initialized():
        for buf in module.buffers():
            dist.broadcast(buf, src=0)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class StopRequest:
    """Ask a run to stop cleanly: SIGUSR1 (Slurm's --signal warning), SIGTERM (scancel, the
    end of wall time, torchrun shutting its workers down) or a file `stop_file` (what
    slurm/train.sh writes, since `--signal=B:USR1` reaches only the batch shell).

    `agreed()` all-reduces the request, so every rank stops after the same step.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self, stop_file: Path):
        self.stop_file = stop_file
        self.reason: str | None = None
        for s in self.SIGNALS:
            signal.signal(s, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        self.reason = signal.Signals(signum).name

    def agreed(self, group=None) -> bool:
        if self.reason is None and self.stop_file.exists():
            self.reason = f"stop file {self.stop_file}"
        flag = torch.tensor([int(self.reason is not None)])
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        if flag.item() and self.reason is None:
            self.reason = "another rank's request"
        return bool(flag.item())

    def restore(self) -> None:
        for s in self.SIGNALS:
            signal.signal(s, signal.SIG_DFL)
