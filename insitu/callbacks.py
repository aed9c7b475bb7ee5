"""Running an analytics' callbacks: errors to their handlers, blocks lost with a restarted node
process, bypassed calls, and the windows a :class:`~insitu.messages.Gap` empties.

Mixed into :class:`~insitu.analytics.Analytics`, whose state it uses.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from insitu.config import When
from insitu.errors import BlocksLostError
from insitu.messages import Gap
from insitu.outcome import lost_to_restart

__all__ = ["Callback", "CallbackRunner"]

log = logging.getLogger(__name__)


@dataclass
class Callback:
    """One registered callback and its windows (per array, its last ``window`` steps)."""

    fn: Callable[..., Any]
    arrays: tuple[str, ...]
    window: int
    history: dict[str, deque[tuple[int, Any]]]
    """Per array: its last ``window`` steps (each array at its own cadence)."""
    partial: bool = False
    on_error: Callable[[int, BaseException], Any] | None = None
    when: When = When.ALL


class CallbackRunner:
    """See the module docstring."""

    run_name: str
    info: Any
    bypass: Any
    config: Any
    _callbacks: list[Callback]
    _head: Any
    _gaps: list[Gap]
    _lost: list[int]
    _on_gap: list[Callable[[Gap], None]]
    _handled: dict[str, int]
    bypassed: dict[str, int]
    _dispatcher: Any

    if TYPE_CHECKING:  # the analytics' own

        def blocks(self, array: Any) -> dict[tuple[int, ...], Any]: ...

    def _gap(self, gap: Gap) -> None:
        """A node process was restarted: empty the windows holding its (dead) blocks, tell the handlers."""
        assert self.info is not None
        on_node = {lay.name for lay in self.info.layouts
                   if any(self.info.rank_nodes[r] == gap.node for _, r in lay.owners)}  # fmt: skip
        emptied = sorted({s for cb in self._callbacks for n, w in cb.history.items() if n in on_node for s, _ in w})
        for cb in self._callbacks:
            for name in on_node & set(cb.history):
                cb.history[name].clear()
        self._gaps.append(gap)
        log.warning("run %s: the insitu process of node %s died and was restarted; steps %d..%d will not come, "
                    "windows emptied of steps %s", self.run_name, gap.node_ip, gap.after + 1, gap.resume - 1,
                    emptied)  # fmt: skip
        for fn in self._on_gap:
            fn(gap)

    def _call_handled(self, cb: Callback, step: int, kwargs: dict[str, list[Any]]) -> None:
        """The callback (its ``.compute()`` finds our scheduler through the router), errors to its handler."""
        try:
            self._call(cb, step, kwargs)
        except Exception as exc:
            nodes = lost_to_restart(self._head, exc)
            if nodes is None and cb.on_error is None:
                raise
            if nodes is not None:
                exc = BlocksLostError(
                    f"step {step}: blocks of callback {cb.fn.__name__}'s arrays died with the insitu process of "
                    f"node(s) {[n[:12] for n in nodes]}, which was restarted; the step cannot be computed",
                    step=step, nodes=nodes,
                )  # fmt: skip
                if cb.on_error is None:
                    log.warning("%s", exc)
                    if step not in self._lost:
                        self._lost.append(step)
                    return
            assert cb.on_error is not None
            log.warning("callback %s failed at step %d (handled by %s): %s: %s", cb.fn.__name__, step,
                        getattr(cb.on_error, "__name__", "on_error"), type(exc).__name__, exc)  # fmt: skip
            cb.on_error(step, exc)  # a handler that raises fails the callback
            self._handled[cb.fn.__name__] = self._handled.get(cb.fn.__name__, 0) + 1

    def _call(self, cb: Callback, step: int, kwargs: dict[str, list[Any]]) -> None:
        """Run one callback, or its bypass: a Ray task on the node holding its first block."""
        if self.bypass is None:
            cb.fn(step, **kwargs)
            return
        decision = self.bypass.decide(cb.fn.__name__, [f"{n}:{step}" for n in cb.arrays], step)
        if decision is None:
            with self.bypass.installed():
                cb.fn(step, **kwargs)
            return
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node = next(iter(self.blocks(kwargs[cb.arrays[0]][-1]).values())).node
        options = {"num_cpus": 0}
        if node:
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=False)
        self._dispatcher.task(self.bypass.stub(decision), step, options=options).get(timeout=self.config.deadline)
        self.bypassed[cb.fn.__name__] = self.bypassed.get(cb.fn.__name__, 0) + 1
