"""A real, throwaway PostgreSQL server on loopback, for the tests of multi-node sweeps.

Debian's `postgresql` package (make test installs it as root, with psycopg2-binary from the `sweep`
extra). PostgreSQL refuses to run as root, so as root the server runs as the `postgres` user. Where any
of this is missing, `server()` skips the test and says why.
"""
from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest


def _binary(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    return found[-1] if found else shutil.which(name)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(enter: list[str] | None = None, host: str = "127.0.0.1"):
    """Yields the URL of a fresh database: postgresql://postgres@HOST:PORT/postgres. `enter`: a command
    prefix that runs the server on another host (nsenter into a namespace of tests/multinode.py), where
    it listens on `host`."""
    try:
        import psycopg2  # noqa: F401 - the driver the sweep's RDB storage will use
    except ImportError:
        pytest.skip("psycopg2 is not installed (pip install 'dist_resnet[sweep]'; make test does)")
    initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; make test does as root)")
    prefix: list[str] = list(enter or [])
    root = tempfile.mkdtemp(prefix="dist_resnet_pg_")
    if os.geteuid() == 0:  # the server refuses root: run it as the package's `postgres` user
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root)
            pytest.skip("running as root, and there is no `postgres` user to run PostgreSQL as")
        os.chown(root, user.pw_uid, user.pw_gid)
        prefix += ["runuser", "-u", "postgres", "--"]
    data, port = Path(root) / "data", _port()

    def run(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=120)

    try:
        p = run(initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
        if p.returncode:
            pytest.skip(f"initdb failed: {p.stderr.strip()[-300:]}")
        if host != "127.0.0.1":  # clients on the other hosts' private subnet (trust: a throwaway server)
            with open(data / "pg_hba.conf", "a") as f:
                f.write(f"host all all {host.rsplit('.', 1)[0]}.0/24 trust\n")
        opts = f"-p {port} -k {root} -c listen_addresses={host} -c fsync=off -c max_connections=50"
        p = run(pg_ctl, "-D", str(data), "-o", opts, "-w", "-t", "60", "-l", f"{root}/server.log", "start")
        if p.returncode:
            log = Path(root, "server.log").read_text()[-300:] if Path(root, "server.log").exists() else ""
            pytest.skip(f"PostgreSQL did not start: {p.stderr.strip()[-200:]} {log}")
        yield f"postgresql://postgres@{host}:{port}/postgres"
    finally:
        if data.exists():
            run(pg_ctl, "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)
