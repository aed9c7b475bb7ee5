"""Small frozen messages that cross process boundaries.

Three channels exist:

* rank 0 <-> run driver: a Unix stream socket on rank 0's host carrying the
  ``RegisterRun``/``AbortRun``/``RunRegistered``/``DriverRefused``/``DriverHello``
  dataclasses (see :mod:`insitu.driver`), once per run;

* rank <-> node actor: a Unix stream socket on the rank's host carrying
  :class:`Wire`-tagged tuples (see :mod:`insitu.transport`); the chunk bytes
  themselves go through a shared-memory staging file.
* node actor -> head actor -> analytics: Ray actor calls carrying the
  dataclasses below (object refs inside them are borrowed, never copied).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from insitu.config import Config
from insitu.layout import ArrayLayout

__all__ = [
    "AbortRun",
    "AnalyticsState",
    "Attached",
    "ChunkRef",
    "DriverHello",
    "Gap",
    "DriverRefused",
    "EndReason",
    "GroupStep",
    "NodeStep",
    "RegisterRun",
    "RunEnd",
    "RunInfo",
    "RunRegistered",
    "SimInfo",
    "Status",
    "SteeringUpdate",
    "StepData",
    "Waiting",
    "Wire",
]


class Wire(enum.IntEnum):
    """Tags of the rank <-> node-actor socket protocol."""

    HELLO = 1  # rank -> node: (HELLO, rank, staging path, arrays, slots, stride)
    WELCOME = 2  # node -> rank: (WELCOME,)
    CHUNKS = 3  # rank -> node: (CHUNKS, step, slot, part, seconds): slot -1 if nothing staged, part None = all
    #             arrays, seconds = the send call's time on the rank (insitu status)
    FREE = 4  # node -> rank: (FREE, slot)
    STATUS = 5  # node -> rank: (STATUS, Status)
    CLOSE = 6  # rank -> node: (CLOSE, last step)
    CLOSED = 7  # node -> rank: (CLOSED,)
    ERROR = 8  # node -> rank: (ERROR, message)
    COUNTS = 9  # rank -> node: (COUNTS, skipped, dropped, reason) when a step is skipped or dropped


class AnalyticsState(enum.IntEnum):
    """What the ranks are told of a run's consumers: none yet, at least one attached, or all
    gone (the last one left, or failed). A consumer attaching later makes it ``ATTACHED`` again."""

    PENDING = 0
    ATTACHED = 1
    RESTARTING = 2
    """A supervised analytics failed and is being restarted: steps are dropped, never raised on."""
    DETACHED = 3
    FAILED = 4


class EndReason(enum.StrEnum):
    """Why a run's stream ended."""

    CLOSED = "closed"
    SIMULATION_FAILED = "simulation-failed"
    ABORTED = "aborted"
    NODE_LOST = "node-lost"
    STOPPED = "stopped"
    """This analytics left on request (:meth:`insitu.Analytics.stop`); the run goes on without it."""


@dataclass(frozen=True, slots=True)
class SteeringUpdate:
    """One ``Analytics.set``: applied by the ranks once they agree on ``version``."""

    version: int
    key: str
    value: Any
    step: int


@dataclass(frozen=True, slots=True)
class Status:
    """Head -> node -> ranks: what the analytics completed and what it asks for."""

    completed: int
    analytics: AnalyticsState
    updates: tuple[SteeringUpdate, ...] = ()
    failure: str = ""
    seq: int = 0
    """Push number: node actors apply statuses in this order (Ray may reorder async actor calls)."""


@dataclass(frozen=True, slots=True)
class SimInfo:
    """What rank 0 registers with the head: layouts and where every rank lives."""

    size: int
    layouts: tuple[ArrayLayout, ...]
    rank_nodes: tuple[str, ...]
    in_flight: int
    raise_on_failure: bool = False
    """The simulation's policy is ``raise``: any consumer's failure is reported to the ranks."""


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """One block of one array at one step, held in the object store of ``node``.

    The node actor stores the blocks of one array of its node's step as one object (one
    ``ray.put`` per node, step and array): ``index`` is this block's position in that
    object's tuple. Built by the consumer from a :class:`StepData` part and the layouts.
    """

    array: str
    block: tuple[int, ...]
    ref: Any
    node: str
    index: int


@dataclass(frozen=True, slots=True)
class NodeStep:
    """The single message a node actor sends the head per step: one object ref per array.

    ``refs[i]`` holds the tuple of this node's blocks of ``arrays[i]`` in rank order; which
    block each is follows from the layouts and the rank-to-node map registered once, so no
    per-block record crosses any process per step (:func:`insitu.graph.expand_parts`).
    """

    node: str
    step: int
    arrays: tuple[str, ...]
    refs: tuple[Any, ...]
    seq: int = 0
    """Per-node message number: the head handles a node's messages in this order."""
    part: tuple[str, ...] | None = None
    """The arrays of the simulation's call (``None``: every declared array). A step sent in
    several calls yields one message per call; nodes holding no block of them send none in
    ``arrays``, so every node sends one message per call."""
    epoch: int = 0
    """The node process' incarnation (0, then 1, 2, ... after restarts); ``seq`` counts per epoch."""


