#!/usr/bin/env bash
# A real single-node SLURM cluster on loopback, for tests/test_slurm.py (or by hand).
#
#   tests/slurm/cluster.sh start     install slurm-wlm + munge if missing (Debian, needs root),
#                                    write /etc/slurm/{slurm,gres}.conf, start munged, slurmctld, slurmd
#   tests/slurm/cluster.sh stop      stop the three daemons by the PIDs recorded at start
#   tests/slurm/cluster.sh status    sinfo
#
# One node `localhost` with CPUs=2 and Gres=gpu:1 backed by /dev/null (so --gpus=1 jobs schedule;
# with Count= and no File= the node goes invalid), partitions `cpu` (default) and `gpu`.
# No slurmdbd: the Snakemake profile must use `slurm-status-command: squeue`, which needs
# MinJobAge >= 120 here. slurm.conf lives at /etc/slurm because the jobstep plugin strips
# SLURM_CONF (all SLURM_* variables) before its nested srun.
# State, logs and PID files live under $TUNESMITH_SLURM_STATE (default /tmp/tunesmith-slurm).
set -euo pipefail

STATE=${TUNESMITH_SLURM_STATE:-/tmp/tunesmith-slurm}
CONF_DIR=/etc/slurm
MARK="# written by tunesmith tests/slurm/cluster.sh"

die() { echo "cluster.sh: $*" >&2; exit 1; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    return
  fi
  [ "$(id -u)" = 0 ] || die "slurm-wlm/munge are missing and installing them needs root"
  command -v apt-get >/dev/null || die "slurm-wlm/munge are missing and apt-get is not available"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_config() {
  mkdir -p "$CONF_DIR" "$STATE/spool/ctld" "$STATE/spool/d" "$STATE/log" "$STATE/run"
  if [ -f "$CONF_DIR/slurm.conf" ] && ! grep -q "$MARK" "$CONF_DIR/slurm.conf"; then
    [ -f "$CONF_DIR/slurm.conf.tunesmith-backup" ] || cp "$CONF_DIR/slurm.conf" "$CONF_DIR/slurm.conf.tunesmith-backup"
  fi
  cat > "$CONF_DIR/slurm.conf" <<EOF
$MARK
ClusterName=tunesmith
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# squeue must still see finished jobs when the Snakemake plugin asks (it polls every 40 s+,
# needs >= 120); the test also reads each finished job back with scontrol within the hour.
MinJobAge=3600
KillWait=5
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 RealMemory=16000 Gres=gpu:1 State=UNKNOWN
PartitionName=cpu Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=localhost Default=NO MaxTime=INFINITE State=UP
EOF
  cat > "$CONF_DIR/gres.conf" <<EOF
$MARK
NodeName=localhost Name=gpu File=/dev/null
EOF
  # An empty cgroup.conf keeps slurmd from probing cgroups it does not use.
  [ -f "$CONF_DIR/cgroup.conf" ] || echo "$MARK" > "$CONF_DIR/cgroup.conf"
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
  if alive "$STATE/run/munged.pid"; then return; fi
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null; then mungekey --create --force >/dev/null 2>&1 || true; fi
    [ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
  chown root:root /etc/munge/munge.key 2>/dev/null || true
  chmod 400 /etc/munge/munge.key
  mkdir -p "$STATE/munge"
  chmod 700 "$STATE/munge"
  munged --force --key-file=/etc/munge/munge.key --socket="$STATE/munge/munge.socket.2" \
    --pid-file="$STATE/run/munged.pid" --log-file="$STATE/log/munged.log" --seed-file="$STATE/munge/munge.seed"
  # slurm looks for the socket at its compiled-in default path.
  mkdir -p /run/munge
  ln -sf "$STATE/munge/munge.socket.2" /run/munge/munge.socket.2
}

wait_idle() {
  for _ in $(seq 1 60); do
    state=$(sinfo -h -N -o '%t' 2>/dev/null | head -1 || true)
    case "$state" in idle*|mix*|alloc*) return 0 ;; esac
    sleep 1
  done
  echo "node state after 60 s: '${state:-none}'" >&2
  tail -n 20 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
  return 1
}

start() {
  install_packages
  write_config
  start_munge
  if ! alive "$STATE/run/slurmctld.pid"; then
    slurmctld -i 2>>"$STATE/log/slurmctld.stderr" || die "slurmctld failed to start (see $STATE/log)"
  fi
  if ! alive "$STATE/run/slurmd.pid"; then
    slurmd -N localhost 2>>"$STATE/log/slurmd.stderr" || die "slurmd failed to start (see $STATE/log)"
  fi
  wait_idle || die "node localhost did not become idle"
  # A node left DOWN/DRAIN by an earlier run comes back here.
  scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true
  echo "SLURM up: partitions $(sinfo -h -o '%P' | tr '\n' ' ')(state in $STATE)"
}

stop_pid() {
  local name=$1 file=$2
  if alive "$file"; then
    local pid
    pid=$(cat "$file")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    echo "stopped $name ($pid)"
  fi
  rm -f "$file"
}

stop() {
  # Jobs still queued or running would keep slurmd busy: cancel ours first.
  if alive "$STATE/run/slurmctld.pid"; then scancel --user=root >/dev/null 2>&1 || true; fi
  stop_pid slurmd "$STATE/run/slurmd.pid"
  stop_pid slurmctld "$STATE/run/slurmctld.pid"
  stop_pid munged "$STATE/run/munged.pid"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) sinfo ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
