#!/usr/bin/env bash
# Starts a single-node Slurm cluster on this machine for the slurm executor's tests: munged,
# slurmctld and slurmd as plain daemons (no systemd, no cgroups), one node (this host), one
# partition `debug`. Idempotent: returns at once when the cluster already answers. Installs the
# Debian packages (munge slurmctld slurmd slurm-client) when they are missing and apt can reach a
# mirror. Exits non-zero with the reason on stderr when the cluster cannot be started; callers
# (make test) then run without it and the Rust test reports itself skipped.
set -euo pipefail

STATE=/var/lib/cip-slurm
CONF=/etc/slurm/slurm.conf
say() { echo "slurm-up: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
  say "needs root (it installs packages and starts system daemons); not starting a cluster"
  exit 1
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
  || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
  if ! command -v apt-get >/dev/null; then
    say "slurm is not installed and apt-get is not available"
    exit 1
  fi
  say "installing munge slurmctld slurmd slurm-client"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    munge slurmctld slurmd slurm-client >/dev/null; }; then
    say "apt-get could not install the slurm packages"
    exit 1
  fi
fi

host=$(hostname -s)
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
node_ready() {
  local state
  state=$(sinfo -h -n "$host" -o %T 2>/dev/null | head -1) || return 1
  case "$state" in idle | mixed | allocated | completing) return 0 ;; *) return 1 ;; esac
}

if alive /run/slurmctld.pid && alive /run/slurmd.pid && node_ready; then
  say "cluster already up (node $host)"
  exit 0
fi

mkdir -p "$STATE"/ctld "$STATE"/d /var/log/slurm /etc/slurm /run/munge /var/log/munge /var/lib/munge
# munge: a key readable by the munge user only; munged refuses to run as root.
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
chmod 0700 /etc/munge
chmod 0400 /etc/munge/munge.key
chmod 0755 /run/munge
if ! alive /run/munge/munged.pid; then
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
fi
for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
munge -n | unmunge >/dev/null || { say "munged does not answer"; exit 1; }

# The node line comes from slurmd's own view of the hardware, with a modest memory figure so
# jobs never wait on memory.
node_line=$(slurmd -C | head -1 | sed -E 's/RealMemory=[0-9]+/RealMemory=1024/')
cat >"$CONF" <<CONF
# Written by tests/slurm/start-cluster.sh: a one-node test cluster.
ClusterName=cip-test
# Addresses given explicitly: the host name need not resolve (containers, fresh VMs).
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Test jobs are short: schedule every second, not every minute.
SchedulerParameters=sched_interval=1,bf_interval=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
# Finished jobs leave the controller's memory soon (squeue stays small).
MinJobAge=30
$node_line NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF

if ! alive /run/slurmctld.pid; then slurmctld; fi
if ! alive /run/slurmd.pid; then slurmd; fi

for _ in $(seq 100); do
  if node_ready; then
    say "cluster up: node $host, partition debug ($(sinfo -h -o '%c CPUs'))"
    exit 0
  fi
  # A node left DOWN by an earlier run comes back once told so.
  if sinfo -h -n "$host" -o %T 2>/dev/null | grep -qE 'down|drain'; then
    scontrol update nodename="$host" state=resume 2>/dev/null || true
  fi
  sleep 0.2
done
say "the node never became idle; see /var/log/slurm/slurmctld.log and slurmd.log"
sinfo >&2 || true
exit 1
