"""A real multi-node Slurm cluster on this one machine, for the tests of what happens across hosts.

Each host `n1`..`nN` is a network namespace with its own UTS namespace (its hostname) and mount namespace
(its own /etc/hosts and /etc/resolv.conf, and its own munge socket and slurmd spool, bind-mounted over one
path that slurm.conf names), held open by a `sleep` started with `unshare`. The hosts are joined by veth
pairs on a bridge, on a private subnet (10.77.K.0/24) that is created here, with no address on the
machine's side and no default route: no packet can leave the machine, and the machine's own network is
never touched. A command runs on a host through `nsenter --target HOLDER --net --uts --mount`
(`ip netns exec` remounts /sys, which hides /sys/fs/cgroup, and slurmd then stops with "Unable to
initialize cgroup plugin").

Slurm: one munged per host (one key, private to the cluster), slurmctld on n1, one slurmd per host (each in
its own network namespace, so all on the same port). Debian's slurm-wlm 22.05 and munge, as root, no
systemd. The whole cluster comes up in a few seconds. Where namespaces or Slurm are missing, `cluster()`
skips the test and says why.
"""
from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.slurm import Cluster, _sbin

CONF = """ClusterName=dist-resnet-multi
SlurmctldHost=n1
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
AuthInfo=socket={node}/munge.socket
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={node}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={node}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={node}/slurmd.log
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
KillWait=10
MinJobAge=600
MessageTimeout=10
SlurmdTimeout=5
InactiveLimit=0
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _run(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)
    if check and p.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: exit {p.returncode}: {p.stderr.strip()}")
    return p


class Host:
    """One host: its namespaces' holder process, its name and address."""

    def __init__(self, name: str, address: str, holder: subprocess.Popen):
        self.name, self.address, self.holder = name, address, holder

    def enter(self) -> list[str]:
        return ["nsenter", f"--target={self.holder.pid}", "--net", "--uts", "--mount", "--"]

    def net_inode(self) -> int:
        return os.stat(f"/proc/{self.holder.pid}/ns/net").st_ino

    def pids(self) -> list[int]:
        """Every process in this host's network namespace but its holder."""
        out, inode = [], self.net_inode()
        for d in Path("/proc").iterdir():
            if d.name.isdigit() and int(d.name) != self.holder.pid:
                with contextlib.suppress(OSError):
                    if os.stat(d / "ns" / "net").st_ino == inode:
                        out.append(int(d.name))
        return out


