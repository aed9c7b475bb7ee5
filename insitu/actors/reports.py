"""What the head reports about its run: ``insitu status``, the node list, counters for tests.

Read-only views of :class:`~insitu.actors.head.HeadActor`'s state, mixed into it (as
:class:`~insitu.actors.recovery.NodeWatch` is) so that the head keeps to its protocol.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from insitu.messages import EndReason, RunEnd
from insitu.validate import NO_STEP

__all__ = ["HeadReports"]


class HeadReports:
    """``status``, ``nodes``, ``stats`` and the other read-only calls of the head."""

    _run: str
    _sim: Any
    _book: Any
    _nodes: dict[str, Any]
    _units: dict[str, Any]
    _relays: dict[str, Any]
    _unit_nodes: dict[str, tuple[str, ...]]
    _partial: dict[tuple[int, tuple[str, ...] | None], dict[str, Any]]
    _end: RunEnd | None
    _created: float
    _steps_assembled: int
    _recovery: Any
    _registered: bool
    _nodes_doc: list[dict[str, Any]] | None
    _parent_relay: dict[str, str]
    _node_ips: dict[str, str]
    _warm: Any
    _seq: int
    _order: Any
    _steering: dict[str, Any]

    async def status(self) -> dict[str, Any]:
        """The head's part of ``insitu status`` (docs/status.md): plain data from its memory, no call out,
        independent of the number of nodes (:meth:`nodes` lists them)."""
        book, now = self._book, time.monotonic()
        last = None if book.last_step == NO_STEP else book.last_step
        sim = None if self._sim is None else {"ranks": self._sim.size, "nodes": len(self._nodes)}
        assembling = []
        for (step, part), have in sorted(self._partial.items(), key=lambda kv: kv[0][0]):
            missing = [n for u in self._units if u not in have for n in self._unit_nodes.get(u, (u,))]
            assembling.append({"step": step, "arrays": list(part) if part else "all", "missing_nodes": missing})
        consumers, held = book.describe(now)
        end = None if self._end is None else {"reason": self._end.reason.value, "message": self._end.message,
                                              "last_step": self._end.last_step}  # fmt: skip
        return {
            "run": self._run, "age_s": round(now - self._created, 3),
            "state": "ended" if self._end is not None else "running" if self._sim is not None else "waiting",
            "end": end, "simulation": sim,
            "steps": {"assembled": self._steps_assembled, "last": last, "assembling": assembling,
                      "in_flight": self._in_flight()},
            "ranks_told": book.sim_state().name.lower(), "failures": book.failures, "last_failure": book.last_failure,
            "restart_pending_s": None if book.restart_until is None else round(book.restart_until - now, 3),
            "consumers": consumers, "retained": book.retained_steps(), "held_steps": held,
            "node_restarts": self._recovery.describe(),
        }  # fmt: skip

    def _in_flight(self) -> int:
        """Steps the ranks sent that not every attached consumer finished (by step number, from the
        consumers' completed step to the newest step seen, assembling ones included)."""
        newest = max([k[0] for k in self._partial] + [self._book.last_step])
        done = self._book.completed()
        return 0 if newest == NO_STEP else max(0, newest - max(done, -1))

    def _node_entries(self) -> list[dict[str, Any]]:
        """Each node's id, address, ranks and route: fixed at registration, built once (status stays cheap)."""
        if self._nodes_doc is None and self._registered and self._sim is not None:  # addresses come last
            by_node: dict[str, list[int]] = {}
            for rank, node in enumerate(self._sim.rank_nodes):
                by_node.setdefault(node, []).append(rank)
            self._nodes_doc = []
            for node in self._nodes:
                route, unit = [], node
                while unit in self._parent_relay:
                    unit = self._parent_relay[unit]
                    route.append(unit)
                self._nodes_doc.append({"id": node, "ip": self._node_ips.get(node), "ranks": by_node.get(node, []),
                                        "route": " > ".join(route) or "direct"})  # fmt: skip
        return self._nodes_doc or []

    async def nodes(self) -> list[dict[str, Any]]:
        """Each node's ``id``, ``ip``, ``ranks``, ``route`` and ``actor`` (its node actor, which ``insitu
        status`` asks for its ranks' figures). Fixed once registered: ``--follow`` asks once."""
        return [{**n, "actor": self._nodes.get(n["id"])} for n in self._node_entries()]

    async def warm_processes(self) -> dict[str, int]:
        """Process id of each node process started ahead and not adopted (yet), by node id."""
        return await self._warm.pids()

    async def node_processes(self) -> dict[str, int]:
        """Process id of each node actor (for fault tests)."""
        pids = await asyncio.gather(*(a.stats.remote() for a in self._nodes.values()))
        return {node: int(s["pid"]) for node, s in zip(self._nodes, pids, strict=True)}

    async def losses(self) -> tuple[RunEnd | None, list[str]]:
        """The run's ``NODE_LOST`` end, if so, and the nodes whose process was restarted."""
        ended = self._end if self._end is not None and self._end.reason == EndReason.NODE_LOST else None
        return ended, [n for n in self._nodes if self._recovery.epoch(n)]

    async def end(self) -> RunEnd | None:
        """How the run ended, ``None`` while it goes on (a consumer whose data vanished asks)."""
        return self._end

    async def stats(self) -> dict[str, Any]:
        """Counters for tests and benchmarks."""
        return {
            "pid": os.getpid(),
            "pushes": self._seq,
            "messages": self._order.counts(),
            "units": len(self._units),
            "relays": len(self._relays),
            "nodes": list(self._nodes),
            "assembled": self._steps_assembled,
            "analytics": self._book.sim_state().name,
            "consumers": {
                c.id: {"kind": c.kind, "state": c.state.name, "completed": c.completed, "failure": c.failure}
                for c in self._book.consumers.values()
            },
            "retained": self._book.retained_steps(),
            "steering": {k: u.value for k, u in self._steering.items()},
            "steering_versions": {k: u.version for k, u in self._steering.items()},
            "steering_log": len(self._steering),
            "ended": None if self._end is None else self._end.reason.value,
        }
