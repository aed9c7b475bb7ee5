"""Node processes started ahead of the simulation (the run driver's ``--create-head``).

Starting a node process is starting a Ray worker: about a second of CPU each, and most of a
run's set-up (docs/performance.md, "Start-up"). A launcher knows the run before its simulation
starts, so the run driver it pre-starts asks the head to start one node process on every
alive node at once (:meth:`HeadActor.prewarm`). When the simulation registers, the head adopts
the process of each node that has ranks, tells it its ranks in ``start``, and ends the others.
Runs whose driver rank 0 spawns (plain ``mpiexec``) start their node processes at registration,
as before.

Examples
--------
>>> warm = WarmNodes()
>>> warm.take("n1", restarts=3) is None  # nothing started ahead: the head creates the process
True
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

__all__ = ["WarmNodes"]

log = logging.getLogger(__name__)


class WarmNodes:
    """The node processes a head started before its simulation registered, by node id."""

    def __init__(self) -> None:
        self._actors: dict[str, Any] = {}
        self._restarts = 0
        self._ready: asyncio.Task[int] | None = None

    def start(self, run: str, head: Any, nodes: list[str], restarts: int, timeout: float) -> asyncio.Task[int]:
        """Start one node process per node in ``nodes`` (once); a task counting those that answered."""
        if self._ready is None:
            from insitu.actors.node import NodeActor

            self._restarts = restarts
            for node in nodes:
                self._actors[node] = NodeActor.options(  # type: ignore[attr-defined]
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False), max_restarts=restarts
                ).remote(run, node, head, ())
            self._ready = asyncio.get_running_loop().create_task(self._answered(timeout))
        return self._ready

    async def _answered(self, timeout: float) -> int:
        calls = [a.stats.remote() for a in self._actors.values()]
        try:
            done = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), timeout)
        except TimeoutError:
            log.warning("node processes started ahead did not all answer within %.0f s", timeout)
            return 0
        return sum(1 for d in done if not isinstance(d, BaseException))

    async def pids(self) -> dict[str, int]:
        """Process id of each process started ahead and not (yet) taken, by node id."""
        stats = await asyncio.gather(*(a.stats.remote() for a in self._actors.values()))
        return {node: int(st["pid"]) for node, st in zip(self._actors, stats, strict=True)}

    def take(self, node: str, restarts: int) -> Any | None:
        """The process started ahead on ``node``, if it has the ``max_restarts`` the run needs."""
        if restarts != self._restarts:
            return None
        return self._actors.pop(node, None)

    def discard(self) -> None:
        """End the processes nobody took (nodes without ranks, or the run's end)."""
        for actor in self._actors.values():
            ray.kill(actor, no_restart=True)
        self._actors.clear()
