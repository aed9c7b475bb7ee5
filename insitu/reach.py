"""Who can reach whom: the rule that decides whether work is submitted directly or through the relay.

Pure (no Ray at import or in the rule): roles come from the live node table, ``head`` (Ray's
head resource), ``remote`` (the custom resource :data:`REMOTE_RESOURCE` of tunneled nodes) or
``lan``; :func:`decide` answers DIRECT only when every node the work could land on is provably
reachable from the caller. :mod:`insitu.dispatch` acts on the answer.

Examples
--------
>>> reachable(NodeRole.LAN, NodeRole.HEAD), reachable(NodeRole.REMOTE, NodeRole.LAN)
(True, False)
>>> snap = Snapshot((NodeView("a", NodeRole.HEAD, frozenset()), NodeView("b", NodeRole.REMOTE, frozenset({"gpu"}))),
...                 taken_at=0.0)
>>> decide("b", Placement(resources=frozenset({"gpu"})), snap, now=1.0).name
'DIRECT'
>>> decide("b", Placement(), snap, now=1.0).name
'RELAY'
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from insitu.errors import ConfigError

__all__ = [
    "listens",
    "HEAD_RESOURCE",
    "REMOTE_RESOURCE",
    "NodeRole",
    "NodeView",
    "Placement",
    "Route",
    "Snapshot",
    "decide",
    "node_role_from_env",
    "reachable",
    "snapshot_from_ray",
]

HEAD_RESOURCE = "node:__internal_head__"
REMOTE_RESOURCE = "insitu_remote"


class NodeRole(Enum):
    """Who can reach whom."""

    HEAD = "head"
    LAN = "lan"
    REMOTE = "remote"


class Route(Enum):
    """How a dispatch is submitted."""

    DIRECT = "direct"
    RELAY = "relay"


def listens(address: str, timeout: float = 2.0) -> bool:
    """Whether something accepts TCP connections at ``host:port`` (a GCS, a raylet's node manager).

    Examples
    --------
    >>> listens("127.0.0.1:1", timeout=0.5)
    False
    """
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError):
        return False
    return True


def reachable(src: NodeRole, dst: NodeRole, same_node: bool = False) -> bool:
    """Whether a process on a ``src`` node can talk to a ``dst`` node directly.

    The head reaches every node and every node reaches the head; LAN nodes reach each
    other; a remote node reaches only itself and the head.
    """
    if same_node or src == NodeRole.HEAD or dst == NodeRole.HEAD:
        return True
    return src == NodeRole.LAN and dst == NodeRole.LAN


def node_role_from_env(environ: Mapping[str, str] | None = None) -> NodeRole | None:
    """Fallback marker: ``INSITU_NODE_ROLE`` (``head``, ``lan`` or ``remote``) in a process's environment."""
    value = (os.environ if environ is None else environ).get("INSITU_NODE_ROLE", "").strip().lower()
    if not value:
        return None
    try:
        return NodeRole(value)
    except ValueError:
        raise ConfigError(f"INSITU_NODE_ROLE must be head, lan or remote; got {value!r}") from None


@dataclass(frozen=True)
class NodeView:
    """One alive node of the snapshot."""

    node_id: str
    role: NodeRole
    resources: frozenset[str]


@dataclass(frozen=True)
class Snapshot:
    """The live node table at ``taken_at`` (monotonic seconds)."""

    nodes: tuple[NodeView, ...]
    taken_at: float
    autoscaler: bool = False

    def node(self, node_id: str) -> NodeView | None:
        """The node with this id, or None if it is not (or no longer) in the table."""
        return next((n for n in self.nodes if n.node_id == node_id), None)


@dataclass(frozen=True)
class Placement:
    """Where work may land, as far as dispatch needs to know.

    ``node_id`` with ``soft=False``: hard node affinity. ``resources``: custom resources
    the work asks for. ``strategy``: ``"SPREAD"``, a placement group, or any other
    strategy makes the landing node unknown.
    """

    node_id: str | None = None
    soft: bool = False
    resources: frozenset[str] = frozenset()
    strategy: str | None = None


_STANDARD = {"CPU", "GPU", "memory", "object_store_memory"}


def decide(caller: str, placement: Placement, snap: Snapshot, now: float, ttl: float = 5.0) -> Route:
    """DIRECT only when every node the work could land on is provably reachable from ``caller``.

    Fail-safe: an unknown caller, a node missing from the snapshot, a stale snapshot, an
    autoscaler that could add nodes, soft affinity, SPREAD or a placement group, and no
    constraint at all, all give RELAY. A caller on the head never relays.
    """
    me = snap.node(caller)
    if me is None:
        return Route.RELAY
    if me.role == NodeRole.HEAD:
        return Route.DIRECT
    if placement.node_id is not None and not placement.soft:
        target = snap.node(placement.node_id)
        if target is None:
            return Route.RELAY
        return Route.DIRECT if reachable(me.role, target.role, target.node_id == me.node_id) else Route.RELAY
    if placement.node_id is not None or placement.strategy is not None:
        return Route.RELAY
    custom = placement.resources - _STANDARD
    if not custom or snap.autoscaler or now - snap.taken_at > ttl:
        return Route.RELAY
    landing = [n for n in snap.nodes if custom <= n.resources]
    if not landing:
        return Route.RELAY
    ok = all(reachable(me.role, n.role, n.node_id == me.node_id) for n in landing)
    return Route.DIRECT if ok else Route.RELAY


def snapshot_from_ray(nodes: Iterable[Mapping[str, Any]], now: float, autoscaler: bool = False) -> Snapshot:
    """A snapshot from ``ray.nodes()``: alive nodes only, roles from their resources."""
    views = []
    for n in nodes:
        if not n.get("Alive"):
            continue
        res = frozenset(n.get("Resources", {}))
        role = NodeRole.HEAD if HEAD_RESOURCE in res else NodeRole.REMOTE if REMOTE_RESOURCE in res else NodeRole.LAN
        views.append(NodeView(n["NodeID"], role, res))
    return Snapshot(tuple(views), now, autoscaler)
