#!/usr/bin/env bash
# A real SLURM (slurmctld + one slurmd per emulated node + munged) on this one host, for tests and demos.
#
#   insitu/data/launch/slurm_local.sh start [NODES]    # default 3 nodes: node1..nodeN, all on 127.0.0.1
#   eval "$(insitu/data/launch/slurm_local.sh env)"    # exports SLURM_CONF for sbatch/srun/squeue
#   insitu/data/launch/slurm_local.sh stop             # stops exactly the daemons it started (by pid file)
#
# Needs: apt-get install -y slurm-wlm munge. No systemd, no cgroups. Overridable:
# INSITU_SLURM_BASE (state dir), INSITU_SLURM_PORT (slurmctld port; slurmd ports follow),
# INSITU_SLURM_CPUS (CPUs each node advertises, default 8), INSITU_SLURM_TASK_PLUGIN (default task/none;
# task/affinity binds tasks with sched_setaffinity; task/cgroup is not usable with several slurmd on one host).
set -euo pipefail

BASE=${INSITU_SLURM_BASE:-/tmp/insitu-slurm}
CTLD_PORT=${INSITU_SLURM_PORT:-7917}
CONF=$BASE/etc/slurm.conf
SOCK=$BASE/munge/munge.socket.2
cmd=${1:-start}
nodes=${2:-3}

start() {
    mkdir -p "$BASE"/{etc,munge,state,log,run}
    chmod 755 "$BASE/munge"
    if [[ ! -f $BASE/munge/munge.key ]]; then
        head -c 1024 /dev/urandom >"$BASE/munge/munge.key"
        chmod 400 "$BASE/munge/munge.key"
    fi
    if [[ ! -S $SOCK ]] || ! pid_alive "$BASE/run/munged.pid"; then
        munged --force --socket="$SOCK" --key-file="$BASE/munge/munge.key" --log-file="$BASE/log/munged.log" \
            --pid-file="$BASE/run/munged.pid" --seed-file="$BASE/munge/munged.seed"
    fi
    # emulated nodes advertise INSITU_SLURM_CPUS cores each (config_overrides: more than the host has)
    local cpus=${INSITU_SLURM_CPUS:-8}
    cat >"$CONF" <<CONF
ClusterName=insitu-local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCK
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/%n
TmpFS=$BASE/tmpfs/%n
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=${INSITU_SLURM_TASK_PLUGIN:-task/none}
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SchedulerType=sched/backfill
ReturnToService=2
KillWait=5
MessageTimeout=20
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
SlurmdParameters=config_overrides
CONF
    local i=0 n
    for i in $(seq 1 "$nodes"); do
        n=node$i
        echo "NodeName=$n NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((CTLD_PORT + i)) CPUs=$cpus RealMemory=4000 State=UNKNOWN" >>"$CONF"
        mkdir -p "$BASE/spool/$n" "$BASE/tmpfs/$n"
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE OverSubscribe=FORCE:4 State=UP" >>"$CONF"
    slurmctld -f "$CONF"
    for i in $(seq 1 "$nodes"); do
        slurmd -f "$CONF" -N "node$i"
    done
    local deadline=$((SECONDS + 30))
    until [[ "$(SLURM_CONF=$CONF sinfo -h -t idle -o %D 2>/dev/null)" == "$nodes" ]]; do
        if ((SECONDS > deadline)); then
            echo "slurm_local: $nodes nodes not idle within 30 s:" >&2
            SLURM_CONF=$CONF sinfo -N >&2 || true
            exit 1
        fi
        sleep 0.2
    done
    SLURM_CONF=$CONF sinfo -N
}

pid_alive() {
    [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

stop() {
    # cancel what still runs (a failed test may leave a hung step), then end the daemons: TERM, then KILL
    if pid_alive "$BASE/run/slurmctld.pid"; then
        SLURM_CONF=$CONF scancel --quiet --user="$(id -un)" 2>/dev/null || true
        local deadline=$((SECONDS + 20))
        while [[ -n "$(SLURM_CONF=$CONF squeue -h 2>/dev/null)" ]] && ((SECONDS < deadline)); do
            sleep 0.5
        done
    fi
    local f pids=()
    for f in "$BASE"/run/slurmd-*.pid "$BASE/run/slurmctld.pid" "$BASE/run/munged.pid"; do
        if pid_alive "$f"; then
            pids+=("$(cat "$f")")
        fi
    done
    ((${#pids[@]})) || return 0
    kill "${pids[@]}" 2>/dev/null || true
    local deadline=$((SECONDS + 10)) p alive
    while ((SECONDS < deadline)); do
        alive=0
        for p in "${pids[@]}"; do
            if kill -0 "$p" 2>/dev/null; then alive=1; fi
        done
        ((alive)) || return 0
        sleep 0.2
    done
    kill -KILL "${pids[@]}" 2>/dev/null || true
}

case "$cmd" in
env) echo "export SLURM_CONF=$CONF" ;;
start) start ;;
stop) stop ;;
*)
    echo "usage: $0 start [NODES] | env | stop" >&2
    exit 2
    ;;
esac
