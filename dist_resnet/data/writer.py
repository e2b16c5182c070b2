"""FFCV's DatasetWriter, watched: the one way `prepare` writes a beton.

FFCV 1.0.2's writer starts its worker processes, then waits for them by polling a shared counter
(`while done != total: sleep(0.1)`), never for the processes themselves: a worker that dies (an image its
decoder or OpenCV's resize refuses, an out-of-memory kill) leaves the main process waiting forever beside its
defunct workers. Here every worker is recorded, its error is sent back, the wait checks them at each poll, and
a dead one ends the write with a PrepareError naming what it said; workers still running when the write ends,
however it ends, are stopped, and the writer's shared memory is released.

A prepare stopped by SIGTERM or Ctrl-C stops its writers and removes its temporary folder on the way out; one
killed with SIGKILL cannot, and the next prepare into the same folder removes what it left (`clean_stale`).
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

from tqdm import tqdm

from ..fileio import alive
from .manifest import PrepareError


def write(path: Path, fields: dict, dataset, workers: int, chunksize: int = 100) -> None:
    """`dataset` (indexable: (image, label) per item) into the beton `path` with FFCV's writer, `workers`
    processes; PrepareError if one dies."""
    from ffcv import writer

    errors = multiprocessing.SimpleQueue()  # the context FFCV's `Process` uses
    started: list = []

    class Worker(writer.Process):  # FFCV's `Process`, recorded and made to report its error
        def start(self) -> None:
            started.append(self)
            super().start()

        def run(self) -> None:
            try:
                super().run()
            except BaseException as e:  # noqa: BLE001 - sent to the main process, which names it
                errors.put(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
                os._exit(1)

    def watchful_sleep(seconds: float) -> None:
        time.sleep(seconds)
        dead = [p for p in started if p.exitcode not in (None, 0)]
        if dead:
            said = errors.get() if not errors.empty() else f"exit code {dead[0].exitcode}"
            raise PrepareError(f"a writer process of {path.name} died ({said}); nothing was written")

    bars: list = []

    def bar(*args, **kwargs) -> tqdm:  # FFCV's own bar has no label (tqdm(total=N)): this one names the beton
        bars.append(tqdm(*args, desc=f"write {path.name}", unit="img", **kwargs))
        return bars[-1]

    w = writer.DatasetWriter(str(path), fields, num_workers=workers)
    saved = writer.Process, writer.sleep, writer.tqdm
    writer.Process, writer.sleep, writer.tqdm = Worker, watchful_sleep, bar
    try:
        w.from_indexed_dataset(dataset, chunksize=chunksize)
    except BaseException:
        release(w)
        raise
    finally:
        writer.Process, writer.sleep, writer.tqdm = saved
        for b in bars:  # closed now, not at exit, after the error line
            b.close()
        for p in started:
            if p.is_alive():
                p.terminate()
            p.join(5)


def release(w) -> None:
    """The shared memory of a write that did not finish (FFCV unlinks it only at the end of a write)."""
    sm = getattr(w, "metadata_sm", None)
    if sm is not None:
        try:
            sm.close()
            sm.unlink()
        except (FileNotFoundError, OSError):
            pass


def clean_stale(out: Path) -> list[Path]:
    """Remove the temporary folders beside `out` left by prepares that were killed (their process is gone)."""
    pattern, removed = re.compile(rf"^\.{re.escape(out.name)}\.tmp-(\d+)-"), []
    for p in out.parent.iterdir():
        m = pattern.match(p.name)
        if m and p.is_dir() and int(m.group(1)) != os.getpid() and not alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


WRITING: list[Path] = []  # the temporary folder of the write in progress, for the signal handler


@contextlib.contextmanager
def stop_on_signals():
    """Inside: SIGTERM (kill, a job's end) and SIGINT (Ctrl-C) stop prepare at once, and clean up: the writer and
    decode processes stopped, the temporary folder removed, exit 128 + the signal. The handler does it itself: an
    exception raised from it can land where Python ignores exceptions (a finalizer), and prepare went on. The
    process's own handlers are back on the way out."""
    main = os.getpid()

    def stop(signum, frame):
        if os.getpid() == main:  # a writer process inherits the handler: it only leaves
            for child in multiprocessing.active_children():
                child.terminate()
            for folder in WRITING:
                shutil.rmtree(folder, ignore_errors=True)
            print(f"prepare: stopped by {signal.Signals(signum).name}; nothing was written", file=sys.stderr,
                  flush=True)
        os._exit(128 + signum)

    saved = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
