#!/usr/bin/env bash
# Open the SSH tunnel that lets a node outside the cluster network (a cloud burst, a remote GPU box)
# join the Ray cluster as a "remote" node. Run it ON THE REMOTE NODE; it stays in the foreground.
#
#   INSITU_TUNNEL_KNOWN_HOSTS=~/.ssh/known_hosts_cluster HEAD_IP=10.0.0.1 REMOTE_IP=10.250.0.7 \
#       "$(insitu config --data)/launch/tunnel.sh" user@head.example.org
#
# Host keys: the head's key must already be in INSITU_TUNNEL_KNOWN_HOSTS (verified out of band, e.g.
# `ssh-keyscan head | ssh-keygen -lf -` compared with the fingerprint your admins publish). The script
# refuses to run otherwise and runs ssh with StrictHostKeyChecking=yes; it never disables the check.
#
# Addresses. Ray nodes reach each other at the IP each one advertises, so both ends of every
# forwarded port use those IPs, not 127.0.0.1:
#   HEAD_IP    the head's Ray address (its --node-ip-address). On this node it must be a local
#              alias, so that connections to it enter the tunnel:  ip addr add $HEAD_IP/32 dev lo
#   REMOTE_IP  the address this node advertises (a private address, unique in the cluster). It must
#              be a local alias here and on the head (ip addr add $REMOTE_IP/32 dev lo on both), and
#              the head's sshd must allow the -R binds on it: GatewayPorts clientspecified.
#
# Ports (fixed, the same on both ends; override any of them):
#   -L (this node -> head): the head's GCS, node manager, object manager and worker ports, so this
#      node's raylet and workers reach the head and the relay actor pinned there
#   -R (head -> this node): this node's node manager, object manager, runtime-env agent, dashboard
#      agent and worker ports, so the head reaches this raylet and its workers
# The head must be started with the same fixed ports (ray start --head --port=$HEAD_GCS
# --node-manager-port=$HEAD_NM --object-manager-port=$HEAD_OM --min-worker-port=$HEAD_WMIN
# --max-worker-port=$HEAD_WMAX). Then join this node with the remote marker:
#   ray start --address=$HEAD_IP:$HEAD_GCS --node-ip-address=$REMOTE_IP \
#       --node-manager-port=$NODE_NM --object-manager-port=$NODE_OM \
#       --runtime-env-agent-port=$NODE_ENV --dashboard-agent-grpc-port=$NODE_AGENT \
#       --min-worker-port=$NODE_WMIN --max-worker-port=$NODE_WMAX --resources='{"insitu_remote": 1}'
# LAN nodes cannot reach this node nor it them: dispatch work that may cross with
# insitu.dispatch.Dispatcher, which relays it through the head (docs/dispatch.md).
#
# INSITU_TUNNEL_PORT (default 22) and INSITU_TUNNEL_IDENTITY (a private key file) are passed to ssh;
# INSITU_TUNNEL_DRY_RUN=1 prints the ssh command line instead of running it.
set -euo pipefail

target=${1:?usage: tunnel.sh user@head-host}
known=${INSITU_TUNNEL_KNOWN_HOSTS:?set INSITU_TUNNEL_KNOWN_HOSTS to a known_hosts file holding the head key}
HEAD_IP=${HEAD_IP:?set HEAD_IP to the head node Ray address (its --node-ip-address)}
REMOTE_IP=${REMOTE_IP:?set REMOTE_IP to the address this node advertises to Ray}
host=${target#*@}
port=${INSITU_TUNNEL_PORT:-22}
lookup=$host
if [[ $port != 22 ]]; then
    lookup="[$host]:$port"  # how known_hosts names a host on another port
fi
HEAD_GCS=${HEAD_GCS:-6379}
HEAD_NM=${HEAD_NM:-6380}
HEAD_OM=${HEAD_OM:-6381}
HEAD_WMIN=${HEAD_WMIN:-20100}
HEAD_WMAX=${HEAD_WMAX:-20139}
NODE_NM=${NODE_NM:-6390}
NODE_OM=${NODE_OM:-6391}
NODE_ENV=${NODE_ENV:-6392}
NODE_AGENT=${NODE_AGENT:-6393}
NODE_WMIN=${NODE_WMIN:-20200}
NODE_WMAX=${NODE_WMAX:-20239}

if ! ssh-keygen -F "$lookup" -f "$known" >/dev/null; then
    echo "tunnel.sh: no verified host key for $lookup in $known; add it after checking its fingerprint" >&2
    exit 1
fi
if [[ ${INSITU_TUNNEL_DRY_RUN:-0} != 1 ]]; then
    addrs=$(ip -o addr show)  # (grep -q in a pipe would break pipefail with SIGPIPE)
    for ip in "$HEAD_IP" "$REMOTE_IP"; do
        if [[ $addrs != *"inet $ip/"* ]]; then
            echo "tunnel.sh: $ip is not a local address here; first run: ip addr add $ip/32 dev lo" >&2
            exit 1
        fi
    done
fi

args=(-N -p "$port" -o StrictHostKeyChecking=yes -o UserKnownHostsFile="$known" -o BatchMode=yes
    -o ExitOnForwardFailure=yes -o ServerAliveInterval=15 -o ServerAliveCountMax=4)
if [[ -n ${INSITU_TUNNEL_IDENTITY:-} ]]; then
    args+=(-i "$INSITU_TUNNEL_IDENTITY" -o IdentitiesOnly=yes)
fi
for p in "$HEAD_GCS" "$HEAD_NM" "$HEAD_OM" $(seq "$HEAD_WMIN" "$HEAD_WMAX"); do
    args+=(-L "$HEAD_IP:$p:$HEAD_IP:$p")
done
for p in "$NODE_NM" "$NODE_OM" "$NODE_ENV" "$NODE_AGENT" $(seq "$NODE_WMIN" "$NODE_WMAX"); do
    args+=(-R "$REMOTE_IP:$p:$REMOTE_IP:$p")
done
if [[ ${INSITU_TUNNEL_DRY_RUN:-0} == 1 ]]; then
    printf '%q ' ssh "${args[@]}" "$target"
    echo
    exit 0
fi
echo "tunnel.sh: forwarding ports between $REMOTE_IP (here) and $HEAD_IP via $target:$port (Ctrl-C to close)"
exec ssh "${args[@]}" "$target"
