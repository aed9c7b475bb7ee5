#!/usr/bin/env bash
# Per-node helpers of insitu.sbatch, run inside srun steps (one task per node unless said otherwise).
#
#   insitu_node.sh ip              print this node's Ray IP
#   insitu_node.sh check BASE      exit 1 (naming them) if a port of this node's block is taken;
#                                  exit 3 (with the numbers) if the object store and the staging
#                                  files do not fit in this node's /dev/shm and the job's memory
#   insitu_node.sh ray             run this node's raylet in the foreground (head on the first node);
#                                  when it ends (scancel, teardown), remove this node's Ray directory
#   insitu_node.sh rank CMD...     run one simulation rank with INSITU_NODE set to this node's raylet
#   insitu_node.sh clean           remove this node's Ray temp dir (sessions, spilled objects) and the
#                                  run's staging files left by killed ranks
#
# Nothing is read from a file another node wrote: the token comes in the environment srun
# passes on, a failed start is reported on the step's output (INSITU-RAY-START-FAILED), and the
# temp dirs live on node-local disks. CPU binding follows INSITU_BINDING, the plan the batch
# script made from the job's CPU IDs (python -m insitu.binding).
#
# This node's IP: $INSITU_NODE_IP if set (one address, or name=ip,name=ip per node); else the
# address of $INSITU_IFACE; else, when INSITU_EMULATED_NODES=1 (several emulated nodes on one
# host), 127.0.0.(20 + node index); else the source address of the route to another node of
# the job, never loopback, link-local or a container bridge (insitu.site.address_for_job).
# Commands: $INSITU_PYTHON and $INSITU_RAY (insitu launch sets both to its own environment's), else
# python3 and ray on PATH.
set -euo pipefail

node_index() {
    local i=0 n
    while read -r n; do
        if [[ $n == "${SLURMD_NODENAME:?not inside a SLURM step}" ]]; then
            echo "$i"
            return
        fi
        i=$((i + 1))
    done < <(scontrol show hostnames "${SLURM_JOB_NODELIST:?}")
    echo "insitu_node: $SLURMD_NODENAME is not in $SLURM_JOB_NODELIST" >&2
    return 1
}

node_ip() {
    if [[ ${INSITU_EMULATED_NODES:-0} == 1 && -z ${INSITU_NODE_IP:-} && -z ${INSITU_IFACE:-} ]]; then
        echo "127.0.0.$((20 + $(node_index)))"
    else  # INSITU_NODE_IP (one address or name=ip,...), INSITU_IFACE, else the source of the route to a peer node
        "${INSITU_PYTHON:-python3}" -c "from insitu.site import address_for_job; print(address_for_job())"
    fi
}

# first port of this node's block: real nodes share one block (distinct IPs); emulated ones get one each
node_base() {
    local base=$1
    if [[ ${INSITU_EMULATED_NODES:-0} == 1 ]]; then
        echo $((base + ${INSITU_RAY_STRIDE:?} * $(node_index)))
    else
        echo "$base"
    fi
}

# the ports of the node's block (INSITU_RAY_STRIDE ports) starting at $2 that cannot be bound on $1
busy_ports() {
    "${INSITU_PYTHON:-python3}" -c "
import sys
from insitu.slurm import busy_ports
print(' '.join(map(str, busy_ports(sys.argv[1], range(int(sys.argv[2]), int(sys.argv[2]) + int(sys.argv[3]))))))
" "$1" "$2" "${INSITU_RAY_STRIDE:?}"
}

# this node's kernel CPU list for ray or for local rank $2 (empty when binding is off)
bound_cpus() {
    if [[ ${INSITU_BIND_CPUS:-0} == 1 && -n ${INSITU_BINDING:-} ]]; then
        "${INSITU_PYTHON:-python3}" -m insitu.binding cpus "$@"
    fi
}

# run `ray start ... --block` (the arguments); when it fails before the node is up (a loaded node:
# Ray's agents or its registration time out at start-up), wait for the node's ports to be free
# again and retry, INSITU_RAY_START_TRIES times in all. A raylet that dies after it was up is
# not restarted. When every try failed, say so on stdout (INSITU-RAY-START-FAILED <node>: ...) so
# the batch script stops waiting for this node at once.
start_ray() {
    local tries=${INSITU_RAY_START_TRIES:-3} t code out ip=$1 b=$2 deadline
    shift 2
    out=${INSITU_RAY_TMP:?}/start-$SLURMD_NODENAME.out  # removed with the job's Ray directory
    mkdir -p "$INSITU_RAY_TMP"
    for ((t = 1; ; t++)); do
        set +e  # tee ignores SIGTERM: ray start keeps its output while it shuts down on a cancel
        "$@" 2>&1 | (trap '' TERM && exec tee "$out")
        code=${PIPESTATUS[0]}
        set -e
        if grep -q "Ray runtime started" "$out"; then
            rm -f "$out"
            return "$code"
        fi
        if ((t >= tries)); then
            rm -f "$out"
            echo "$SLURMD_NODENAME: ray start failed $t times (last exit $code); giving up" >&2
            # on the step's output, which srun brings to the batch host (insitu.slurm.wait_for_nodes)
            echo "INSITU-RAY-START-FAILED $SLURMD_NODENAME: $t tries, last exit $code"
            return 1
        fi
        echo "$SLURMD_NODENAME: ray start failed before the node was up (exit $code), try $t of $tries;" \
            "retrying once its ports are free" >&2
        deadline=$((SECONDS + 60))
        while [[ -n $(busy_ports "$ip" "$b") ]] && ((SECONDS < deadline)); do
            sleep 1
        done
    done
}

