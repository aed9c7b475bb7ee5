#!/usr/bin/env bash
# Open the SSH tunnel that lets a node outside the cluster network (a cloud burst, a remote GPU box)
# join the Ray cluster as a "remote" node. Run it ON THE REMOTE NODE; it stays in the foreground.
#
#   INSITU_TUNNEL_KNOWN_HOSTS=~/.ssh/known_hosts_cluster launch/tunnel.sh user@head.example.org
#
# The head's host key must already be in INSITU_TUNNEL_KNOWN_HOSTS (verified out of band, e.g.
# `ssh-keyscan head | ssh-keygen -lf -` compared with the fingerprint your admins publish):
# the script refuses to run otherwise and never disables host key checking.
#
# Ports (all fixed; the same numbers on both ends, on 127.0.0.1):
#   forwarded remote -> head (-L): the head's GCS, node manager, object manager and worker ports
#   forwarded head -> remote (-R): this node's node manager, object manager, runtime-env agent,
#                                  dashboard agent and worker ports
# Then start the raylet here with those fixed ports and the remote marker, e.g.:
#   ray start --address=127.0.0.1:$HEAD_GCS --node-ip-address=127.0.0.1 \
#       --node-manager-port=$NODE_NM --object-manager-port=$NODE_OM \
#       --runtime-env-agent-port=$NODE_ENV --dashboard-agent-grpc-port=$NODE_AGENT \
#       --min-worker-port=$NODE_WMIN --max-worker-port=$NODE_WMAX --resources='{"insitu_remote": 1}'
# and dispatch work that may cross between this node and the LAN with insitu.dispatch.Dispatcher,
# which relays it through the head.
set -euo pipefail

target=${1:?usage: tunnel.sh user@head-host}
known=${INSITU_TUNNEL_KNOWN_HOSTS:?set INSITU_TUNNEL_KNOWN_HOSTS to a known_hosts file holding the head key}
host=${target#*@}
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

if ! ssh-keygen -F "$host" -f "$known" >/dev/null; then
    echo "tunnel.sh: no verified host key for $host in $known; add it after checking its fingerprint" >&2
    exit 1
fi

args=(-N -o StrictHostKeyChecking=yes -o UserKnownHostsFile="$known" -o ExitOnForwardFailure=yes
    -o ServerAliveInterval=15 -o ServerAliveCountMax=4)
for p in "$HEAD_GCS" "$HEAD_NM" "$HEAD_OM" $(seq "$HEAD_WMIN" "$HEAD_WMAX"); do
    args+=(-L "127.0.0.1:$p:127.0.0.1:$p")
done
for p in "$NODE_NM" "$NODE_OM" "$NODE_ENV" "$NODE_AGENT" $(seq "$NODE_WMIN" "$NODE_WMAX"); do
    args+=(-R "127.0.0.1:$p:127.0.0.1:$p")
done
echo "tunnel.sh: forwarding ${#args[@]} arguments' worth of ports to $target (Ctrl-C to close)"
exec ssh "${args[@]}" "$target"
