"""Step relays: the head's fan-in and fan-out when a run spans many nodes.

With ``K`` nodes the head would receive ``K`` step messages and send ``K`` status pushes
per step, each a Ray call costing it ~0.3-0.5 ms of CPU (``benchmarks/scale_model.py``).
Above ``Config.fanin`` nodes, the head builds a tree: it groups the sorted nodes ``fanin``
at a time, each group under a :class:`StepRelay` pinned to the group's first node, then
groups those relays ``fanin`` at a time, and so on until at most ``Config.head_fanin``
units report to the head. Node actors send their step messages and their close to their
relay; a relay hands its parent *one* :class:`~insitu.messages.GroupStep` per step once
every unit of its group delivered it, and forwards each status push down. The head then
handles at most ``head_fanin`` calls in and out per step, whatever ``K``. Relays are
owned by the head (they die with it). A group message holds
one *group object* per array, put by the relay, with the ``(unit, ref)`` pairs of its
group: passing a ref costs ~10-100 us (borrower bookkeeping), so the head passes one ref
per top unit and array per step, not ``K``; the consumer resolves the group objects, one
``ray.get`` per tree level.
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
    """Aggregates one group of units: node actors, or relays of the level below."""

    def __init__(self, run: str, name: str, units: tuple[str, ...]) -> None:
        self._run = run
        self._name = name
        self._units = frozenset(units)
        self._parent: Any = None
        self._members: dict[str, Any] = {}
        self._order: InOrder[NodeStep | GroupStep] = InOrder()
        self._pending: dict[tuple[int, tuple[str, ...] | None], dict[str, tuple[tuple[str, Any], ...]]] = {}
        self._sent = 0
        self._closed: dict[str, tuple[int, int]] = {}  # unit -> (last step, messages sent)
        self._early: list[Status] | None = []  # pushes that came before start (None once started)

    async def start(self, members: dict[str, Any], parent: Any) -> None:
        """The group's actors (created by the head with this relay) and where to report; pushes that
        came first (a consumer attaching while the run registers) are forwarded now, not lost."""
        self._members = dict(members)
        self._parent = parent
        early, self._early = self._early or [], None
        for status in early:
            self._forward_status(status)

    async def update(self, status: Status) -> None:
        """Forward a status push to every unit of the group (node actors apply pushes in order)."""
        if self._early is not None:
            self._early.append(status)
            return
        self._forward_status(status)

    def _forward_status(self, status: Status) -> None:
        for member in self._members.values():
            member.update.remote(status)

    async def node_step(self, msg: NodeStep) -> None:
        """One node of the group delivered one step (handled in that node's message order)."""
        for m in self._order.push(msg.node, msg.seq, msg):
            self._unit_step(m.node, m.step, m.arrays, m.refs, m.part)
        self._maybe_closed()

    async def group_step(self, msg: GroupStep) -> None:
        """One relay of the level below delivered one step."""
        for m in self._order.push(msg.relay, msg.seq, msg):
            self._unit_step(m.relay, m.step, m.arrays, m.refs, m.part)
        self._maybe_closed()

    def _unit_step(self, unit: str, step: int, arrays: tuple[str, ...], refs: tuple[Any, ...],
                   part: tuple[str, ...] | None = None) -> None:  # fmt: skip
        key = (step, part)  # one entry per call of the simulation
        have = self._pending.setdefault(key, {})
        have[unit] = tuple(zip(arrays, refs, strict=True))
        if len(have) == len(self._units):  # units complete calls in call order: so does the group
            del self._pending[key]
            self._forward(step, have, part)

    def _forward(self, step: int, have: dict[str, tuple[tuple[str, Any], ...]],
                 part: tuple[str, ...] | None = None) -> None:  # fmt: skip
        """One group object per array (the group's ``(unit, ref)`` pairs), one message up.

        A method of its own so that no frame of this actor keeps a chunk's ref (retention rule).
        """
        by_array: dict[str, list[tuple[str, Any]]] = {}
        for unit in sorted(have):
            for array, ref in have[unit]:
                by_array.setdefault(array, []).append((unit, ref))
        names = tuple(sorted(by_array))
        refs = tuple(ray.put(tuple(by_array[a])) for a in names)
        self._parent.group_step.remote(GroupStep(self._name, step, names, refs, self._sent, part))
        self._sent += 1

    async def node_closed(self, unit: str, last_step: int, messages: int, epoch: int = 0) -> None:
        """Every rank below ``unit`` closed after ``unit`` sent ``messages`` step messages (nodes under a
        relay are not restarted: ``epoch`` is always 0 here)."""
        self._closed[unit] = (last_step, messages)
        self._maybe_closed()

    def _maybe_closed(self) -> None:
        if len(self._closed) == len(self._units) and all(
            self._order.count(u) >= sent for u, (_, sent) in self._closed.items()
        ):
            last = max(step for step, _ in self._closed.values())
            self._parent.node_closed.remote(self._name, last, self._sent)
            self._closed.clear()

    async def stats(self) -> dict[str, int]:
        """Group messages sent up, steps still incomplete, this process's id."""
        return {"messages": self._sent, "pending": len(self._pending), "pid": os.getpid()}
