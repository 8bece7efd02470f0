#!/usr/bin/env bash
# Stop the test cluster tests/slurm/start.sh started: its jobs, then slurmd, slurmctld,
# slurmdbd, munged and MariaDB. Safe to run when nothing is up.
SUDO=$(command -v sudo || true)
[ "$(id -u)" = 0 ] && SUDO=""
command -v scancel >/dev/null && $SUDO scancel --user="$(id -un)" 2>/dev/null
for daemon in slurmd slurmctld slurmdbd munged; do
  $SUDO pkill -x "$daemon" 2>/dev/null
done
for _ in $(seq 20); do
  pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || pgrep -x slurmdbd >/dev/null \
    || pgrep -x munged >/dev/null || break
  sleep 0.5
done
command -v mariadb-admin >/dev/null && $SUDO mariadb-admin shutdown 2>/dev/null
exit 0
