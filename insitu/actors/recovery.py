"""Restarts of a run's node processes, and the gaps they leave (docs/architecture.md, "Recovery").

The head creates each :class:`~insitu.actors.node.NodeActor` with ``max_restarts =
node_restarts``. When one dies while its raylet lives, Ray re-runs its constructor on the
same node; the head calls ``start`` again with the address of the first incarnation (where
the node's ranks reconnect at their next ``send``) and the next *epoch*. Messages carry
their epoch: the head orders each epoch's messages on their own and ignores a dead
incarnation's late ones. The first step the new incarnation delivers ends the gap: the head
drops the steps still assembling below it and hands every consumer a :class:`Gap`.

Nodes reporting through step relays (runs on more than ``fanin`` nodes) are not restarted:
their loss ends the run with ``NODE_LOST`` as without restarts.

Examples
--------
>>> r = NodeRecovery(restarts=1)
>>> r.sender("n1", 0), r.can_restart("n1")
('n1', True)
>>> r.begin("n1", last_step=7), r.sender("n1", 0), r.sender("n1", 1), r.can_restart("n1")
(1, None, 'n1#1', False)
>>> r.resumed("n1", 10)
7
>>> r.resumed("n1", 11) is None  # once per restart
True
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import ray

from insitu.messages import EndReason, Gap, RunEnd
from insitu.reach import listens
from insitu.validate import NO_STEP

__all__ = ["NodeRecovery", "NodeWatch"]

log = logging.getLogger(__name__)


class NodeRecovery:
    """Per node: its epoch, restarts left, and the gap being recovered (see the module docstring)."""

    def __init__(self, restarts: int) -> None:
        self.restarts = restarts
        self.addresses: dict[str, str] = {}
        self._epochs: dict[str, int] = {}
        self._pending: dict[str, tuple[int, float]] = {}  # node -> (last complete step at the loss, when)
        self.gaps: list[Gap] = []
        self.floor = NO_STEP
        """Steps below the latest resume can never complete (a restarted node never sends them)."""

    def epoch(self, node: str) -> int:
        """The node's current incarnation (0: never restarted)."""
        return self._epochs.get(node, 0)

    def sender(self, node: str, epoch: int) -> str | None:
        """The in-order key of a message of ``node`` in ``epoch``; ``None`` for a dead incarnation's."""
        current = self.epoch(node)
        if epoch < current:
            return None
        return node if epoch == 0 else f"{node}#{epoch}"

    def key(self, node: str) -> str:
        """The in-order key of the node's current incarnation."""
        return self.sender(node, self.epoch(node)) or node

    def can_restart(self, node: str) -> bool:
        """Whether the node's process may be restarted once more."""
        return self.epoch(node) < self.restarts

    def recovering(self) -> list[str]:
        """Nodes restarted that have not delivered a step since."""
        return list(self._pending)

    def begin(self, node: str, last_step: int) -> int:
        """The node's process died and is being restarted; return its new epoch."""
        self._epochs[node] = self.epoch(node) + 1
        self._pending.setdefault(node, (last_step, time.monotonic()))
        return self._epochs[node]

    def resumed(self, node: str, step: int) -> int | None:
        """The restarted node delivered ``step``: the last complete step before its loss (once)."""
        got = self._pending.pop(node, None)
        if got is None:
            return None
        self.floor = max(self.floor, step)
        return got[0]

    def describe(self) -> list[dict[str, Any]]:
        """Restarts so far, for ``insitu status``: node, epoch, and the gap once it is known."""
        out: list[dict[str, Any]] = [{**asdict(g), "epoch": self.epoch(g.node)} for g in self.gaps]
        for node, (after, since) in self._pending.items():
            out.append({"node": node, "epoch": self.epoch(node), "after": after, "resume": None,
                        "down_s": round(time.monotonic() - since, 3)})  # fmt: skip
        return out


