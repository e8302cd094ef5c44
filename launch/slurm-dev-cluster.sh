#!/usr/bin/env bash
# A throw-away SLURM cluster on one Debian machine (root), to try `hpctrain submit` on a
# workstation and for the tests: slurmctld + one slurmd per "node", munge, two
# partitions: `debug` (default) and `high`, whose jobs preempt (requeue) `debug` jobs.
#
#   bash launch/slurm-dev-cluster.sh up [NODES]   # NODES: 1 (default) or more ("n1".."nN")
#   export SLURM_CONF=/tmp/hpctrain-slurm/slurm.conf PATH=/tmp/hpctrain-slurm/bin:$PATH
#   bash launch/slurm-dev-cluster.sh down
#
# Environment: HPCTRAIN_SLURM_DIR (default /tmp/hpctrain-slurm). Stops only what it
# started (pid files). Tested with Debian 12's slurm-wlm 22.05 and munge 0.5.
# Notes on what this configuration needs:
# - no cgroups: proctrack/linuxproc and task/none;
# - `preempt_send_user_signal`, so that a job's --signal is sent when it is preempted;
# - `cred_expire=10`, so that a requeued job starts again after 10 s, not 120 s;
# - without slurmdbd there is no `sacct`: a stand-in in $DIR/bin answers from squeue;
# - nodes n1..nN do not resolve: their NodeAddr is 127.0.0.1 (hpctrain asks scontrol).
set -euo pipefail
DIR=${HPCTRAIN_SLURM_DIR:-/tmp/hpctrain-slurm}
CONF=$DIR/slurm.conf

stop_pid() {
  [ -s "$1" ] || return 0
  local pid; pid=$(cat "$1")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  fi
  rm -f "$1"
}

down() {
  if [ -s "$DIR/run/slurmctld.pid" ]; then
    SLURM_CONF=$CONF scancel --full --user="$(id -un)" 2>/dev/null || true
  fi
  for pidfile in "$DIR"/run/slurmd-*.pid; do [ -e "$pidfile" ] && stop_pid "$pidfile"; done
  stop_pid "$DIR/run/slurmctld.pid"
  stop_pid "$DIR/run/munged.pid"
  echo "slurm dev cluster stopped"
}

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
     && command -v sbatch >/dev/null && command -v munged >/dev/null; then
    return
  fi
  echo "installing slurmctld slurmd slurm-client munge (apt-get)..."
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
}

write_config() {
  local nodes=$1 host cpus mem
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/{print int($2/1024)}' /proc/meminfo) * 9 / 10 / nodes ))
  local nodelist node_lines=""
  if [ "$nodes" = 1 ]; then
    nodelist=$host
    node_lines="NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN"
  else
    nodelist="n[1-$nodes]"
    for i in $(seq 1 "$nodes"); do
      node_lines+="NodeName=n$i NodeHostname=$host NodeAddr=127.0.0.1 Port=$((17000 + i)) "
      node_lines+="CPUs=$cpus RealMemory=$mem State=UNKNOWN"$'\n'
    done
  fi
  cat > "$CONF" <<CONF
ClusterName=hpctrain-dev
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=5
MinJobAge=3600
InactiveLimit=0
Waittime=0
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
$node_lines
PartitionName=debug Nodes=$nodelist Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO PriorityTier=1 PreemptMode=REQUEUE GraceTime=30
PartitionName=high Nodes=$nodelist MaxTime=INFINITE State=UP OverSubscribe=NO PriorityTier=10 PreemptMode=OFF
CONF
  cat > "$DIR/bin/sacct" <<'SACCT'
#!/bin/sh
# sacct stand-in (no slurmdbd): job states from squeue, so that waiting tools see the end
ids=""
while [ $# -gt 0 ]; do
  case "$1" in
    -j|--jobs) ids="$ids,$2"; shift 2 ;;
    -j*) ids="$ids,${1#-j}"; shift ;;
    --jobs=*) ids="$ids,${1#--jobs=}"; shift ;;
    *) shift ;;
  esac
done
echo "JobID|State|NodeList"
[ -n "$ids" ] && squeue -h -t all -j "${ids#,}" -o '%i|%T|%N' 2>/dev/null
exit 0
SACCT
  chmod +x "$DIR/bin/sacct"
  echo "$nodelist"
}

up() {
  local nodes=${1:-1}
  install_packages
  [ -s "$DIR/run/slurmctld.pid" ] && down >/dev/null
  mkdir -p "$DIR"/{state,spool,run,log,bin}
  local nodelist; nodelist=$(write_config "$nodes" | tail -n 1)
  export SLURM_CONF=$CONF
  if [ "$nodes" = 1 ]; then mkdir -p "$DIR/spool/$(hostname -s)"; else
    for i in $(seq 1 "$nodes"); do mkdir -p "$DIR/spool/n$i"; done; fi
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key && chmod 600 /etc/munge/munge.key
  fi
  mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
  if ! munge -n >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged
    cp /run/munge/munged.pid "$DIR/run/munged.pid"
  fi
  for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
  /usr/sbin/slurmctld -c -f "$CONF"
  if [ "$nodes" = 1 ]; then /usr/sbin/slurmd -f "$CONF"; else
    for i in $(seq 1 "$nodes"); do /usr/sbin/slurmd -f "$CONF" -N "n$i"; done; fi
  for _ in $(seq 150); do
    [ "$(sinfo -h -N -o '%T' 2>/dev/null | sort -u)" = idle ] && break
    sleep 0.2
  done
  if [ "$(sinfo -h -N -o '%T' 2>/dev/null | sort -u)" != idle ]; then
    sinfo -N || true; tail -n 20 "$DIR"/log/*.log; exit 1
  fi
  echo "slurm dev cluster up: nodes $nodelist, partitions debug and high"
  echo "export SLURM_CONF=$CONF PATH=$DIR/bin:\$PATH"
}

case "${1:-}" in
  up) up "${2:-1}" ;;
  down) down ;;
  *) echo "usage: $0 up [NODES] | down" >&2; exit 2 ;;
esac
