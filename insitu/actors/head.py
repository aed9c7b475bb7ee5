"""The per-run head actor: assembles complete steps, serves them in order, relays steering.

It is a detached named actor (``insitu-head-<run>`` in the configured namespace)
created by whichever side comes first. It owns the run's node actors, so
killing it reclaims every actor and object of the run. It reclaims itself once
both sides are gone, or once one side is gone and the other has not shown up
(or stopped polling) for ``reclaim_deadline`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from insitu.actors.consumers import ConsumerBook, ConsumerState
from insitu.actors.node import NodeActor
from insitu.actors.ordering import InOrder
from insitu.actors.recovery import NodeRecovery, NodeWatch
from insitu.actors.relay import StepRelay
from insitu.actors.reports import HeadReports
from insitu.actors.warm import WarmNodes
from insitu.config import Config
from insitu.dispatch import HEAD_RESOURCE
from insitu.errors import ContractError, StepTimeoutError
from insitu.messages import (
    Attached,
    EndReason,
    Gap,
    GroupStep,
    NodeStep,
    RunEnd,
    RunInfo,
    SimInfo,
    Status,
    SteeringUpdate,
    StepData,
    Waiting,
)

__all__ = ["HeadActor", "find_head", "get_or_create_head", "head_name", "relay_name"]

log = logging.getLogger(__name__)
_DETACH_GRACE = 3.0  # seconds a detach waits for a consumer's earlier messages (its ray.get waits 10)
_FAILURE_GRACE = 0.5  # seconds to collect the other ranks a launcher kills after the first death


def head_name(run: str) -> str:
    """Name of the head actor of ``run``."""
    return f"insitu-head-{run}"


def relay_name(run: str, level: int, index: int) -> str:
    """Name of the ``index``-th step relay of tree level ``level`` (1: relays of nodes) of ``run``."""
    return f"insitu-relay-{run}-{level}-{index}"


@ray.remote(num_cpus=0, max_restarts=0)
class HeadActor(NodeWatch, HeadReports):
    """See the module docstring."""

    def __init__(self, run: str, config: Config) -> None:
        self._run = run
        self._cfg = config
        self._sim: SimInfo | None = None
        self._nodes: dict[str, Any] = {}
        self._partial: dict[tuple[int, tuple[str, ...] | None], dict[str, Any]] = {}
        self._book = ConsumerBook()
        self._steering: dict[str, SteeringUpdate] = {}  # the last update per key, in version order
        self._unpushed: dict[str, SteeringUpdate] = {}  # the same, since the last status push
        self._version = 0
        self._consumer_order: InOrder[Callable[[], None]] = InOrder()  # each consumer's messages, in its order
        self._seq = 0
        self._units: dict[str, Any] = {}  # what reports to the head: nodes, or the top step relays
        self._relays: dict[str, Any] = {}  # every step relay of the run (insitu.actors.relay)
        self._unit_nodes: dict[str, tuple[str, ...]] = {}
        self._order: InOrder[Any] = InOrder()
        self._sent_by_unit: dict[str, int] = {}
        self._closed_units: dict[str, int] = {}
        self._end: RunEnd | None = None
        self._steps_assembled = 0
        self._book_last: int | None = None
        self._created = time.monotonic()
        self._ended_at: float | None = None
        self._event: asyncio.Event | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._torn_down = False
        self._dead_ranks: dict[int, str] = {}
        self._node_ips: dict[str, str] = {}
        self._raylets: dict[str, tuple[str, int]] = {}  # node id -> its raylet's node manager (host, port)
        self._parent_relay: dict[str, str] = {}  # unit -> the step relay it reports to (none: the head)
        self._nodes_doc: list[dict[str, Any]] | None = None
        self._watchers: list[asyncio.Task[None]] = []
        self._recovery = NodeRecovery(config.node_restarts)
        self._registered = False  # node actors started and their addresses known (nodes() answers then)
        self._warm = WarmNodes()  # node processes started before the simulation registered (prewarm)
        self._node_ranks: dict[str, tuple[int, ...]] = {}

    # -- helpers -----------------------------------------------------------------
    def _wake(self) -> None:
        if self._event is None:
            self._event = asyncio.Event()
        self._event.set()
        self._event = asyncio.Event()

    def _ensure_watchdog(self) -> None:
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    def _status(self, full: bool = False) -> Status:
        # compacted to the last value per key: a push, or a snapshot, never carries a superseded value;
        # ranks agree on push boundaries only, so no rank ever needs one (insitu.bridge._catch_up)
        updates = tuple((self._steering if full else self._unpushed).values())
        book = self._book
        return Status(book.completed(), book.sim_state(), updates, book.last_failure, self._seq)

    def _push(self) -> None:
        self._seq += 1
        status = self._status()
        self._unpushed.clear()
        for unit in self._units.values():
            unit.update.remote(status)

    def _finish(self, end: RunEnd) -> None:
        if self._end is None:
            self._end = end
            self._ended_at = time.monotonic()
            self._partial.clear()
            self._wake()

    # -- simulation side -----------------------------------------------------------
    async def register_simulation(self, info: SimInfo, nodes: dict[str, Any] | None = None) -> dict[str, str]:
        """Create one node actor per node of the simulation; return their socket addresses.

        Above ``fanin`` nodes the nodes report through a tree of :class:`StepRelay` s of
        ``fanin`` units each, built until at most ``head_fanin`` units report to the head
        (module :mod:`insitu.actors.relay`). ``nodes`` (node id -> actor) adopts node processes
        started elsewhere instead, e.g. the impersonated nodes of the scale model
        (``benchmarks/scale_model.py``); they answer ``start(status, parent)`` and
        ``update(status)`` and send ``node_step``/``node_closed`` to their parent.
        """
        self._ensure_watchdog()
        if self._sim is not None or self._torn_down:
            raise ContractError(f"run {self._run!r} already has a simulation attached; use a new run name per run")
        self._sim = info
        self._book.raise_on_failure = info.raise_on_failure
        me = ray.get_runtime_context().current_actor
        by_node: dict[str, list[int]] = {}
        for rank, node in enumerate(info.rank_nodes):
            by_node.setdefault(node, []).append(rank)
        status = self._status(full=True)
        self._unpushed.clear()
        ordered = sorted(by_node)
        self._node_ranks = {n: tuple(by_node[n]) for n in ordered}
        restarts = 0 if len(ordered) > self._cfg.fanin else self._cfg.node_restarts
        for node in ordered:
            self._nodes[node] = (
                nodes[node]
                if nodes is not None
                else self._warm.take(node, restarts)
                or NodeActor.options(  # type: ignore[attr-defined]
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False), max_restarts=restarts
                ).remote(self._run, node, me, tuple(by_node[node]))
            )
        self._warm.discard()  # started ahead on nodes without ranks
        handles: dict[str, Any] = dict(self._nodes)
        below: dict[str, tuple[str, ...]] = {n: (n,) for n in ordered}  # unit -> the nodes under it
        children: dict[str, tuple[str, ...]] = {}  # relay -> its units
        level, top = 0, list(ordered)
        if len(ordered) > self._cfg.fanin:
            self._recovery.restarts = 0  # nodes under relays are not restarted (insitu.actors.recovery)
            while level == 0 or len(top) > self._cfg.head_fanin:
                level += 1
                size = self._cfg.fanin if level == 1 else max(self._cfg.fanin, 2)  # levels above 1 always shrink
                groups = [top[i : i + size] for i in range(0, len(top), size)]
                top = []
                for index, group in enumerate(groups):
                    name = relay_name(self._run, level, index)
                    first = below[group[0]][0]  # on the first node of its subtree
                    handles[name] = StepRelay.options(  # type: ignore[attr-defined]
                        name=name,
                        namespace=self._cfg.namespace,
                        scheduling_strategy=None
                        if nodes is not None
                        else NodeAffinitySchedulingStrategy(first, soft=False),
                    ).remote(self._run, name, tuple(group))
                    children[name] = tuple(group)
                    below[name] = tuple(n for u in group for n in below[u])
                    top.append(name)
        parent_of: dict[str, Any] = {u: me for u in top}
        for relay, units in children.items():
            parent_of.update(dict.fromkeys(units, handles[relay]))
            self._parent_relay.update(dict.fromkeys(units, relay))
        self._relays = {r: handles[r] for r in children}
        self._units = {u: handles[u] for u in top}
        self._unit_nodes = {u: below[u] for u in top}
        try:
            starts = [self._nodes[n].start.remote(status, parent_of[n]) if nodes is not None  # impersonated
                      else self._nodes[n].start.remote(status, parent_of[n], ranks=tuple(by_node[n]))
                      for n in ordered]  # fmt: skip
            for relay, units in children.items():
                starts.append(handles[relay].start.remote({u: handles[u] for u in units}, parent_of[relay]))
            addresses = await asyncio.wait_for(asyncio.gather(*starts), self._cfg.deadline)
        except TimeoutError:
            raise StepTimeoutError(
                f"node actors of run {self._run!r} did not start within {self._cfg.deadline:.0f} s "
                f"on nodes {[n[:12] for n in self._nodes]}"
            ) from None
        self._wake()
        self._recovery.addresses = dict(zip(ordered, addresses[: len(ordered)], strict=True))
        if nodes is None:  # real node actors: learn their death at once (impersonated ones have no park)
            self._node_ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
            self._raylets = {n["NodeID"]: (n["NodeManagerAddress"], n["NodeManagerPort"]) for n in ray.nodes()}
            loop = asyncio.get_running_loop()
            for node in ordered:
                self._watchers.append(loop.create_task(self._watch_node(node, self._nodes[node])))
        self._registered = True
        return dict(zip(ordered, addresses[: len(ordered)], strict=True))

    async def prewarm(self) -> int:
        """Start a node process on every alive node now, before the simulation registers (the run
        driver's ``--create-head``; :mod:`insitu.actors.warm`); return how many answered. Once per
        run: later calls wait for the same processes."""
        if self._sim is not None or self._torn_down:
            return 0
        self._ensure_watchdog()  # a run that never registers is reclaimed, and its warm processes with it
        alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        restarts = 0 if len(alive) > self._cfg.fanin else self._cfg.node_restarts
        me = ray.get_runtime_context().current_actor
        return await self._warm.start(self._run, me, alive, restarts, self._cfg.deadline)

    async def node_step(self, msg: NodeStep) -> None:
        """A node reporting directly delivered one step (once per node per step)."""
        sender = self._recovery.sender(msg.node, msg.epoch)
        if sender is None:
            return  # a dead incarnation's late message: its blocks died with it
        for m in self._order.push(sender, msg.seq, msg):  # a node's steps are handled in its own order
            if m.epoch:
                self._resume(m.node, m.step)
            if m.step >= self._recovery.floor:  # else another node's late message from before a gap
                self._unit_step(m.node, m.step, m.arrays, m.refs, m.part)
        self._maybe_closed()  # after the whole batch: the order counts it handed over before they were handled

    async def group_step(self, msg: GroupStep) -> None:
        """A relay's group of nodes delivered one step (once per relay per step)."""
        for m in self._order.push(msg.relay, msg.seq, msg):
            self._unit_step(m.relay, m.step, m.arrays, m.refs, m.part)
        self._maybe_closed()

    def _unit_step(self, unit: str, step: int, arrays: tuple[str, ...], refs: tuple[Any, ...],
                   part: tuple[str, ...] | None = None) -> None:  # fmt: skip
        if self._end is not None or (self._book.had_consumers() and not self._book.attached()):
            return  # dropped: nobody will read it
        key = (step, part)  # one entry per call of the simulation (arrays at their own cadence)
        have = self._partial.setdefault(key, {})
        have[unit] = tuple(zip(arrays, refs, strict=True))
        if len(have) == len(self._units):
            del self._partial[key]
            data = tuple((a, u, r) for u in sorted(have) for a, r in have[u])
            self._book.deliver(StepData(step, data))
            self._steps_assembled += int(step != self._book_last)  # steps, not calls
            self._book_last = step
            self._wake()

    async def node_closed(self, unit: str, last_step: int, messages: int, epoch: int = 0) -> None:
        """Every rank of ``unit`` (a node, or every node of a relay's group) closed after
        ``unit`` sent ``messages`` step messages (in its ``epoch``: see :mod:`insitu.actors.recovery`)."""
        if self._recovery.sender(unit, epoch) is None:
            return
        self._closed_units[unit] = last_step
        self._sent_by_unit[unit] = messages
        self._maybe_closed()

    def _maybe_closed(self) -> None:
        # Ray may run a node's close before its last step messages: end only once all arrived
        # (and were handled: never call this between messages of one InOrder batch)
        if self._sent_by_unit and len(self._closed_units) == len(self._units) and all(
            self._order.count(self._recovery.key(u)) >= sent for u, sent in self._sent_by_unit.items()
        ):
            last = max(self._closed_units.values())
            for node in self._recovery.recovering():  # restarted, but the run ended before a step came
                self._resume(node, last + 1)
            self._finish(RunEnd(EndReason.CLOSED, "", last))

    async def rank_failed(self, node: str, rank: int) -> None:
        """A rank disconnected without closing (crash, kill).

        MPI launchers kill the other ranks as soon as one dies, and the node actors
        notice the disconnections in any order, so the failures seen within
        ``_FAILURE_GRACE`` seconds of the first are reported together.
        """
        first = not self._dead_ranks
        self._dead_ranks.setdefault(rank, node)
        if first:
            asyncio.get_running_loop().call_later(_FAILURE_GRACE, self._report_dead_ranks)

    def _report_dead_ranks(self) -> None:
        dead = sorted(self._dead_ranks.items())
        which = ", ".join(f"{rank} (node {node[:12]})" for rank, node in dead)
        noun = "rank" if len(dead) == 1 else "ranks"
        self._finish(RunEnd(EndReason.SIMULATION_FAILED, f"simulation {noun} {which} died before closing"))

    async def ping(self) -> None:
        """Start the reclamation watchdog (called once by whoever gets the handle)."""
        self._ensure_watchdog()

    async def abort(self, reason: str, registered: bool) -> None:
        """The simulation gave up during set-up: reclaim at once.

        ``registered`` says whether the caller's own registration succeeded; an abort
        from a simulation that never registered leaves another simulation's run alone.
        """
        if registered or self._sim is None:
            self._finish(RunEnd(EndReason.ABORTED, f"the simulation's set-up failed: {reason}"))
            asyncio.get_running_loop().call_later(1.0, self._teardown)  # a waiting analytics reads the end first

    # -- consumers (analytics, recorders, readers) ----------------------------------------
    async def attach(self, link: Any, windows: dict[str, int], kind: str = "analytics", restarts: int = -1,
                     grace: float = 0.0, previous_stderr: str = "") -> Attached:  # fmt: skip
        """Attach a consumer reading ``windows`` (array -> largest window); ``link`` is an
        actor owned by the consumer's process, whose death tells the head it died.

        The run's first consumer gets every step so far; a later one starts at the next
        complete step, its windows refilled from the retained steps (``Attached.history``).
        ``restarts``/``grace``: a supervised consumer (``insitu analytics --supervise``).
        """
        self._ensure_watchdog()
        if self._end is not None and self._end.reason != EndReason.CLOSED:
            raise ContractError(f"run {self._run!r} already ended: {self._end.message or self._end.reason.value}")
        resumed_after = self._book.lost_after if self._book.failures else None
        failed = [c for c in self._book.consumers.values() if c.state == ConsumerState.FAILED]
        if previous_stderr and failed:  # the supervisor's record of the last failed incarnation's stderr
            failed[-1].stderr_tail = previous_stderr[-20000:]
        dropped = await self._ranks_dropped() if self._book.failures else None
        c = self._book.attach(kind, windows, time.monotonic(), restarts, grace)
        self._push()
        asyncio.get_running_loop().create_task(self._watch_link(c.id, link))
        return Attached(c.id, tuple(self._book.history(c)), resumed_after, dropped)

    async def _ranks_dropped(self) -> int | None:
        """The steps the ranks dropped so far (their node actors' count), ``None`` if unknown."""
        if not self._node_ips:  # no real node actors (not registered yet, or impersonated ones)
            return None
        try:
            figures = await asyncio.wait_for(asyncio.gather(*(a.status.remote() for a in self._nodes.values())), 5.0)
        except Exception:  # noqa: BLE001 - a figure for the summary, never a reason to refuse an attach
            return None
        return max((r["dropped"] for f in figures for r in f["ranks"].values()), default=0)

    async def _watch_link(self, cid: int, link: Any) -> None:
        try:
            await link.park.remote()
        except Exception:  # any failure of the park call means the consumer's process is gone
            pass
        self._leave(cid, ConsumerState.FAILED, f"the {self._book.consumers[cid].kind} process (consumer {cid}) died")

    def _leave(self, cid: int, state: ConsumerState, message: str = "") -> None:
        left = self._book.leave(cid, state, message, time.monotonic())
        if left is None:
            return
        if not left.observer and not self._book.attached():
            self._partial.clear()
        self._push()
        self._wake()

    async def run_info(self, timeout: float) -> RunInfo | RunEnd | Waiting:
        """The simulation's layouts, waiting up to ``timeout`` s for it to register."""
        end = time.monotonic() + timeout
        while self._sim is None or not self._nodes:
            if self._end is not None:
                return self._end
            left = end - time.monotonic()
            if left <= 0:
                return Waiting(f"no simulation has registered run {self._run!r} yet")
            await self._wait(left)
        relays = tuple(self._relays)
        return RunInfo(self._sim.size, self._sim.layouts, tuple(self._nodes), self._sim.rank_nodes, relays)

    async def _wait(self, timeout: float) -> None:
        if self._event is None:
            self._event = asyncio.Event()
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            pass

    async def next_steps(
        self,
        consumer: int,
        timeout: float,
        done: tuple[int, tuple[tuple[str, Any], ...]] | None = None,
        seq: int | None = None,
    ) -> list[StepData | RunEnd | Gap] | Waiting:
        """Complete steps in order for ``consumer`` (handed over), or the end of the stream.

        ``done`` = ``(step, sets)`` reports the consumer's last finished step and the steering
        values set meanwhile (as :meth:`done` does) in the same call: one call per batch of
        steps instead of two. ``seq``: the completion's place in the consumer's message order.
        """
        if done is not None:
            self._in_order(consumer, seq, lambda: self._complete(consumer, *done))
        c = self._book.consumers[consumer]
        if c.state != ConsumerState.ATTACHED:
            return [RunEnd(EndReason.ABORTED, f"consumer {consumer} is {c.state.name.lower()}: {c.failure}")]
        c.last_poll = time.monotonic()
        c.polling = True
        try:
            end = time.monotonic() + timeout
            while not c.ready and self._end is None and c.state == ConsumerState.ATTACHED:
                left = end - time.monotonic()
                if left <= 0:
                    return Waiting(self._describe_wait(), self._missing())
                await self._wait(left)
            out: list[StepData | RunEnd | Gap] = list(c.ready)
            c.ready.clear()
            if self._end is not None and not out:
                out.append(self._end)
            return out
        finally:
            c.polling = False
            c.last_poll = time.monotonic()

    def _missing(self) -> dict[str, tuple[int, ...]]:
        if self._sim is None:
            return {}
        if not self._partial:
            return {}
        key = min(self._partial, key=lambda k: k[0])
        missing = [n for u in self._units if u not in self._partial[key] for n in self._unit_nodes[u]]
        return {n[:12]: tuple(r for r, rn in enumerate(self._sim.rank_nodes) if rn == n) for n in missing}

    def _describe_wait(self) -> str:
        if self._sim is None:
            return f"no simulation has registered run {self._run!r}"
        if self._partial:
            step, part = min(self._partial, key=lambda k: k[0])
            what = f"step {step}" if part is None else f"step {step} (the call with {', '.join(part)})"
            miss = "; ".join(f"node {n} (ranks {list(r)})" for n, r in self._missing().items())
            return f"{what} of run {self._run!r} is incomplete: waiting for {miss}"
        return f"run {self._run!r}: no step sent since the last one (simulation busy or stalled)"

    def _in_order(self, consumer: int, seq: int | None, apply: Callable[[], None]) -> None:
        """Apply a consumer's message in its sequence order (Ray may run async calls out of order).

        ``seq`` counts the consumer incarnation's ``set``/``done``/``fail``/``detach`` messages
        from 0; ``None`` (a caller outside any consumer, e.g. ``insitu steer``) applies at once.
        """
        if seq is None:
            apply()
            return
        for ready in self._consumer_order.push(str(consumer), seq, apply):
            ready()

    async def done(
        self, consumer: int, step: int, sets: tuple[tuple[str, Any], ...] = (), seq: int | None = None
    ) -> None:
        """``consumer`` finished every callback of ``step``, which set ``sets``.

        Steering values set during a step travel with its completion, so a rank that
        sees the step completed also sees them (one status push for both).
        """
        self._in_order(consumer, seq, lambda: self._complete(consumer, step, sets))

    def _complete(self, consumer: int, step: int, sets: tuple[tuple[str, Any], ...]) -> None:
        for key, value in sets:
            self._record(key, value, step)
        self._book.done(consumer, step)
        self._push()

    def _record(self, key: str, value: Any, step: int) -> None:
        self._version += 1
        update = SteeringUpdate(self._version, key, value, step)
        for log in (self._steering, self._unpushed):  # re-inserted: the dicts stay in version order
            log.pop(key, None)
            log[key] = update

    async def set(self, key: str, value: Any, step: int, consumer: int = 0, seq: int | None = None) -> int:
        """Record a steering value outside a callback; returns the newest version recorded."""

        def apply() -> None:
            self._record(key, value, step)
            self._push()

        self._in_order(consumer, seq, apply)
        return self._version

    async def fail(self, consumer: int, message: str, seq: int | None = None) -> None:
        """``consumer`` reports a failure (callback exception)."""
        self._in_order(consumer, seq, lambda: self._leave(consumer, ConsumerState.FAILED, message))

    async def detach(self, consumer: int, seq: int | None = None) -> None:
        """``consumer`` is done with this run (after its earlier messages: a detach never hides a failure).

        Returns once applied. A message numbered before it that has not come within
        ``_DETACH_GRACE`` s never will (a signal interrupted its sender between numbering and
        sending it): the detach then applies without it.
        """
        self._in_order(consumer, seq, lambda: self._leave(consumer, ConsumerState.DETACHED, "the analytics detached"))
        end = time.monotonic() + _DETACH_GRACE
        while seq is not None and self._consumer_order.count(str(consumer)) <= seq:
            if time.monotonic() > end:
                log.warning("run %s: consumer %d detached without its messages before #%d", self._run, consumer, seq)
                for ready in self._consumer_order.skip_to(str(consumer), seq):
                    ready()
                break
            await asyncio.sleep(0.05)

    # -- reclamation -----------------------------------------------------------------
    async def _watch(self) -> None:
        while not self._torn_down:
            await asyncio.sleep(0.25)
            if self._book.escalate(time.monotonic()):  # a supervised analytics did not come back in time
                self._push()
            ended_at = self._ended_at if self._end is not None else None
            reason = self._book.reclaim_reason(time.monotonic(), self._cfg.reclaim_deadline, self._sim is not None,
                                               self._created, ended_at)
            if reason:
                log.info("reclaiming run %s: %s", self._run, reason)
                self._teardown()

    def _teardown(self) -> None:
        if self._torn_down:
            return
        self._torn_down = True
        for actor in {**self._relays, **self._nodes}.values():
            ray.kill(actor, no_restart=True)
        self._warm.discard()
        self._nodes.clear()
        self._units.clear()
        self._relays.clear()
        self._book.clear()
        self._partial.clear()
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)


def find_head(run: str, namespace: str) -> Any | None:
    """The head actor of ``run``, or ``None`` if there is none (never created, or reclaimed).

    A head being torn down can still resolve by name after Ray dropped its class (Ray 2.60 then
    fails an assertion inside ``ray.get_actor``): that counts as gone once it lasts 1 s.
    """
    end = time.monotonic() + 1.0
    while True:
        try:
            return ray.get_actor(head_name(run), namespace=namespace)
        except ValueError:
            return None
        except AssertionError:
            if time.monotonic() > end:
                return None
            time.sleep(0.1)


def get_or_create_head(run: str, config: Config) -> Any:
    """Return the head actor of ``run``, creating it if needed (atomic across processes).

    It lives on Ray's head node, the one node every other node reaches (tunneled nodes
    included, see :mod:`insitu.dispatch`): node actors, ranks and analytics talk to it from
    anywhere, and the node actors it creates never need a relay.
    """
    head = HeadActor.options(  # type: ignore[attr-defined]
        name=head_name(run),
        namespace=config.namespace,
        lifetime="detached",
        get_if_exists=True,
        resources={HEAD_RESOURCE: 0.001},
    ).remote(run, config)
    head.ping.remote()
    return head