@dataclass(frozen=True, slots=True)
class GroupStep:
    """A relay's single message to the head per step: one *group object* ref per array.

    ``refs[i]`` holds, for ``arrays[i]``, the tuple of ``(node, ref)`` of every node of the
    relay's group (put by the relay, so the head handles one ref per relay and array, never
    one per node); consumers resolve it (:meth:`insitu.analytics.Analytics` does).
    """

    relay: str
    step: int
    arrays: tuple[str, ...]
    refs: tuple[Any, ...]
    seq: int = 0
    """Per-relay message number: the head handles a relay's messages in this order."""
    part: tuple[str, ...] | None = None
    """The arrays of the simulation's call (see :attr:`NodeStep.part`)."""


@dataclass(frozen=True, slots=True)
class StepData:
    """A complete call of a step, served to a consumer in order: ``(array, unit, ref)`` per part.

    A step sent in several calls (arrays at their own cadence) arrives as several
    ``StepData`` of the same ``step``, in call order, each with the arrays of its call.

    ``unit`` is a node id (``ref`` holds that node's blocks of the array) or the name of a
    step relay listed in ``RunInfo.relays`` (``ref`` holds ``(node, ref)`` pairs of its group).
    """

    step: int
    parts: tuple[tuple[str, str, Any], ...]


@dataclass(frozen=True, slots=True)
class Gap:
    """Steps a consumer will never get because the insitu process of a node died and was
    restarted (handed over in the stream, before the first step after the gap).

    ``after`` is the last step complete before the loss (-1: none), ``resume`` the first
    step complete after the restart; the steps in between were dropped (by the ranks while
    their node process was down, or by the head as incomplete: ``incomplete``). Blocks of
    that node held in windows or retained steps died with its process (``lost_retained``
    lists the retained steps removed at the head; the analytics clears its windows itself).
    """

    node: str
    node_ip: str
    after: int
    resume: int
    incomplete: tuple[int, ...] = ()
    lost_retained: tuple[int, ...] = ()

    @property
    def missing(self) -> range:
        """The steps between ``after`` and ``resume`` (those the simulation sent are lost)."""
        return range(self.after + 1, self.resume)


@dataclass(frozen=True, slots=True)
class Attached:
    """Head -> consumer on attach: its incarnation number and the retained steps that refill
    its windows (oldest first; empty for the run's first consumer, which gets every step)."""

    consumer: int
    history: tuple[StepData, ...] = ()
    resumed_after: int | None = None
    """For a consumer attaching after another failed: the last step its predecessor finished
    (the steps after it, up to this consumer's first, are the gap)."""
    dropped: int | None = None
    """For such a consumer: the steps the simulation had dropped when it attached (the ranks'
    count, from the node actors; the same on every rank)."""


@dataclass(frozen=True, slots=True)
class RunInfo:
    """What the analytics learns when the simulation is known."""

    size: int
    layouts: tuple[ArrayLayout, ...]
    nodes: tuple[str, ...]
    rank_nodes: tuple[str, ...] = ()
    """Node id of every rank (where each block lives)."""
    relays: tuple[str, ...] = ()
    """Step relays of the run: parts from them are group objects (see :class:`GroupStep`)."""


@dataclass(frozen=True, slots=True)
class RunEnd:
    """End of stream: every step before it has been served."""

    reason: EndReason
    message: str = ""
    last_step: int = -1


@dataclass(frozen=True, slots=True)
class Waiting:
    """Returned on a poll timeout: what the head is waiting for."""

    description: str
    missing: dict[str, tuple[int, ...]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RegisterRun:
    """Rank 0 -> run driver: register the simulation (validated layouts, every rank's node setting)."""

    config: Config
    size: int
    layouts: tuple[ArrayLayout, ...]
    node_settings: tuple[str | None, ...]


@dataclass(frozen=True, slots=True)
class RunRegistered:
    """Run driver -> rank 0: every rank's node id and each node actor's socket address."""

    rank_nodes: tuple[str, ...]
    addresses: dict[str, str]


@dataclass(frozen=True, slots=True)
class DriverRefused:
    """Run driver -> rank 0: the registration failed (every rank raises this message)."""

    message: str


@dataclass(frozen=True, slots=True)
class AbortRun:
    """Rank 0 -> run driver: the set-up failed after registration; reclaim the run now."""

    reason: str
    registered: bool


@dataclass(frozen=True, slots=True)
class DriverHello:
    """Run driver -> client: greeting on connect, and acknowledgement of an ``AbortRun``."""

    pid: int
