"""Step relays: the head's fan-in and fan-out when a run spans many nodes.

With ``K`` nodes the head would receive ``K`` step messages and send ``K`` status pushes
per step, each a Ray call costing it ~0.3-0.5 ms of CPU (``benchmarks/scale_model.py``).
Above ``Config.fanin`` nodes, the head groups the sorted nodes ``fanin`` at a time; each
group gets a :class:`StepRelay`, pinned to the group's first node. Node actors send their
step messages and their close to the relay; the relay hands the head *one*
:class:`~insitu.messages.GroupStep` per step once every node of the group delivered it,
and forwards each status push to its nodes. The head then handles ``K / fanin`` calls in
and out per step. Relays are owned by the head (they die with it). A group message holds
one *group object* per array, put by the relay, with the ``(node, ref)`` pairs of its
nodes: passing a ref costs the head ~10-100 us (borrower bookkeeping), so the head passes
``K / fanin`` refs per step, not ``K``; the consumer resolves the group objects.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ray

from insitu.actors.ordering import InOrder
from insitu.messages import GroupStep, NodeStep, Status

__all__ = ["StepRelay"]

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0, max_restarts=0)
class StepRelay:
    """Aggregates one group of node actors (see the module docstring)."""

    def __init__(self, run: str, name: str, head: Any, nodes: tuple[str, ...]) -> None:
        self._run = run
        self._name = name
        self._head = head
        self._nodes = frozenset(nodes)
        self._members: dict[str, Any] = {}
        self._order: InOrder[NodeStep] = InOrder()
        self._pending: dict[int, dict[str, NodeStep]] = {}
        self._sent = 0
        self._closed: dict[str, tuple[int, int]] = {}  # node -> (last step, messages sent)

    async def start(self, members: dict[str, Any]) -> None:
        """The node actors of the group (created by the head after this relay)."""
        self._members = dict(members)

    async def update(self, status: Status) -> None:
        """Forward a status push to every node of the group (they apply pushes in order)."""
        for member in self._members.values():
            member.update.remote(status)

    async def node_step(self, msg: NodeStep) -> None:
        """One node of the group delivered one step (handled in that node's message order)."""
        for m in self._order.push(msg.node, msg.seq, msg):
            have = self._pending.setdefault(m.step, {})
            have[m.node] = m
            if len(have) == len(self._nodes):  # nodes complete steps in step order: so does the group
                del self._pending[m.step]
                self._forward(m.step, have)
                del have  # no frame of this actor keeps a chunk's ref (retention rule)
        self._maybe_closed()

    def _forward(self, step: int, have: dict[str, NodeStep]) -> None:
        """One group object per array (the group's ``(node, ref)`` pairs), one message to the head."""
        by_array: dict[str, list[tuple[str, Any]]] = {}
        for node in sorted(have):
            for array, ref in zip(have[node].arrays, have[node].refs, strict=True):
                by_array.setdefault(array, []).append((node, ref))
        names = tuple(sorted(by_array))
        refs = tuple(ray.put(tuple(by_array[a])) for a in names)
        self._head.group_step.remote(GroupStep(self._name, step, names, refs, self._sent))
        self._sent += 1

    async def node_closed(self, node: str, last_step: int, messages: int) -> None:
        """Every rank of ``node`` closed after ``messages`` step messages."""
        self._closed[node] = (last_step, messages)
        self._maybe_closed()

    def _maybe_closed(self) -> None:
        if len(self._closed) == len(self._nodes) and all(
            self._order.count(n) >= sent for n, (_, sent) in self._closed.items()
        ):
            last = max(step for step, _ in self._closed.values())
            self._head.node_closed.remote(self._name, last, self._sent)
            self._closed.clear()

    async def stats(self) -> dict[str, int]:
        """Group messages sent to the head, steps still incomplete, this process's id."""
        return {"messages": self._sent, "pending": len(self._pending), "pid": os.getpid()}
