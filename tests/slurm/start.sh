#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for tests/test_slurm.py: Debian's
# slurm-wlm (slurmctld + slurmd), munge, and accounting through slurmdbd and MariaDB (so
# `sacct` answers: submitit reads a job's state with it, and without it a cancelled job
# looks pending forever), the node being this host, one partition.
# Installs the packages when missing (as .ci/run installs Chromium), writes a minimal
# slurm.conf for this host's CPUs and memory, starts munged, MariaDB, slurmdbd, slurmctld
# and slurmd, and waits until `sinfo` shows the node idle. Idempotent: a cluster already up is left as is.
# Stop it with tests/slurm/stop.sh. Needs root (or sudo), as the daemons do.
#
#   bash tests/slurm/start.sh     # then: python -m pytest tests/test_slurm.py
set -euo pipefail
SUDO=$(command -v sudo || true)
[ "$(id -u)" = 0 ] && SUDO=""
STATE=${FEATBENCH_SLURM_STATE:-/var/lib/featbench-slurm}
CONF=/etc/slurm/slurm.conf
HOST=$(hostname -s)

if sinfo -h -o %t 2>/dev/null | grep -qx idle && sacct -n -X >/dev/null 2>&1; then
  echo "slurm: already up ($(sinfo -h -o '%P %D %t'))"
  exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
   || ! command -v slurmdbd >/dev/null || ! command -v mariadbd >/dev/null; then
  echo "slurm: installing slurm-wlm, slurmdbd, munge and mariadb-server (Debian packages)"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm slurmdbd munge mariadb-server
fi

# munge: one key, its daemon running as root (a test cluster: no munge user needed)
$SUDO mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
if [ ! -s /etc/munge/munge.key ]; then
  $SUDO dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
$SUDO chmod 400 /etc/munge/munge.key
if ! pgrep -x munged >/dev/null; then
  $SUDO munged --force
fi

# slurm.conf for this host: its CPUs and memory, proctrack/linuxproc and task/none (no
# cgroups in a container), and job records to slurmdbd (what `sacct` reads)
CPUS=$(nproc)
MEM_MB=$(awk '/MemTotal/ {print int($2 / 1024) - 1024}' /proc/meminfo)
$SUDO mkdir -p "$STATE/ctld" "$STATE/d" "$STATE/log" /etc/slurm
$SUDO tee "$CONF" >/dev/null <<CONFIG
ClusterName=featbench
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job (time limit, node failure) waits cred_expire + 1 s before it may start
# again: 120 s by default, 20 s here so the fault tests spend their time running, not waiting
AuthInfo=cred_expire=20
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
MpiDefault=none
KillWait=10
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONFIG

# accounting: MariaDB holds slurmdbd's database (a local socket, one database and user)
$SUDO mkdir -p /run/mysqld "$STATE/log"
$SUDO chown mysql:mysql /run/mysqld 2>/dev/null || true
if ! $SUDO mariadb-admin ping >/dev/null 2>&1; then
  $SUDO sh -c "mariadbd-safe --skip-networking >$STATE/log/mariadb.log 2>&1 &"
  for _ in $(seq 60); do $SUDO mariadb-admin ping >/dev/null 2>&1 && break; sleep 1; done
fi
$SUDO mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
  CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'featbench';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
$SUDO mkdir -p /etc/slurm
$SUDO tee /etc/slurm/slurmdbd.conf >/dev/null <<CONFIG
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=featbench
StorageLoc=slurm_acct_db
PidFile=$STATE/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
CONFIG
$SUDO chmod 600 /etc/slurm/slurmdbd.conf
pgrep -x slurmdbd >/dev/null || $SUDO slurmdbd
for _ in $(seq 60); do sacctmgr -n show cluster >/dev/null 2>&1 && break; sleep 1; done
sacctmgr -n show cluster format=cluster | grep -qw featbench || $SUDO sacctmgr -i add cluster featbench

pgrep -x slurmctld >/dev/null || $SUDO slurmctld
pgrep -x slurmd >/dev/null || $SUDO slurmd
for _ in $(seq 60); do
  if sinfo -h -o %t 2>/dev/null | grep -qx idle; then
    echo "slurm: up ($(sinfo -h -o '%P %D %c CPUs %m MB %t'))"
    exit 0
  fi
  sinfo -h -o %t 2>/dev/null | grep -qE 'down|drain' && $SUDO scontrol update nodename="$HOST" state=resume 2>/dev/null || true
  sleep 1
done
echo "slurm: the node did not become idle; see $STATE/log/" >&2
sinfo >&2 || true
exit 1