class MultiCluster(Cluster):
    """A Cluster whose commands run on n1 (where slurmctld is); `on(host, ...)` runs one elsewhere."""

    def __init__(self, root: Path, hosts: list[Host]):
        super().__init__(root)
        self.hosts = {h.name: h for h in hosts}
        self.daemons: dict[str, subprocess.Popen] = {}

    def on(self, host: str, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return _run(*self.hosts[host].enter(), *cmd, check=check, env=self.env, **kw)

    def popen(self, host: str, cmd: list[str], log: Path, env: dict | None = None, cwd: Path | None = None):
        """`cmd` started on `host` (in `cwd`: nsenter --mount starts in the namespace's root otherwise)."""
        out = open(log, "a")  # noqa: SIM115 - the process's output, kept open by it
        wd = [f"--wd={cwd}"] if cwd is not None else []
        enter = self.hosts[host].enter()
        return subprocess.Popen([*enter[:-1], *wd, "--", *cmd], stdout=out, stderr=subprocess.STDOUT,
                                env={**self.env, **(env or {})}, start_new_session=True)

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.on("n1", *cmd, check=check)

    def sbatch(self, script: Path, *args: str, options: tuple[str, ...] = (), env: dict | None = None,
               cwd: Path) -> str:
        """Submit `script` from n1 on CPU nodes (no --gpus-per-node: the script's own request is overridden,
        as a CPU partition needs)."""
        p = subprocess.run([*self.hosts["n1"].enter(), "sbatch", "--parsable", "--gpus-per-node=0",
                            "--cpus-per-task=2", "--time=00:20:00", f"--chdir={cwd}", *options, str(script), *args],
                           capture_output=True, text=True, cwd=cwd, env={**self.env, **(env or {})}, timeout=60)
        if p.returncode:
            raise RuntimeError(f"sbatch: {p.stderr.strip()}")
        return p.stdout.strip().split(";")[0]

    def start_slurmd(self, host: str) -> None:
        self.daemons[f"slurmd-{host}"] = self.popen(host, [_sbin("slurmd"), "-D", "-f", str(self.root / "slurm.conf")],
                                                    self.root / host / "slurmd.out")

    def crash(self, host: str) -> list[int]:
        """The host dies: every process on it (slurmd, munged, the job's) is SIGKILLed; its holder stays."""
        pids = self.hosts[host].pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids

    def revive(self, host: str) -> None:
        """The host is back: its munged and slurmd start again."""
        self.start_munged(host)
        self.start_slurmd(host)

    def start_munged(self, host: str) -> None:
        node = self.root / "node"
        self.daemons[f"munged-{host}"] = self.popen(host, [
            _sbin("munged"), "-f", "-F", f"--key-file={self.root}/munge.key", f"--socket={node}/munge.socket",
            f"--pid-file={node}/munged.pid", f"--log-file={node}/munged.log", f"--seed-file={node}/munge.seed"],
            self.root / host / "munged.out")
        _await(lambda: (self.root / host / "munge.socket").exists(), f"munged on {host}", self.root)

    def until(self, ready, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while not ready():
            if time.time() > deadline:
                raise AssertionError(f"{what}: not in {timeout:.0f} s; slurmctld log: {self.log('slurmctld')[-1500:]}")
            time.sleep(0.5)

    def node_state(self, host: str) -> str:
        out = self.run("scontrol", "-o", "show", "node", host, check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out)).get("State", "")


def _await(ready, what: str, root: Path, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready():
            return
        time.sleep(0.2)
    logs = " | ".join(p.read_text(errors="replace").strip()[-300:] for p in sorted(root.glob("**/*.out"))
                      if p.stat().st_size)
    pytest.skip(f"{what} did not start in {timeout:.0f} s: {logs[-600:]}")


def _skip_unless_possible() -> None:
    missing = [d for d in ("munged", "slurmctld", "slurmd") if _sbin(d) is None] + [
        c for c in ("sbatch", "scontrol", "unshare", "nsenter", "ip") if shutil.which(c) is None]
    if missing:
        pytest.skip(f"a namespaced Slurm cluster needs {', '.join(missing)} (apt-get install slurm-wlm munge "
                    "iproute2 util-linux; make test does as root)")
    if os.geteuid() != 0:
        pytest.skip("network namespaces and a private Slurm need root; the tests are not root")
    if not Path("/etc/munge/munge.key").exists():
        pytest.skip("munge has no key (/etc/munge/munge.key): apt-get install munge creates one")
    probe = subprocess.run(["unshare", "--net", "--uts", "--mount", "true"], capture_output=True, text=True)
    if probe.returncode:
        pytest.skip(f"this machine cannot make network namespaces: {probe.stderr.strip()[:200]}")


def _network(root: Path, n: int) -> tuple[str, list[Host]]:
    """The bridge and N hosts on it: hostname, /etc/hosts, address; their own folders bind-mounted."""
    subnet = random.randint(1, 250)
    bridge = f"drnbr{subnet}"
    _run("ip", "link", "add", bridge, "type", "bridge")
    _run("ip", "link", "set", bridge, "up")
    names = [f"n{i}" for i in range(1, n + 1)]
    (root / "hosts").write_text("127.0.0.1 localhost\n" + "".join(f"10.77.{subnet}.{i} {name}\n"
                                                                   for i, name in enumerate(names, 1)))
    (root / "resolv.conf").write_text("# no name server: the hosts are in /etc/hosts\n")
    hosts = []
    for i, name in enumerate(names, 1):
        (root / name / "spool").mkdir(parents=True)
        holder = subprocess.Popen(["unshare", "--net", "--uts", "--mount", "--propagation", "private", "sleep",
                                   "infinity"], start_new_session=True)
        host = Host(name, f"10.77.{subnet}.{i}", holder)
        hosts.append(host)
        _await(lambda: os.path.exists(f"/proc/{holder.pid}/ns/net") and host.net_inode() != os.stat(
            "/proc/self/ns/net").st_ino, f"namespace {name}", root, 10)
        veth = f"drn{subnet}v{i}"
        _run("ip", "link", "add", veth, "type", "veth", "peer", "name", f"{veth}p")
        _run("ip", "link", "set", f"{veth}p", "netns", str(holder.pid))
        _run("ip", "link", "set", veth, "master", bridge, "up")
        (root / "node").mkdir(exist_ok=True)
        _run(*host.enter(), "sh", "-euc", f"""
hostname {name}
ip link set lo up
ip link set {veth}p name eth0
ip addr add {host.address}/24 dev eth0
ip link set eth0 up
mount --bind {root}/hosts /etc/hosts
mount --bind {root}/resolv.conf /etc/resolv.conf
mount --bind {root}/{name} {root}/node
""")
    return bridge, hosts


@contextlib.contextmanager
def cluster(n: int = 2):
    """Yields a running MultiCluster of `n` hosts; everything it made is stopped and removed afterwards."""
    _skip_unless_possible()
    root = Path(tempfile.mkdtemp(prefix="dist_resnet_multi_"))
    (root / "state").mkdir()
    shutil.copy("/etc/munge/munge.key", root / "munge.key")
    os.chmod(root / "munge.key", 0o400)
    bridge, hosts = None, []
    try:
        bridge, hosts = _network(root, n)
        nodes = "".join(f"NodeName={h.name} NodeAddr={h.address} CPUs={os.cpu_count() or 2} RealMemory=1000 "
                        "State=UNKNOWN\n" for h in hosts)
        (root / "slurm.conf").write_text(CONF.format(root=root, node=root / "node", nodes=nodes))
        c = MultiCluster(root, hosts)
        for h in hosts:
            c.start_munged(h.name)
        c.daemons["slurmctld"] = c.popen("n1", [_sbin("slurmctld"), "-D", "-i", "-f", str(root / "slurm.conf")],
                                         root / "slurmctld.out")
        _await(lambda: "UP" in c.run("scontrol", "ping", check=False).stdout, "slurmctld", root)
        for h in hosts:
            c.start_slurmd(h.name)
        _await(lambda: c.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split().count("idle") == n,
               f"{n} slurmd", root)
        yield c
    finally:
        for h in hosts:
            for pid in h.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            h.holder.kill()
            h.holder.wait()
        if bridge:
            _run("ip", "link", "del", bridge, check=False)
        shutil.rmtree(root, ignore_errors=True)


def python_path() -> str:
    """The interpreter's folder first on PATH: jobs run this environment's python and torchrun."""
    return f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
