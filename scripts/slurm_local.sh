#!/bin/bash
# A private single-node Slurm (Debian's slurmctld, slurmd, munge) for testing the sbatch wrappers.
#
#   scripts/slurm_local.sh install        apt-get the packages (root; skipped when installed)
#   scripts/slurm_local.sh start DIR      start munged + slurmctld + slurmd with all state in DIR;
#                                         prints `export SLURM_CONF=DIR/slurm.conf` for the clients
#   scripts/slurm_local.sh stop DIR       scontrol shutdown, then stop the munged started here
#
# Nothing outside DIR is written (no /etc/slurm, no system munge socket): the config is passed with
# SLURM_CONF and munged listens on DIR/munge.socket, so it runs beside any other Slurm or munge.
# Ports are picked free at start. Runs as root without systemd.
set -euo pipefail

packages=(slurmctld slurmd slurm-client munge)

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

install() {
  if dpkg -s "${packages[@]}" > /dev/null 2>&1; then
    return
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" > /dev/null
}

start() {
  local dir host cpus memory ctld_port slurmd_port
  dir=$(realpath -m "$1")
  mkdir -p "$dir"/{state,spool,log,munge}
  chown munge:munge "$dir/munge"
  host=$(hostname -s)
  # munged refuses keys readable by others; the package's postinst made /etc/munge/munge.key.
  runuser -u munge -- /usr/sbin/munged --socket="$dir/munge/munge.socket" --pid-file="$dir/munge/munged.pid" \
    --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed" --key-file=/etc/munge/munge.key
  cpus=$(nproc)
  memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
  ctld_port=$(free_port)
  slurmd_port=$(free_port)
  cat > "$dir/slurm.conf" <<EOF
ClusterName=eetune-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SchedulerType=sched/backfill
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
NodeName=$host CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  export SLURM_CONF="$dir/slurm.conf"
  /usr/sbin/slurmctld -i
  /usr/sbin/slurmd
  # Ready when the node reports idle.
  for _ in $(seq 1 60); do
    if sinfo -h -o %T 2> /dev/null | grep -q idle; then
      echo "export SLURM_CONF=$dir/slurm.conf"
      return
    fi
    sleep 0.5
  done
  echo "slurm_local: the node never became idle; see $dir/log" >&2
  return 1
}

stop() {
  local dir
  dir=$(realpath -m "$1")
  if [[ -f "$dir/slurm.conf" ]]; then
    SLURM_CONF="$dir/slurm.conf" scontrol shutdown > /dev/null 2>&1 || true
    for pidfile in "$dir/slurmctld.pid" "$dir/slurmd.pid"; do
      for _ in $(seq 1 40); do
        [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2> /dev/null || break
        sleep 0.25
      done
    done
  fi
  if [[ -f "$dir/munge/munged.pid" ]]; then
    kill "$(cat "$dir/munge/munged.pid")" 2> /dev/null || true
  fi
}

case "${1:-}" in
  install) install ;;
  start) start "$2" ;;
  stop) stop "$2" ;;
  *) echo "usage: $0 install | start DIR | stop DIR" >&2; exit 2 ;;
esac