class NodeWatch:
    """The head's watch over its node processes: restart (:class:`NodeRecovery`) or declare lost.

    Mixed into :class:`~insitu.actors.head.HeadActor`, whose state it uses (``_recovery``,
    ``_book``, ``_partial``, ``_nodes``, ...): kept here so that the head stays readable.
    """

    _run: str
    _cfg: Any
    _end: RunEnd | None
    _torn_down: bool
    _sim: Any
    _book: Any
    _partial: dict[tuple[int, tuple[str, ...] | None], dict[str, Any]]
    _raylets: dict[str, tuple[str, int]]
    _node_ips: dict[str, str]
    _closed_units: dict[str, int]
    _recovery: NodeRecovery
    _node_ranks: dict[str, tuple[int, ...]]

    if TYPE_CHECKING:  # the head's own methods

        def _status(self, full: bool = False) -> Any: ...
        def _finish(self, end: RunEnd) -> None: ...
        def _push(self) -> None: ...
        def _wake(self) -> None: ...

    async def _watch_node(self, node: str, actor: Any) -> None:
        while True:
            try:
                await actor.park.remote()
            except Exception:  # any failure of the park call means the node's process is gone
                pass
            if self._end is not None or self._torn_down:
                return
            host, port = self._raylets.get(node, ("", 0))
            raylet_gone = bool(port) and not await asyncio.to_thread(listens, f"{host}:{port}")
            if self._end is not None or self._torn_down:
                return
            if raylet_gone or node in self._closed_units or not self._recovery.can_restart(node):
                self._node_lost(node, raylet_gone)
                return
            if not await self._restart_node(node, actor):
                return

    async def _restart_node(self, node: str, actor: Any) -> bool:
        """Ray restarts the node's process (``max_restarts``); start it at its first address in a new
        epoch. Whether it runs again (else the node is lost)."""
        last = self._book.last_step
        epoch = self._recovery.begin(node, last)
        log.warning("run %s: the insitu process of node %s (id %s) died after step %s; restarting it (epoch %d)",
                    self._run, self._node_ips.get(node, "?"), node[:12], last, epoch)  # fmt: skip
        end = time.monotonic() + self._cfg.deadline
        try:
            while True:  # Ray answers ActorUnavailableError while the process is being restarted
                # a full status (steering history included) taken right before the call: pushes that failed
                # while the process was down are in it, and the next push follows its seq
                status = self._status(full=True)
                try:
                    await asyncio.wait_for(actor.start.remote(status, None, self._recovery.addresses[node], epoch,
                                                              self._node_ranks[node]),
                                           max(0.1, end - time.monotonic()))  # fmt: skip
                    break
                except ray.exceptions.ActorUnavailableError:
                    if time.monotonic() > end:
                        raise
                    await asyncio.sleep(0.2)
        except Exception as exc:  # noqa: BLE001 - not restartable (no restarts left on Ray's side, node gone)
            log.warning("run %s: node %s could not be restarted: %s", self._run, node[:12], exc)
            if self._end is None and not self._torn_down:
                self._node_lost(node, why=f"its restart failed: {type(exc).__name__}: {str(exc)[:300]}")
            return False
        return True

    def _resume(self, node: str, step: int) -> None:
        """The restarted ``node`` delivered ``step``: drop what cannot complete below it, tell the consumers."""
        after = self._recovery.resumed(node, step)
        if after is None:
            return
        after = max(after, -1)  # -1: lost before any step completed
        incomplete = tuple(sorted({s for s, _ in self._partial if s < step}))
        for key in [k for k in self._partial if k[0] < step]:
            del self._partial[key]
        lost = self._book.lose_node(node)
        gap = Gap(node, self._node_ips.get(node, "?"), after, step, incomplete, lost)
        self._recovery.gaps.append(gap)
        self._book.deliver_gap(gap)
        log.warning("run %s: node %s back at step %d; steps %d..%d not delivered (incomplete: %s), retained "
                    "steps lost: %s", self._run, node[:12], step, after + 1, step - 1, list(incomplete),
                    list(lost))  # fmt: skip
        self._wake()

    def _node_lost(self, node: str, raylet_gone: bool = False, why: str = "") -> None:
        """A node actor died mid-run: no later step can complete. Tell the consumers (a specific end of
        the stream) and the ranks (the status' failure), naming the node, whether its raylet went too,
        and the last complete step."""
        assert self._sim is not None
        ranks = [r for r, n in enumerate(self._sim.rank_nodes) if n == node]
        last = self._book.last_step
        after = "before any step completed" if last == NO_STEP else f"after step {last}, the last complete step"
        what = "the insitu node process"
        if raylet_gone:
            host, port = self._raylets[node]
            what = f"the raylet (node manager {host}:{port} refuses connections) and with it the insitu node process"
        message = (f"{what} of node {self._node_ips.get(node, '?')} (id {node[:12]}, ranks "
                   f"{ranks}) of run {self._run!r} died {after}{f' ({why})' if why else ''}; later steps cannot "
                   "complete and are lost")  # fmt: skip
        log.warning("%s", message)
        self._book.last_failure = message
        self._finish(RunEnd(EndReason.NODE_LOST, message, -1 if last == NO_STEP else last))
        self._push()
