#!/usr/bin/env bash
# The CPU each test file costs, alone: every file of tests/ in the suite's order (tests/conftest.py's
# LONGEST_FIRST), one pytest process each, one thread per run as in the suite (OMP_NUM_THREADS=1), on an
# otherwise idle machine. CPU is the whole machine's (/proc/stat: user, nice, system, irq, softirq), so
# Slurm's daemons and jobs, the test servers and every forked run are counted; the session fixtures a file
# needs (the betons, the trained run, the 2-rank reference) are built again in each file that needs them.
# Measures and prints: "FILE rc=EXIT cpu=SECONDS wall=SECONDS", one line per file, to stdout.
# Usage (from the repository root): bash docs/suite_per_file.sh [PYTHON [FILE...]]
#   PYTHON: default .venv/bin/python; FILE: test files by name (default: all of them)
set -u
PY=${1:-.venv/bin/python}
shift || true
cpu() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8}' /proc/stat; }
tick=$(getconf CLK_TCK)
files=${*:-$("$PY" -c "
import glob, os, sys
sys.path.insert(0, '.')
from tests.conftest import LONGEST_FIRST
names = {os.path.basename(p) for p in glob.glob('tests/test_*.py')}
print(' '.join([f for f in LONGEST_FIRST if f in names] + sorted(names - set(LONGEST_FIRST))))")}
for f in $files; do
  c0=$(cpu); t0=$(date +%s.%N)
  OMP_NUM_THREADS=1 "$PY" -m pytest -q -p no:cacheprovider "tests/$f" > /dev/null 2>&1; rc=$?
  c1=$(cpu); t1=$(date +%s.%N)
  echo "$f rc=$rc cpu=$(( (c1 - c0) / tick )) wall=$(awk "BEGIN {printf \"%.0f\", $t1 - $t0}")"
done
