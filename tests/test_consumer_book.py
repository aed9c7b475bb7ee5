"""Unit tests of the head's consumer book: observers (a monitor's snapshot reader) hold nothing back."""

from __future__ import annotations

from insitu.actors.consumers import OBSERVER_QUEUE, ConsumerBook, ConsumerKind, ConsumerState
from insitu.messages import AnalyticsState, StepData


def _step(s: int, *arrays: str) -> StepData:
    return StepData(s, tuple((a, "node-a", f"{a}{s}") for a in arrays or ("u",)))


def test_an_observer_attached_first_leaves_the_backlog_to_the_first_analytics() -> None:
    book = ConsumerBook()
    watcher = book.attach(ConsumerKind.MONITOR, {"u": 1}, now=0.0)
    for s in range(5):
        book.deliver(_step(s))
    assert [d.step for d in watcher.ready] == list(range(5 - OBSERVER_QUEUE, 5))  # the latest only
    assert book.sim_state() == AnalyticsState.PENDING
    analytics = book.attach(ConsumerKind.ANALYTICS, {"u": 1}, now=1.0)
    assert [d.step for d in analytics.ready] == [0, 1, 2, 3, 4]  # every step so far, as without a monitor
    assert book.sim_state() == AnalyticsState.ATTACHED


def test_an_observer_is_not_counted_in_back_pressure_nor_in_the_failure_policy() -> None:
    book = ConsumerBook(raise_on_failure=True)
    analytics = book.attach(ConsumerKind.ANALYTICS, {"u": 1}, now=0.0)
    watcher = book.attach(ConsumerKind.MONITOR, {"u": 1}, now=0.0)
    for s in range(4):
        book.deliver(_step(s))
        book.done(analytics.id, s)
    assert book.completed() == 3  # the observer finished nothing and holds nothing back
    book.leave(watcher.id, ConsumerState.FAILED, "the monitor process died", now=1.0)
    assert (book.failures, book.sim_state()) == (0, AnalyticsState.ATTACHED)
    book.leave(analytics.id, ConsumerState.FAILED, "boom", now=2.0)
    assert (book.failures, book.sim_state()) == (1, AnalyticsState.FAILED)


def test_an_observer_gets_only_the_arrays_it_reads_and_no_windows_are_retained_for_it() -> None:
    book = ConsumerBook()
    analytics = book.attach(ConsumerKind.ANALYTICS, {"u": 1}, now=0.0)
    watcher = book.attach(ConsumerKind.MONITOR, {"v": 3}, now=0.0)
    book.deliver(_step(0, "u"))
    book.deliver(_step(1, "u", "v"))
    book.done(analytics.id, 1)
    assert [(d.step, [p[0] for p in d.parts]) for d in watcher.ready] == [(1, ["v"])]
    assert book.retained_steps().get("v", []) == []  # an observer's window keeps nothing in the store


def test_held_steps_count_a_step_once_whether_retained_queued_or_both() -> None:
    book = ConsumerBook()
    first = book.attach(ConsumerKind.ANALYTICS, {"u": 2}, now=0.0)
    second = book.attach(ConsumerKind.ANALYTICS, {"u": 1}, now=0.0)
    for s in range(3):
        book.deliver(_step(s))
    assert [d.step for d in first.ready] == [d.step for d in second.ready] == [0, 1, 2]
    _, held = book.describe(now=1.0)
    assert held == {"u": 3}  # retained for first's window and queued for both: three steps, not nine
    for s in range(3):
        book.done(first.id, s)
        book.done(second.id, s)
    first.ready.clear()
    second.ready.clear()
    assert book.describe(now=2.0)[1] == {"u": 1}  # the window of 2 keeps step 2 for first's next call


def test_a_restarted_node_takes_its_queued_and_retained_steps_and_the_gap_goes_to_every_consumer() -> None:
    from insitu.messages import Gap

    def two_nodes(s: int) -> StepData:
        return StepData(s, (("u", "node-a", f"a{s}"), ("u", "node-b", f"b{s}")))

    book = ConsumerBook()
    slow = book.attach(ConsumerKind.ANALYTICS, {"u": 3}, now=0.0)  # retains 2 steps of u for its window
    for s in range(4):
        book.deliver(two_nodes(s))
    book.done(slow.id, 1)
    slow.ready.popleft()
    slow.ready.popleft()  # steps 0 and 1 handed over; 2 and 3 still queued
    book.deliver(StepData(4, (("u", "node-b", "b4"),)))  # a call without blocks on node-a
    lost = book.lose_node("node-a")
    assert lost == (0, 1, 2, 3)  # queued (2, 3) and retained for the window (0, 1); step 4 never held node-a
    assert [d.step for d in slow.ready] == [4]
    assert all(s > 3 for s in book.retained_steps().get("u", []))
    gap = Gap("node-a", "10.0.0.1", after=3, resume=9, lost_retained=lost)
    book.deliver_gap(gap)
    assert list(slow.ready)[-1] is gap and list(gap.missing) == [4, 5, 6, 7, 8]
    consumers, held = book.describe(now=1.0)  # insitu status reads a queue holding a gap
    assert consumers[0]["queued"] == 2 and held == {"u": 1}
