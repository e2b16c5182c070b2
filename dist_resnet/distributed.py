"""Process-group set-up from the launcher's environment, in one place.

torchrun, `accelerate launch` and torchrun-under-srun all export RANK, WORLD_SIZE,
LOCAL_RANK and LOCAL_WORLD_SIZE; a plain `python -m dist_resnet.train` is rank 0 of 1.
"""
from __future__ import annotations

import contextlib
import os
import re
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

    @property
    def threads(self) -> int:
        """CPU threads for this rank's torch ops: $OMP_NUM_THREADS when it is set (as PyTorch itself reads
        it; torchrun sets 1 for several processes per node unless told otherwise), else the cores this
        process may run on, shared among the node's ranks. FFCV changes torch's count; the loaders put
        this one back."""
        requested = os.environ.get("OMP_NUM_THREADS", "")
        if requested.isdigit() and int(requested) > 0:
            return int(requested)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(1, cores // self.local_world_size)


class SetupError(RuntimeError):
    """The machine cannot run what was asked (no CUDA, too few GPUs); the message says what to do."""


def setup(device: str = "auto", timeout_s: float = 600.0) -> DistEnv:
    """Init the process group when WORLD_SIZE > 1: NCCL on GPU, gloo on CPU.

    Every collective (and the rendezvous) gives up after `timeout_s`: a rank that died or hangs
    then ends the others with an error instead of a wait without end."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise SetupError("train.device=cuda but CUDA is not available here; use train.device=cpu or auto")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise SetupError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                "launch at most one process per GPU (--nproc_per_node)"
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    control = None
    timeout = timedelta(seconds=timeout_s)
    if world > 1:
        if not dist.is_initialized():
            _init_process_group("nccl" if use_cuda else "gloo", rank, world, dev if use_cuda else None, timeout)
        # stop requests are agreed on the host: a gloo group never waits on the GPU
        control = dist.new_group(backend="gloo", timeout=timeout) if use_cuda else None
    return DistEnv(rank, world, local_rank, local_world, dev, control)


def _init_process_group(backend: str, rank: int, world: int, device_id: torch.device | None,
                        timeout: timedelta) -> None:
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or "MASTER_ADDR" not in os.environ:
        dist.init_process_group(backend, device_id=device_id, timeout=timeout)
        return
    # Under torchrun the agent's store outlives a worker-group restart (--max-restarts), and
    # its keys are not namespaced per attempt: a restarted group can read the dead group's
    # addresses and fail to connect (gloo: "connectFullMesh failed ... Connection refused").
    # A prefix per attempt keeps the rounds apart. The agent hosts that store unless it was told
    # not to share its rendezvous store (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, the elastic mode of
    # launch/multi_node.sh): then it says so (TORCHELASTIC_USE_AGENT_STORE=False), rank 0 hosts a new
    # store for each round, and there is no old key to keep apart. No prefix then: the agents' restart
    # counts differ once a node has joined late (its agent counts from 0), and so would their prefixes.
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "True") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent_hosts, timeout=timeout)
    prefix = f"dist_resnet/attempt_{attempt}" if agent_hosts else "dist_resnet"
    dist.init_process_group(backend, store=dist.PrefixStore(prefix, store), rank=rank, world_size=world,
                            device_id=device_id, timeout=timeout)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# Exit codes of every entry point (documented in docs/TRAINING.md and docs/RELIABILITY.md)
EXIT_OK = 0
EXIT_ERROR = 1  # an unexpected error (with its traceback), or another rank failed or hung
EXIT_BAD_INPUT = 2  # a bad config, data or checkpoint file, or a setting the machine cannot run
EXIT_DIVERGED = 3  # training produced a non-finite loss and was stopped (train.nonfinite)
EXIT_STOPPED = 75  # stopped on request with a checkpoint: resume with train.resume=true (EX_TEMPFAIL)


class JobExit(Exception):
    """Raised by a job to end with `code` after a one-line `message` (and cleanup on every rank).
    `agreed`: every rank raises it from the same all-reduced facts, so only rank 0 prints it. `reason`: what
    the outcome record says beside the code (a stop's cause)."""

    def __init__(self, code: int, message: str = "", agreed: bool = False, reason: str = ""):
        super().__init__(message)
        self.code, self.agreed, self.reason = code, agreed, reason


# The job's outcome for its launcher. torchrun reports every worker's failure as its own exit 1, so a script
# around it (slurm/train.sh) cannot tell a bad input (2) or a diverged run (3), which another attempt would only
# repeat, from a lost node, which a requeue fixes. Where $DIST_RESNET_OUTCOME names a file, a rank whose job ends
# in one of these codes writes it there (atomically; every rank that ends so writes the same code), and the
# script reads it. Nothing is written for an error (1) or a kill: "no outcome" is what another attempt may fix.
OUTCOME_ENV = "DIST_RESNET_OUTCOME"
OUTCOMES = {EXIT_OK: "completed", EXIT_BAD_INPUT: "bad input", EXIT_DIVERGED: "diverged", EXIT_STOPPED: "stopped"}


def record_outcome(code: int, message: str | None = None, reason: str = "") -> None:
    """Write the outcome (code, its name, the one-line message, a stop's reason) to $DIST_RESNET_OUTCOME."""
    path = os.environ.get(OUTCOME_ENV)
    if not path or code not in OUTCOMES:
        return
    import json
    import socket

    from .fileio import write_text

    record = {"exit": code, "outcome": OUTCOMES[code], "message": message, "reason": reason or None,
              "rank": int(os.environ.get("RANK", 0)), "host": socket.gethostname()}
    try:
        write_text(path, json.dumps(record) + "\n")
    except OSError as e:  # the launcher then sees no outcome, as after a kill: say why
        print(f"warning: could not write the outcome to {OUTCOME_ENV}={path}: {e}", file=sys.stderr, flush=True)


ERROR_KEY = "dist_resnet/error"


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no group, or torch moved the helper: no cross-rank report then
        return None


def publish_error(rank: int, message: str) -> None:
    """Leave this rank's error in the rendezvous store, so the ranks it leaves behind can name it."""
    store = _store() if dist.is_initialized() else None
    if store is not None:
        try:
            store.set(ERROR_KEY, f"rank {rank}: {message}")
        except Exception:  # noqa: BLE001 - the store may be gone with its host rank
            pass


def peer_error() -> str | None:
    store = _store() if dist.is_initialized() else None
    try:
        if store is not None and store.check([ERROR_KEY]):
            return store.get(ERROR_KEY).decode()
    except Exception:  # noqa: BLE001
        pass
    return None


def is_collective_failure(e: BaseException) -> bool:
    """A collective that failed because another rank died, hangs or lost its connection."""
    if isinstance(e, dist.DistError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and dist.is_initialized() and (
        "gloo" in text or "Connection closed by peer" in text or "Timed out waiting" in text)


def _leave(env: DistEnv | None, code: int) -> None:
    """End the process with `code`. A distributed worker leaves without interpreter finalisation:
    everything is written by now (atomic files, TensorBoard closed, group destroyed), but a gloo or
    numba worker thread torn down during finalisation can still abort the process ("terminate called
    without an active exception", SIGABRT; pytorch PR #179291), and torchrun would then report a
    finished run as failed. Seen once in ~15 CPU torchrun runs here."""
    if env is not None and env.distributed:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        raise SystemExit(code)


def run_job(prog: str, device: str, job: Callable[[DistEnv], T], user_errors: tuple = (),
            timeout_s: float = 600.0) -> T:
    """Set up, run `job(env)`, clean up: the shared shape of every entry point.

    - an error in `user_errors` (bad config, data or checkpoint) or a SetupError:
      `prog: error: ...` on one line, exit 2;
    - JobExit: its message, its code (a stopped or diverged run);
    - a collective that failed because another rank died or hangs: one line naming that rank's
      error where it left one, exit 1;
    - anything else propagates with its traceback.
    Every rank that fails leaves its message for the others (publish_error)."""
    try:
        env = setup(device, timeout_s)
    except SetupError as e:
        record_outcome(EXIT_BAD_INPUT, f"error: {e}")
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None
    code, message, reason = EXIT_OK, None, ""
    try:
        result = job(env)
    except JobExit as e:
        code, message, reason = e.code, (str(e) or None) if env.is_main or not e.agreed else None, e.reason
    except user_errors + (SetupError,) as e:
        code, message = EXIT_BAD_INPUT, f"error: {e}"
    except Exception as e:
        if not is_collective_failure(e):
            publish_error(env.rank, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            raise
        first = re.sub(r"^\[[^\]]*\]\s*", "", (str(e).splitlines() or [type(e).__name__])[0])  # drop gloo's source path
        cause = peer_error()
        code = EXIT_ERROR
        message = (f"error: rank {env.rank}: a collective failed ({first[:160]}). "
                   + (f"The cause: {cause}" if cause else
                      "Another rank died or hangs (train.timeout_s bounds the wait); see its log. "
                      "Resume with train.resume=true"))
    finally:
        if code in (EXIT_BAD_INPUT, EXIT_DIVERGED) and message:
            publish_error(env.rank, message.removeprefix("error: "))
        cleanup()
    record_outcome(code, message, reason)
    if message:
        print(f"{prog}: {message}", file=sys.stderr, flush=True)
    if code or env.distributed:
        _leave(env, code)
    return result


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def spread(values: list[float], group=None) -> tuple[list[float], list[float]]:
    """The min and the max of each value over all ranks (host tensors: pass the gloo control group)."""
    lo = torch.tensor(values, dtype=torch.float64)
    hi = lo.clone()
    if dist.is_initialized():
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    return lo.tolist(), hi.tolist()


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


STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)  # "checkpoint and stop": Slurm's time-limit warning, scancel


@contextlib.contextmanager
def stop_signals_blocked():
    """The stop signals held back in this thread while it starts helper processes (a forkserver,
    torchrun): they inherit the mask and outlive a stop that Slurm sends to every process of a job step.
    A process that acts on the signals unblocks them (StopRequest); one held back meanwhile is delivered
    then, not lost. Other threads, the main one included, still receive them."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class StopRequest:
    """Ask a run to stop cleanly: SIGUSR1 (Slurm's --signal warning), SIGTERM (scancel, the
    end of wall time, torchrun shutting its workers down) or a file `stop_file` (what
    slurm/train.sh writes, since `--signal=B:USR1` reaches only the batch shell).

    `agreed()` all-reduces the request, so every rank stops after the same step.
    """

    SIGNALS = STOP_SIGNALS

    def __init__(self, stop_file: Path):
        self.stop_file = stop_file
        self.reason: str | None = None
        for s in self.SIGNALS:
            signal.signal(s, self._on_signal)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.SIGNALS)  # started by a sweep, they came blocked

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

    def handled(self, remove_file: bool) -> None:
        """The run ends: signals back to their defaults and (on one rank) the stop file removed, so the
        next start does not stop at once."""
        self.restore()
        if remove_file:
            self.stop_file.unlink(missing_ok=True)