# staging files of run $1's killed ranks (the node process unlinks the names of live ones); no run, nothing
clean_staging() {
    if [[ -n $1 ]]; then
        rm -f "${INSITU_SHM_DIR:-/dev/shm}/insitu-$1-r"[0-9]*-* 2>/dev/null || true
    fi
}

# this node's part of the job's Ray directory (the directory itself once no node has a part left:
# emulated nodes share one) and the run's stale staging files
# shellcheck disable=SC2317  # called by trap
clean_ray_dir() {
    rm -rf "${INSITU_RAY_TMP:?}/${SLURMD_NODENAME:?}" "$INSITU_RAY_TMP/start-$SLURMD_NODENAME.out"
    rmdir "$INSITU_RAY_TMP" 2>/dev/null || true
    clean_staging "${INSITU_RUN:-}"
}

cmd=${1:?usage: insitu_node.sh ip|check BASE|ray|rank CMD...|clean}
shift
case "$cmd" in
ip) node_ip ;;
check)
    ip=$(node_ip)
    busy=$(busy_ports "$ip" "$(node_base "${1:?base port}")")
    if [[ -n $busy ]]; then
        echo "$SLURMD_NODENAME ($ip): ports in use: $busy"
        exit 1
    fi
    # the object store and the ranks' staging files (slots x this node's bytes per step)
    if ! why=$("${INSITU_PYTHON:-python3}" -c "
import sys
from insitu.errors import ConfigError
from insitu.slurm import check_this_node
try:
    check_this_node(int(sys.argv[1]), int(sys.argv[2]) * int(sys.argv[3]))
except ConfigError as exc:
    print(exc)
    sys.exit(3)" "${INSITU_STORE_BYTES:?}" "${INSITU_SLOTS:-2}" "${INSITU_STEP_BYTES:?}"); then
        echo "$why"
        exit 3
    fi
    ;;
clean)
    # this node's Ray directory (sessions, logs, spilled objects) and staging files of killed ranks
    rm -rf "${INSITU_RAY_TMP:?}"
    clean_staging "${INSITU_RUN:?}"
    ;;
ray)
    # scancel (or the batch script's teardown) signals every process of this step: `ray start --block`
    # stops this node's Ray, then this node's Ray directory and the run's staging names go, here,
    # before SLURM's KillWait ends (a cancelled job can start no `clean` step)
    trap 'exit 143' TERM INT
    trap clean_ray_dir EXIT
    # Ray would drain a SIGTERMed node for up to 30 s, beyond many sites' KillWait: nothing is left to drain
    export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}
    ip=$(node_ip)
    b=$(node_base "${INSITU_RAY_BASE:?}")
    name=$SLURMD_NODENAME
    # INSITU_SLICE_HOSTS=K groups the job's nodes K by K into slices for insitu.SlicePool
    # (node i carries insitu_slice_<i / K>); 0 = no slices
    resources="\"slurm_node_$name\": 1"
    if ((${INSITU_SLICE_HOSTS:-0} > 0)); then
        resources+=", \"insitu_slice_$(($(node_index) / INSITU_SLICE_HOSTS))\": 1"
    fi
    args=(--node-ip-address="$ip" --node-manager-port=$((b + 1)) --object-manager-port=$((b + 2))
        --dashboard-agent-listen-port=$((b + 5)) --dashboard-agent-grpc-port=$((b + 6))
        --runtime-env-agent-port=$((b + 7)) --metrics-export-port=$((b + 8))
        --min-worker-port=$((b + 10)) --max-worker-port=$((b + INSITU_RAY_STRIDE - 1))
        --num-cpus="${INSITU_RAY_CPUS:-1}" --resources="{$resources}"
        --object-store-memory="${INSITU_STORE_BYTES:?}" --disable-usage-stats --block
        --temp-dir="${INSITU_RAY_TMP:?}/$name" --object-spilling-directory="$INSITU_RAY_TMP/$name/spill")
    launcher=()
    cpus=$(bound_cpus ray)
    if [[ -n $cpus ]]; then  # Ray (and its workers) on the CPUs the plan keeps for it
        launcher=(taskset -c "$cpus")
    fi
    if [[ $(node_index) == 0 ]]; then
        start_ray "$ip" "$b" "${launcher[@]}" "${INSITU_RAY:-ray}" start --head --port="$b" --ray-client-server-port=$((b + 3)) \
            --include-dashboard=false "${args[@]}"
        exit
    fi
    head=${INSITU_ADDRESS:?}
    deadline=$((SECONDS + 120))
    until (exec 3<>"/dev/tcp/${head%:*}/${head##*:}") 2>/dev/null; do
        if ((SECONDS > deadline)); then
            echo "$name: the Ray head $head did not come up within 120 s" >&2
            exit 1
        fi
        sleep 0.25
    done
    start_ray "$ip" "$b" "${launcher[@]}" "${INSITU_RAY:-ray}" start --address="$head" "${args[@]}"
    ;;
rank)
    INSITU_NODE=$(node_ip)
    export INSITU_NODE
    # each local rank on its own CPUs of the plan (all of them with --cpus-per-task), OpenMP sized to them
    cpus=$(bound_cpus rank "${SLURM_LOCALID:-0}")
    if [[ -n $cpus ]]; then
        n=$("${INSITU_PYTHON:-python3}" -c "import sys; from insitu.binding import parse_cpu_list as p; print(len(p(sys.argv[1])))" "$cpus")
        export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$n}
        exec taskset -c "$cpus" "$@"
    fi
    exec "$@"
    ;;
*)
    echo "insitu_node: unknown command $cmd" >&2
    exit 2
    ;;
esac
