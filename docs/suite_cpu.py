"""Where the test suite's CPU goes, by kind of process: from a whole-machine perf recording of the suite.

Record (as root, on the otherwise idle machine; a ps poll names the processes, since perf keeps only "python"):

    (while [ ! -f /tmp/ps.stop ]; do ps -eo pid=,args= | grep -E 'python|torchrun' >> /tmp/ps.log; sleep 0.3; done) &
    perf record -a -F 99 -o /tmp/suite.perf.data -- .venv/bin/python -m pytest -q -n 3 --dist loadfile \\
        --no-loadscope-reorder -p no:cacheprovider; touch /tmp/ps.stop

then:

    python docs/suite_cpu.py /tmp/suite.perf.data /tmp/ps.log

It prints the CPU seconds (samples / 99 Hz) of each kind: the xdist workers (with what they fork), the test
forkservers and the runs they fork, fresh `python -m MODULE` processes, and the idle CPUs (pid 0), then the
busiest single processes. A process that lived under 0.3 s may be missed by the poll ("?unknown"). Measures
and prints.
"""
from __future__ import annotations

import collections
import re
import subprocess
import sys

HZ = 99


def kind(args: str | None) -> str:
    if args is None:
        return "?unknown"
    if "forkserver" in args:
        return "forkserver (+ its forks)"
    if "exec(eval(sys.stdin" in args:
        return "xdist worker (+ its forks)"
    m = re.search(r"-m (\S+)", args)
    if m and "pytest" not in m.group(1):
        return f"-m {m.group(1)}"
    return "pytest main" if "-m pytest" in args else args[:70]


def main(perf_data: str, ps_log: str) -> None:
    args: dict[int, str] = {}
    for line in open(ps_log):
        pid, _, rest = line.strip().partition(" ")
        if pid.isdigit():
            args.setdefault(int(pid), rest.strip())
    pids = subprocess.run(["perf", "script", "-i", perf_data, "-F", "pid"], capture_output=True, text=True,
                          check=True).stdout.split()
    samples = collections.Counter(int(p) for p in pids)
    total = sum(samples.values())
    by_kind, count = collections.Counter(), collections.Counter()
    for pid, n in samples.items():
        k = "idle" if pid == 0 else kind(args.get(pid))
        by_kind[k] += n
        count[k] += 1
    print(f"{total / HZ:.0f} s of samples, {1 - by_kind['idle'] / total:.0%} busy")
    for k, n in by_kind.most_common(15):
        print(f"{n / HZ:7.1f} s {n / total:4.0%} {count[k]:5d} processes  {k}")
    print("\nthe busiest processes:")
    for pid, n in samples.most_common(12):
        print(f"{n / HZ:7.1f} s  {pid}  {(args.get(pid) or '?')[:120]}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
