#!/usr/bin/env bash
# The system packages the suite's real services need, installed as root with apt where missing (make test
# runs this): shellcheck for the launch scripts; PostgreSQL for the multi-node sweep test; munge and
# slurm-wlm for a private one-node Slurm that runs the job scripts. Each test starts its own server and
# stops it. A package that cannot be installed only skips the tests that need it, which say so.
set -uo pipefail
missing=()
command -v shellcheck >/dev/null || missing+=("shellcheck")
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=("postgresql")
{ [ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/slurmd ] && [ -x /usr/sbin/munged ]; } || missing+=("slurm-wlm munge")
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "not installed: ${missing[*]} (apt-get install ${missing[*]}); the tests that need them will be skipped"
  exit 0
fi
apt-get update -qq || true
for group in "${missing[@]}"; do  # one at a time: a package that fails does not take the others with it
  echo "installing for the tests: $group"
  # shellcheck disable=SC2086  # a group is several package names
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $group >/dev/null \
    || echo "could not install $group: the tests that need it will be skipped"
done
