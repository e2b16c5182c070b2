"""A real, throwaway one-node Slurm cluster on this host, for the tests of slurm/*.sh.

Debian's `slurm-wlm` and `munge` (make test installs them as root). Everything is private to one temp
folder: a munged on its own socket and key, a slurm.conf for this host with free ports, slurmctld and
slurmd as root (SlurmUser=root), no systemd, no accounting. Commands reach it through $SLURM_CONF.
Where any of this is missing or does not start, `cluster()` skips the test and says why.

What the fakes could not show and this does: `scancel` and srun deliver a signal to every process of a
job step, not to one pid; a requeued job gets the same job id and SLURM_RESTART_COUNT; KillWait ends in
SIGKILL.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.launch import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")


def _sbin(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.path.exists(p)), None)


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        # jobs run this interpreter's python and torchrun, as a user's job runs its activated environment's
        path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
        self.env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf"), "PATH": path}

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=60)
        if check and p.returncode:
            raise RuntimeError(f"{' '.join(cmd)}: exit {p.returncode}: {p.stderr.strip()}")
        return p

    def sbatch(self, script: Path, *args: str, options: tuple[str, ...] = (), env: dict | None = None,
               cwd: Path) -> str:
        """Submit `script`; its job id. The scripts ask for GPUs and 32 CPUs: this node has 2 CPUs, no GPU."""
        p = subprocess.run(["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=2", "--time=00:20:00",
                            *options, str(script), *args], capture_output=True, text=True, cwd=cwd,
                           env={**self.env, **(env or {})}, timeout=60)
        if p.returncode:
            raise RuntimeError(f"sbatch: {p.stderr.strip()}")
        return p.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """The job's record (JobState, Restarts, ExitCode, ...), as `scontrol show job` gives it."""
        out = self.run("scontrol", "-o", "show", "job", job_id, check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def await_file(self, job_id: str, ready, what: str, timeout: float = 300) -> None:
        """Wait until `ready()` (a file the job writes, a line in its output); fail at once, with the job's
        record, if the job ends first."""
        deadline = time.time() + timeout
        while not ready():
            rec = self.job(job_id)
            if ended(rec) or time.time() > deadline:
                out = Path(rec.get("StdOut", "/nonexistent"))
                raise AssertionError(f"job {job_id} never got to {what}: {rec.get('JobState')}, exit "
                                     f"{rec.get('ExitCode')}; its output:\n" + (out.read_text()[-2000:] if out.is_file() else ""))
            time.sleep(0.3)

    def wait(self, job_id: str, until, timeout: float = 300, what: str = "") -> dict[str, str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            rec = self.job(job_id)
            if until(rec):
                return rec
            time.sleep(0.5)
        raise AssertionError(f"job {job_id}: {what or 'the awaited state'} not reached in {timeout:.0f} s; "
                             f"last record {self.job(job_id)}; slurmctld log: {self.log('slurmctld')[-1500:]}")

    def requeued(self, job_id: str, restarts: int = 1, timeout: float = 300) -> dict[str, str]:
        """Wait for the job to be back in the queue after its `restarts`-th requeue, then let it start now:
        Slurm holds a requeued batch job for about two minutes (its BeginTime), which would only slow
        the suite down; a site's admin can do the same with this scontrol command."""
        rec = self.wait(job_id, lambda r: r.get("Restarts") == str(restarts) and r.get("JobState") == "PENDING",
                        timeout, f"PENDING after requeue {restarts}")
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
        return rec

    def log(self, daemon: str) -> str:
        path = self.root / f"{daemon}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def ended(rec: dict) -> bool:
    return rec.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


CONF = """ClusterName=dist-resnet-test
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
AuthInfo=socket={root}/munge.socket
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
JobRequeue=1
KillWait=30
MinJobAge=600
MessageTimeout=30
NodeName={host} CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@contextlib.contextmanager
def cluster():
    """Yields a running Cluster; everything it started is stopped and removed afterwards."""
    missing = [d for d in DAEMONS if _sbin(d) is None] + [c for c in ("sbatch", "scancel", "scontrol")
                                                         if shutil.which(c) is None]
    if missing:
        pytest.skip(f"Slurm is not installed (missing {', '.join(missing)}: apt-get install slurm-wlm munge; "
                    "make test does as root)")
    if os.geteuid() != 0:
        pytest.skip("a private Slurm runs its daemons as root (SlurmUser=root); the tests are not root")
    if not Path("/etc/munge/munge.key").exists():
        pytest.skip("munge has no key (/etc/munge/munge.key): apt-get install munge creates one")
    root = Path(tempfile.mkdtemp(prefix="dist_resnet_slurm_"))
    for d in ("state", "spool"):
        (root / d).mkdir()
    shutil.copy("/etc/munge/munge.key", root / "munge.key")
    os.chmod(root / "munge.key", 0o400)
    host = socket.gethostname().split(".")[0]
    (root / "slurm.conf").write_text(CONF.format(host=host, root=root, ctld_port=free_port(), d_port=free_port(),
                                                 cpus=os.cpu_count() or 2))
    procs: list[subprocess.Popen] = []
    c = Cluster(root)
    try:
        procs.append(_daemon(root, "munged", ["-f", "-F", f"--key-file={root}/munge.key",
                                              f"--socket={root}/munge.socket", f"--pid-file={root}/munged.pid",
                                              f"--log-file={root}/munged.log", f"--seed-file={root}/munge.seed"]))
        _await(lambda: (root / "munge.socket").exists(), "munged", root)
        procs.append(_daemon(root, "slurmctld", ["-D", "-i", "-f", str(root / "slurm.conf")], c.env))
        _await(lambda: c.run("scontrol", "ping", check=False).stdout.count("UP") >= 1, "slurmctld", root)
        procs.append(_daemon(root, "slurmd", ["-D", "-f", str(root / "slurm.conf")], c.env))
        _await(lambda: "idle" in c.run("sinfo", "-h", "-o", "%T", check=False).stdout, "slurmd", root)
        yield c
    finally:
        subprocess.run(["scancel", "--full", "-s", "KILL", "-u", "root"], env=c.env, capture_output=True, timeout=60)
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(root, ignore_errors=True)


def _daemon(root: Path, name: str, args: list[str], env: dict | None = None) -> subprocess.Popen:
    out = open(root / f"{name}.out", "w")  # noqa: SIM115 - the daemon's stdout, for the skip message
    return subprocess.Popen([_sbin(name), *args], stdout=out, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def _await(ready, name: str, root: Path, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready():
            return
        time.sleep(0.3)
    said = ((root / f"{name}.out").read_text(errors="replace") + (root / f"{name}.log").read_text(errors="replace")
            if (root / f"{name}.log").exists() else (root / f"{name}.out").read_text(errors="replace"))
    pytest.skip(f"{name} did not start in {timeout:.0f} s: {said.strip()[-400:]}")
