"""Start real trainer processes fast, for the tests that start many (kills, resumes, world sizes).

Each process is forked by a multiprocessing forkserver that imported torch, FFCV and dist_resnet
once, which saves the ~8 s import of every fresh interpreter (FFCV compiles numba code at import).
The forkserver never runs a parallel op, so forking it is safe. A process is a real rank: its own
pid (so SIGKILL kills only it), its own gloo rendezvous over RANK / WORLD_SIZE / MASTER_ADDR,
exactly what torchrun exports. Its stdout and stderr go to a log file.
"""
from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import socket
import sys
import time
from pathlib import Path

_ctx = None
# torch._dynamo: torch.optim imports it at the first optimizer (2.6 s here); tensorboard: the SummaryWriter;
# matplotlib: every run draws its curves at the end; ffcv: the runs with data.pipeline=ffcv (its import
# compiles numba code, 8 s here; the trainer imports it only for that pipeline)
PRELOAD = ["torch._dynamo", "torch.utils.tensorboard", "matplotlib.pyplot", "ffcv", "dist_resnet.train",
           "dist_resnet.evaluate"]


def context():
    global _ctx
    if _ctx is None:
        _ctx = mp.get_context("forkserver")
        _ctx.set_forkserver_preload(PRELOAD)
    return _ctx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(module: str, argv: list[str], env: dict, log: str, cwd: str | None = None) -> None:
    if cwd is not None:
        os.chdir(cwd)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    os.environ.update(env)
    importlib.import_module(module).main(argv)


class Ranks:
    """`nproc` ranks of `module.main(argv)`, started now (`argv` may also be one list per rank)."""

    def __init__(self, module: str, argv: list, log: Path, nproc: int = 1, env: dict | None = None,
                 cwd: Path | None = None):
        port = str(free_port())
        self.log = log
        self.procs = []
        per_rank = argv if argv and isinstance(argv[0], list) else [argv] * nproc
        for rank in range(nproc):
            rank_env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
                        "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                        **(env or {})}
            p = context().Process(target=_child, args=(module, per_rank[rank], rank_env, str(log),
                                                       None if cwd is None else str(cwd)))
            p.start()
            self.procs.append(p)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def wait(self, timeout: float = 300) -> list[int]:
        """Exit codes (negative: killed by that signal); kills what is still running at `timeout`."""
        deadline = time.time() + timeout
        for p in self.procs:
            p.join(max(0.0, deadline - time.time()))
        hung = [p for p in self.procs if p.is_alive()]
        for p in hung:
            p.kill()
            p.join()
        if hung:
            raise AssertionError(f"{len(hung)} rank(s) still running after {timeout} s:\n{self.output()[-4000:]}")
        return [p.exitcode for p in self.procs]

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


def launch(module: str, argv: list[str], log: Path, nproc: int = 1, env: dict | None = None,
           timeout: float = 300, cwd: Path | None = None) -> list[int]:
    return Ranks(module, argv, log, nproc, env, cwd).wait(timeout)
