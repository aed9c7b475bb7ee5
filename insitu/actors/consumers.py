"""The head's book of a run's consumers and of the steps it retains for them.

Plain Python (no Ray), owned by :class:`insitu.actors.head.HeadActor` and unit-tested
on its own. A consumer is an analytics, a recorder, a snapshot reader or an analytics
restarted after a crash: each has its own queue of complete steps, its windows per
array, an incarnation number and its share of back-pressure.

Retention rule (per array ``A``): the head keeps the chunks of ``A`` only for the
``W_A - 1`` steps of ``A`` (arrays come at their own cadence) before the oldest step an
attached consumer has not finished, where
``W_A`` is the largest window over ``A`` of the run's consumers (departed ones included,
so that an analytics restarted after a crash finds its windows refilled); consumers keep
their own windows and their queues. A block of ``A`` therefore lives at most
``W_A + in-flight steps`` steps, and a consumer attaching to a live run gets its windows
refilled from what is retained.

Examples
--------
>>> from insitu.messages import StepData
>>> book = ConsumerBook()
>>> first = book.attach("analytics", {"u": 2}, now=0.0)
>>> for s in range(3):
...     book.deliver(StepData(s, (("u", "node-a", f"ref{s}"),)))
>>> [d.step for d in first.ready]
[0, 1, 2]
>>> for s in range(3):
...     book.done(first.id, s)
>>> late = book.attach("recorder", {"u": 2}, now=1.0)
>>> [d.step for d in book.history(late)], late.completed
([2], 2)
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from insitu.messages import AnalyticsState, Gap, StepData

__all__ = ["OBSERVER_QUEUE", "Consumer", "ConsumerBook", "ConsumerKind", "ConsumerState"]

NO_STEP = -(2**62)
OBSERVER_QUEUE = 2
"""Steps queued at most for an observer (older ones are replaced by newer: it sees the latest)."""


class ConsumerKind(enum.StrEnum):
    """What a consumer is. An observer (``MONITOR``) never holds the simulation back: it is not
    counted in back-pressure, in the failure policy or as the run's first consumer, it queues at
    most :data:`OBSERVER_QUEUE` steps (the latest), and its death is only its own."""

    ANALYTICS = "analytics"
    MONITOR = "monitor"


class ConsumerState(enum.IntEnum):
    """Where one consumer stands."""

    ATTACHED = 1
    DETACHED = 2
    FAILED = 3


@dataclass
class Consumer:
    """One attached (or former) consumer of a run."""

    id: int
    """Incarnation number: attach order within the run, from 1."""
    kind: str
    windows: dict[str, int]
    """Arrays it reads, each with its largest window."""
    last_poll: float
    ready: deque[StepData | Gap] = field(default_factory=deque)
    completed: int = NO_STEP
    state: ConsumerState = ConsumerState.ATTACHED
    failure: str = ""
    polling: bool = False
    steps_done: int = 0
    restarts: int = -1
    """Restarts its supervisor has left after it (-1: not supervised)."""
    grace: float = 0.0
    """Seconds to wait for its restart before its failure counts as final."""
    stderr_tail: str = ""
    """Its last stderr lines, handed over by its restarted successor (supervised analytics)."""

    @property
    def observer(self) -> bool:
        """A monitor's reader: sees the latest steps, holds nothing back (:class:`ConsumerKind`)."""
        return self.kind == ConsumerKind.MONITOR

    def share(self, data: StepData) -> StepData:
        """``data`` restricted to the arrays this consumer reads (it holds no other chunk)."""
        return StepData(data.step, tuple(p for p in data.parts if p[0] in self.windows))


