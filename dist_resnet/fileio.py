"""Files that survive any kill: write a temp file beside the target, fsync it, `os.replace` it over
the target, fsync the folder. A reader sees the old file or the new one, never a torn one.

Every file the package writes goes through here: checkpoints, config.yaml, metrics.json and the
`--out` JSON of each command. A kill between the write and the replace leaves `.NAME.tmp-PID`;
`clean_stale_tmp` removes those whose process is gone.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import BinaryIO, Callable

from .faults import fault_point

TMP = re.compile(r"^\..+\.tmp-(\d+)$")


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX: the rename lives in the folder's own blocks)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems (and Windows) cannot open a folder; nothing more to do there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """`write(f)` into a temp file beside `path`, then fsync, replace and fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # an --out into a folder not made yet
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        fault_point("write")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path: str | Path, obj: object) -> Path:
    return write_text(path, json.dumps(obj, indent=2) + "\n")


def sha256(path: str | Path) -> str:
    """The file's sha256, read in 1 MiB chunks (betons, exported models, checkpoints)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def link_atomic(src: Path, dst: Path) -> None:
    """Make `dst` name the same file as `src` (a hard link, so no extra disk), atomically.
    Where hard links are not possible (some network and FUSE filesystems), copy instead."""
    tmp = _tmp_name(dst)
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
        os.replace(tmp, dst)
    except OSError:
        tmp.unlink(missing_ok=True)
        with open(src, "rb") as s:
            atomic_write(dst, lambda f: shutil.copyfileobj(s, f))
        return
    fsync_dir(dst.parent)


def alive(pid: int) -> bool:
    """Whether process `pid` runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale_tmp(folder: str | Path) -> list[Path]:
    """Remove temp files left by killed writers (their process no longer exists); returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.iterdir():
        m = TMP.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
