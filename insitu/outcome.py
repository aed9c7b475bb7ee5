"""What an analytics run ends with: its summary, block references, and how a lost node is told apart
from a failing callback (re-exported by :mod:`insitu.analytics`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from insitu.messages import EndReason, Gap, RunEnd

__all__ = ["BlockRef", "RunSummary", "lost_node_end"]


@dataclass(frozen=True, slots=True)
class RunSummary:
    """What :meth:`Analytics.run` saw."""

    steps: int
    """Steps that carried any array this analytics reads (a step sent in several calls counts once)."""
    last_step: int | None
    """The last such step."""
    reason: EndReason
    handled: dict[str, int] = field(default_factory=dict)
    """Exceptions each callback's ``on_error`` handled (by callback name)."""
    incarnation: int = 0
    """This analytics' consumer number in the run (attach order, from 1; higher after a restart)."""
    resumed_after: int | None = None
    """Attached after a consumer failed (e.g. restarted by ``insitu analytics --supervise``): the last
    step the failed one finished. The steps between it and this analytics' first are the gap; the
    simulation counts them (``bridge.stats.dropped``)."""
    dropped_before_attach: int | None = None
    """For such an analytics: the steps the simulation had dropped when it attached (every gap so
    far; steps dropped after the attach, until the ranks learn of it, count in the next figure)."""
    gaps: tuple[Gap, ...] = ()
    """Node processes that died and were restarted while this analytics ran: the steps each cost."""
    lost: tuple[int, ...] = ()
    """Steps whose callbacks could not compute because their blocks died with a node process
    (:class:`~insitu.errors.BlocksLostError`, not handled by an ``on_error``)."""


@dataclass(frozen=True)
class BlockRef:
    """One block of a step's array: ``ray.get(ref)[index]`` is the block; ``node`` holds it."""

    ref: Any
    index: int
    node: str


def lost_node_end(head: Any, exc: BaseException, wait: float = 15.0) -> RunEnd | None:
    """The run's ``NODE_LOST`` end if ``exc`` (a callback's failure) came from Ray losing data or a
    worker (not from the user's code) because a node of the run was lost, else ``None``.

    The head learns of a lost node within seconds (its parked call fails, then it checks the
    raylet); ``head.end()`` is asked for at most ``wait`` seconds.
    """
    import ray

    if not _ray_lost_something(exc):
        return None
    end = time.monotonic() + wait
    while time.monotonic() < end:
        try:
            got = ray.get(head.end.remote(), timeout=wait)
        except ray.exceptions.RayError:
            return None
        if got is not None:
            return got if got.reason == EndReason.NODE_LOST else None
        time.sleep(0.25)
    return None


def _ray_lost_something(exc: BaseException) -> bool:
    """Whether Ray (not the user's code) raised somewhere in ``exc``'s chain: lost data or worker."""
    import ray

    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or e.__context__
    return any(isinstance(x, ray.exceptions.RayError) and not isinstance(x, ray.exceptions.RayTaskError)
               for x in chain)  # fmt: skip


def lost_to_restart(head: Any, exc: BaseException, wait: float = 15.0) -> tuple[str, ...] | None:
    """The restarted nodes if ``exc`` (a callback's failure) came from Ray losing data while the run
    goes on after a node process restart (its blocks died with it), else ``None`` (also when the
    run ended with ``NODE_LOST``: :func:`lost_node_end` then says so)."""
    import ray

    if not _ray_lost_something(exc):
        return None
    end = time.monotonic() + wait
    while time.monotonic() < end:
        try:
            ended, restarted = ray.get(head.losses.remote(), timeout=wait)
        except ray.exceptions.RayError:
            return None
        if ended is not None:
            return None
        if restarted:
            return tuple(restarted)
        time.sleep(0.25)
    return None