class ConsumerBook:
    """Consumers, their queues and the retained steps of one run (see the module docstring)."""

    def __init__(self, raise_on_failure: bool = False) -> None:
        self.consumers: dict[int, Consumer] = {}
        self.raise_on_failure = raise_on_failure
        self.last_step = NO_STEP
        self.failures = 0
        self.last_failure = ""
        self._backlog: deque[StepData] = deque()
        self._retained: dict[str, deque[tuple[int, tuple[tuple[str, str, Any], ...]]]] = {}
        self._left = AnalyticsState.PENDING
        self._failed_since_attach = False
        self.restart_until: float | None = None
        """While a supervised consumer is being restarted: when its failure becomes final."""
        self.lost_after: int | None = None
        """The last step a consumer that failed had finished (the start of a gap)."""

    # -- membership ----------------------------------------------------------------------
    def attached(self) -> list[Consumer]:
        """Consumers currently attached, observers excepted."""
        return [c for c in self.consumers.values() if c.state == ConsumerState.ATTACHED and not c.observer]

    def had_consumers(self) -> bool:
        """Whether a consumer other than an observer ever attached."""
        return any(not c.observer for c in self.consumers.values())

    def attach(self, kind: str, windows: dict[str, int], now: float, restarts: int = -1,
               grace: float = 0.0) -> Consumer:  # fmt: skip
        """A new consumer: the first gets every step so far, a later one starts at the next step.

        ``restarts``/``grace``: a supervised consumer (restarts its supervisor has left after it,
        seconds to wait for the restart); see :meth:`leave`.
        """
        c = Consumer(len(self.consumers) + 1, kind, dict(windows), now, restarts=restarts, grace=grace)
        if c.observer:  # starts at the next step; takes nothing from the backlog, changes no policy
            c.completed = self.last_step
            self.consumers[c.id] = c
            return c
        first = not self.had_consumers()
        self.restart_until = None
        if first:
            c.ready.extend(c.share(d) for d in self._backlog)
            self._backlog.clear()
        else:
            c.completed = self.last_step
        self.consumers[c.id] = c
        self._failed_since_attach = False
        return c

    def history(self, c: Consumer) -> list[StepData]:
        """Retained steps that refill ``c``'s windows (oldest first; at most window - 1 per array)."""
        by_step: dict[int, list[tuple[str, str, Any]]] = {}
        for array, window in c.windows.items():
            if window <= 1:
                continue
            kept = [(s, ch) for s, ch in self._retained.get(array, ()) if s <= self.last_step]
            for step, chunks in kept[-(window - 1) :]:
                by_step.setdefault(step, []).extend(chunks)
        return [StepData(s, tuple(by_step[s])) for s in sorted(by_step)]

    def leave(self, cid: int, state: ConsumerState, failure: str = "", now: float = 0.0) -> Consumer | None:
        """``cid`` detached or failed: its queue is dropped, it no longer holds anything back.

        A supervised consumer that fails with restarts left leaves the run ``RESTARTING`` (the
        ranks drop steps, and policy ``raise`` does not apply) until a consumer attaches or
        ``grace`` seconds pass (:meth:`escalate`).
        """
        c = self.consumers.get(cid)
        if c is None or c.state != ConsumerState.ATTACHED:
            return None
        c.state = state
        c.failure = failure
        c.ready.clear()
        if c.observer:
            return c
        if state == ConsumerState.FAILED:
            self.failures += 1
            self.last_failure = failure
            self.lost_after = c.completed
            if c.restarts > 0:
                self.restart_until = now + c.grace
                self._left = AnalyticsState.RESTARTING
            else:
                self._failed_since_attach = True
                self._left = AnalyticsState.FAILED
        elif self.restart_until is None and (self._left != AnalyticsState.FAILED or self.attached()):
            self._left = AnalyticsState.DETACHED
        self._prune()
        return c

    def escalate(self, now: float) -> bool:
        """A restart that did not come within its grace: the failure is final. Whether it changed."""
        if self.restart_until is None or now < self.restart_until or self.attached():
            return False
        self.restart_until = None
        self._failed_since_attach = True
        self._left = AnalyticsState.FAILED
        return True

    # -- steps ---------------------------------------------------------------------------
    def deliver(self, data: StepData) -> None:
        """A complete step: queue it for every attached consumer and retain it."""
        self.last_step = max(self.last_step, data.step)
        for c in self.consumers.values():
            if c.observer and c.state == ConsumerState.ATTACHED and any(p[0] in c.windows for p in data.parts):
                c.ready.append(c.share(data))
                while len(c.ready) > OBSERVER_QUEUE:
                    c.ready.popleft()
        if not self.had_consumers():
            self._backlog.append(data)  # the run's first consumer gets every step
            return
        for c in self.attached():
            c.ready.append(c.share(data))
        for part in data.parts:
            if self._window(part[0]) > 1:
                q = self._retained.setdefault(part[0], deque())
                if not q or q[-1][0] != data.step:
                    q.append((data.step, ()))
                q[-1] = (data.step, (*q[-1][1], part))
        self._prune()

    def done(self, cid: int, step: int) -> None:
        """Consumer ``cid`` finished ``step``."""
        c = self.consumers.get(cid)
        if c is not None and c.state == ConsumerState.ATTACHED and step > c.completed:
            c.completed = step
            c.steps_done += 1
            self._prune()

    def completed(self) -> int:
        """The step every attached consumer finished (back-pressure for the ranks)."""
        att = self.attached()
        if att:
            return min(c.completed for c in att)
        return self.last_step if self.had_consumers() else NO_STEP

    def sim_state(self) -> AnalyticsState:
        """What the ranks are told: attached while any consumer is (unless policy ``raise`` saw a failure)."""
        if self.raise_on_failure and self._failed_since_attach:
            return AnalyticsState.FAILED
        if self.attached():
            return AnalyticsState.ATTACHED
        return self._left

    def retained_steps(self) -> dict[str, list[int]]:
        """Steps the head retains, per array (for tests and ``stats``)."""
        return {a: [s for s, _ in q] for a, q in self._retained.items()}

    def describe(self, now: float) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """For ``insitu status``: each consumer's figures, and the steps held per array (retained for
        windows, or queued for an attached consumer)."""
        last = None if self.last_step == NO_STEP else self.last_step
        consumers = []
        for c in self.consumers.values():
            completed = None if c.completed == NO_STEP else c.completed
            consumers.append({
                "incarnation": c.id, "kind": c.kind, "state": c.state.name.lower(), "completed": completed,
                "lag": None if last is None or completed is None else last - completed, "queued": len(c.ready),
                "steps_done": c.steps_done, "windows": dict(c.windows), "failure": c.failure,
                "stderr_tail": c.stderr_tail, "polling_age_s": round(now - c.last_poll, 3),
            })  # fmt: skip
        steps: dict[str, set[int]] = {a: {s for s, _ in q} for a, q in self._retained.items()}
        for c in (c for c in self.consumers.values() if c.state == ConsumerState.ATTACHED):
            for d in c.ready:  # a step queued for several consumers, or also retained, is held once
                for a in {p[0] for p in d.parts} if isinstance(d, StepData) else ():
                    steps.setdefault(a, set()).add(d.step)
        return consumers, {a: len(held) for a, held in steps.items()}

    def reclaim_reason(self, now: float, grace: float, registered: bool, created: float,
                       ended_at: float | None) -> str:  # fmt: skip
        """Why the run's head should reclaim the run now ("" if it should not): ``registered``, whether
        a simulation registered; ``ended_at``, when it ended (``None`` while it goes on)."""
        attached = self.attached()
        gone = self.had_consumers() and not attached
        if ended_at is not None:
            if gone:
                return "both sides are done"
            if not self.had_consumers() and now - ended_at > grace:
                return f"no analytics attached within {grace:.0f} s of the simulation's end"
            idle = [c for c in attached if not c.polling and now - max(c.last_poll, ended_at) > grace]
            if attached and len(idle) == len(attached):
                return f"no consumer polled for {grace:.0f} s after the simulation's end"
            return ""
        if not registered and gone:
            return "the analytics left before any simulation registered"
        if not registered and not self.had_consumers() and now - created > grace:
            return f"nobody attached within {grace:.0f} s"
        return ""

    def lose_node(self, node: str) -> tuple[int, ...]:
        """The blocks of ``node`` died with its process (restarted): drop every queued, backlogged
        and retained step holding one; return those steps."""
        lost: set[int] = set()

        def holds(d: StepData) -> bool:
            return any(p[1] == node for p in d.parts)

        for q in [c.ready for c in self.consumers.values()] + [self._backlog]:
            kept = [d for d in q if not (isinstance(d, StepData) and holds(d))]
            lost.update(d.step for d in q if isinstance(d, StepData) and holds(d))
            q.clear()
            q.extend(kept)
        for array, retained in self._retained.items():
            gone = {s for s, parts in retained if any(p[1] == node for p in parts)}
            lost.update(gone)
            self._retained[array] = deque((s, p) for s, p in retained if s not in gone)
        return tuple(sorted(lost))

    def deliver_gap(self, gap: Gap) -> None:
        """Queue ``gap`` for every attached consumer, before the steps after it."""
        for c in self.consumers.values():
            if c.state == ConsumerState.ATTACHED:
                c.ready.append(gap)

    def clear(self) -> None:
        """Drop every queue and retained step (the run ended badly or is reclaimed)."""
        for c in self.consumers.values():
            c.ready.clear()
        self._backlog.clear()
        self._retained.clear()

    def _window(self, array: str) -> int:
        """Largest window over ``array`` of any consumer the run had: a consumer that died keeps
        its windows retained, so an analytics restarted after a crash finds them refilled."""
        return max((c.windows.get(array, 0) for c in self.consumers.values() if not c.observer), default=0)

    def _prune(self) -> None:
        for array, q in self._retained.items():
            readers = [c for c in self.attached() if array in c.windows]
            oldest_open = min((c.completed for c in readers), default=self.last_step) + 1
            # the W - 1 steps *of this array* before the oldest open one (arrays have their own cadence)
            finished = sum(1 for s, _ in q if s < oldest_open)
            for _ in range(finished - (self._window(array) - 1)):
                q.popleft()
