#!/usr/bin/env bash
# Installs and starts a single-node Slurm cluster on this machine, for the launcher tests.
#
# CI machines are containers or VMs without systemd, so the daemons are started directly.
# Idempotent: a second run finds the node idle and returns at once. Needs root.
set -euo pipefail

CONF_DIR=/etc/slurm
LOG_DIR=/var/log/slurm
STATE_DIR=/var/spool/slurmctld
SPOOL_DIR=/var/spool/slurmd
WAIT_S=${SLURM_CI_WAIT_S:-60}

die() { echo "error: .ci/slurm.sh: $*" >&2; exit 1; }

node_state() { sinfo -h -N -o '%t' 2>/dev/null | head -n1 || true; }

# `slurmd -C` prints this host's node line (name, CPUs, sockets, cores, memory) as
# slurmd itself will detect it, so the config can never disagree with the hardware.
render_conf() {
  local node_line host
  node_line=$(slurmd -C | head -n1)
  [[ $node_line == NodeName=* ]] || die "slurmd -C printed no NodeName line: $node_line"
  host=$(hostname -s)
  cat <<EOF
# Written by .ci/slurm.sh: a one-node cluster for tests.
ClusterName=ci
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
# No cgroups: containers often lack a writable cgroup tree.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# Finished jobs stay visible to scontrol long enough for launch.slurm --wait to read them.
MinJobAge=600
# A requeued job waits this long before it starts again (default 120 s); tests requeue.
AuthInfo=cred_expire=10
SlurmdTimeout=60
$node_line State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

# Fast path: the cluster is up with exactly the config this script would write.
if command -v sinfo >/dev/null && command -v slurmd >/dev/null && [[ "$(node_state)" == idle* ]] \
    && [[ "$(render_conf)" == "$(cat "$CONF_DIR/slurm.conf" 2>/dev/null)" ]]; then
  echo "slurm: already up ($(sinfo -h -N -o '%N %t %c CPUs'))"
  exit 0
fi

[[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and starts daemons)"

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
    || ! command -v sinfo >/dev/null || ! command -v munged >/dev/null; then
  echo "slurm: installing packages"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || die "apt-get update failed"
  apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null \
    || die "apt-get install slurmctld slurmd slurm-client munge failed"
fi

# Munge authenticates every Slurm RPC; one key shared by all daemons on this host.
if [[ ! -s /etc/munge/munge.key ]]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  echo "slurm: starting munged"
  runuser -u munge -- /usr/sbin/munged --force || die "munged did not start (see /var/log/munge)"
  for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.25; done
  munge -n | unmunge >/dev/null || die "munge round trip fails after starting munged"
fi

mkdir -p "$CONF_DIR" "$LOG_DIR" "$STATE_DIR" "$SPOOL_DIR"
conf=$(render_conf)
host=$(hostname -s)
if [[ ! -f $CONF_DIR/slurm.conf ]] || [[ "$(cat "$CONF_DIR/slurm.conf")" != "$conf" ]]; then
  echo "$conf" > "$CONF_DIR/slurm.conf"
  conf_changed=1
else
  conf_changed=0
fi

# Some settings (cred_expire among them) are read only at start, so a changed config means
# stopping both daemons rather than `scontrol reconfigure`.
if [[ $conf_changed -eq 1 ]] && scontrol ping 2>/dev/null | grep -q 'is UP'; then
  echo "slurm: config changed; restarting the daemons"
  scontrol shutdown || die "scontrol shutdown failed"
  for _ in $(seq 60); do
    pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || break
    sleep 0.5
  done
fi
if ! scontrol ping 2>/dev/null | grep -q 'is UP'; then
  echo "slurm: starting slurmctld"
  slurmctld || die "slurmctld did not start (see $LOG_DIR/slurmctld.log)"
fi
for _ in $(seq 40); do scontrol ping 2>/dev/null | grep -q 'is UP' && break; sleep 0.25; done
scontrol ping | grep -q 'is UP' || die "slurmctld is not answering (see $LOG_DIR/slurmctld.log)"

if ! pgrep -x slurmd >/dev/null; then
  echo "slurm: starting slurmd"
  slurmd || die "slurmd did not start (see $LOG_DIR/slurmd.log)"
fi

echo "slurm: waiting up to ${WAIT_S}s for the node to be idle"
for _ in $(seq "$WAIT_S"); do
  state=$(node_state)
  case $state in
    idle*) echo "slurm: up ($(sinfo -h -N -o '%N %t %c CPUs %m MB'))"; exit 0 ;;
    # A node left down or drained by an earlier run comes back on request.
    down*|drain*) scontrol update nodename="$host" state=resume 2>/dev/null || true ;;
  esac
  sleep 1
done
die "node never became idle (state '$(node_state)'); see $LOG_DIR/slurmd.log and slurmctld.log"
