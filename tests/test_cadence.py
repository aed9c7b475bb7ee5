"""Arrays at their own cadence (issue 14 item 1), with real mpiexec over the session's two raylets.

The test simulation (``tests/sims/sim.py``) declares ``u`` (f8) and ``w = -u`` (f4) and sends
``u`` every step and ``w`` every 3rd step, either in one call or in a call per array
(``send(s, u=u)`` then ``send(s, w=w)``). Bad input comes from rank 1 only.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np
import pytest

from tests.conftest import expected_field, finish_sim, run_name, start_sim
from tests.test_consumers import start_ana, wait_consumers
from tests.test_failures import make_analytics, same_everywhere

pytestmark = pytest.mark.cluster

SHAPE = (8, 6)


def _values(window: list[Any]) -> list[tuple[int, np.ndarray]]:
    return [(int(a.step), np.asarray(a.compute())) for a in window]


def test_arrays_at_their_own_cadence_in_separate_calls(cluster: Any) -> None:
    """``u`` every step and ``w`` every 3rd step in a call of its own; ``when`` and per-array windows;
    a repeated array (step 6) and a missing block (step 7) on rank 1 only reject that call on every rank."""
    run = run_name("cadence")
    analytics = make_analytics(run)
    got: dict[str, list[Any]] = {"all": [], "any": [], "w2": [], "u3": []}

    @analytics.on_step("u", "w")  # when="all": steps carrying both
    def both(step: int, u: list, w: list) -> None:
        got["all"].append((step, _values(u), _values(w)))
        if step == 3:
            analytics.set("seen", step)

    @analytics.on_step("w", "u", when="any")  # at a step's first call carrying any: u (w comes later)
    def either(step: int, u: list, w: list) -> None:
        got["any"].append((step, [s for s, _ in _values(u)], [s for s, _ in _values(w)]))

    @analytics.on_step("w", window=2)  # w's own last two steps
    def w_pairs(step: int, w: list) -> None:
        got["w2"].append((step, [s for s, _ in _values(w)]))

    @analytics.on_step("u", window=3, partial=True)
    def u_triples(step: int, u: list) -> None:
        got["u3"].append((step, [s for s, _ in _values(u)]))

    faults = {"6": {"rank": 1, "kind": "repeat"}, "7": {"rank": 1, "kind": "missing"}}
    opts = {"run": run, "steps": 10, "second": True, "cadence": {"u": 1, "w": 3}, "split": True, "faults": faults,
            "report_keys": ["seen"]}  # fmt: skip
    proc = start_sim(cluster, 4, opts)
    summary = analytics.run()
    result = finish_sim(proc)
    assert result.returncode == 0, result.stderr[-3000:]

    errors = {r: {e["step"]: e["error"] for e in evs} for r, evs in result.by_rank("send-error").items()}
    errors = same_everywhere(errors, 4)
    assert sorted(errors) == [6, 7]
    assert errors[6].startswith("SendError: rank 1: array(s) ['u'] were already sent at step 6"), errors[6]
    assert errors[7].startswith("SendError: rank 1: array 'u' is missing (this rank owns block"), errors[7]
    # back-pressure and the counters count steps, not calls: step 7's only call was rejected
    done = same_everywhere({r: (e["sent"], e["skipped"], e["dropped"]) for r, e in result.one("done").items()}, 4)
    assert done == (9, 0, 0)
    # steering is applied at a step's first call, on every rank at the same step
    seen = same_everywhere({r: [(e["step"], e["values"]["seen"]) for e in evs]
                            for r, evs in result.by_rank("calls").items()}, 4)  # fmt: skip
    first = next(s for s, v in seen if v == 3)
    assert first > 3 and all(v == 3 for s, v in seen if s >= first), seen

    # when="all": the steps carrying both arrays (step 6's w call was rejected), values exact
    assert [s for s, _, _ in got["all"]] == [0, 3, 9]
    for step, u, w in got["all"]:
        assert [s for s, _ in u] == [step] and [s for s, _ in w] == [step]
        np.testing.assert_array_equal(u[0][1], expected_field(step, SHAPE))
        np.testing.assert_array_equal(w[0][1], -expected_field(step, SHAPE, "f4"))
        assert w[0][1].dtype == np.float32
    # when="any": every step with u, at u's call; w arrives in a later call of the step: empty
    assert got["any"] == [(s, [s], []) for s in (0, 1, 2, 3, 4, 5, 6, 8, 9)]
    # per-array windows: w's own steps, the first full at w's second step
    assert got["w2"] == [(3, [0, 3]), (9, [3, 9])]
    assert got["u3"] == [(0, [0]), (1, [0, 1]), (2, [0, 1, 2]), (3, [1, 2, 3]), (4, [2, 3, 4]), (5, [3, 4, 5]),
                         (6, [4, 5, 6]), (8, [5, 6, 8]), (9, [6, 8, 9])]  # fmt: skip
    assert summary.steps == 9 and summary.last_step == 9


def test_a_subset_in_one_call_and_a_consumer_of_the_rare_array(cluster: Any) -> None:
    """``u`` every step and ``w`` every 3rd step in the same call: ``when="any"`` gets ``w`` only
    at its steps, ``when="all"`` runs at those steps only; a second consumer reading ``w`` alone
    never holds the simulation back (back-pressure ``block`` with one step in flight)."""
    run = run_name("subset")
    analytics = make_analytics(run)
    got: dict[str, list[Any]] = {"any": [], "all": []}

    @analytics.on_step("u", "w", when="any")
    def either(step: int, u: list, w: list) -> None:
        got["any"].append((step, [a.step for a in u], [a.step for a in w]))
        if w:
            np.testing.assert_array_equal(w[0].compute(), -expected_field(step, SHAPE, "f4"))

    @analytics.on_step("u", "w")
    def both(step: int, u: list, w: list) -> None:
        got["all"].append(step)

    summary: list[Any] = []
    thread = threading.Thread(target=lambda: summary.append(analytics.run()))
    thread.start()
    wait_consumers(run, 1)
    rare = start_ana(cluster, {"run": run, "array": "w"})  # a consumer of w alone
    wait_consumers(run, 2)
    opts = {"run": run, "steps": 8, "second": True, "cadence": {"u": 1, "w": 3},
            "config": {"in_flight": 1, "backpressure": "block", "deadline": 30}}  # fmt: skip
    result = finish_sim(start_sim(cluster, 4, opts))
    thread.join(120)
    out, _ = rare.communicate(timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not result.by_rank("send-error")
    calls = same_everywhere({r: [e["arrays"] for e in evs] for r, evs in result.by_rank("calls").items()}, 4)
    assert calls == [[["u", "w"]] if s % 3 == 0 else [["u"]] for s in range(8)]
    assert got["any"] == [(s, [s], [s] if s % 3 == 0 else []) for s in range(8)]
    assert got["all"] == [0, 3, 6]
    assert summary[0].steps == 8
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert [e["step"] for e in lines if "step" in e] == [0, 3, 6]
    assert [e["mean"] for e in lines if "step" in e] == pytest.approx(
        [-expected_field(s, SHAPE).mean() for s in (0, 3, 6)]
    )
    assert rare.returncode == 0 and lines[-1]["done"] == 3


def test_a_call_with_no_array_is_refused_on_every_rank(cluster: Any) -> None:
    run = run_name("noarray")
    analytics = make_analytics(run)
    seen: list[int] = []
    analytics.on_step("u")(lambda step, u: seen.append(step))
    # every rank sends nothing at step 2 (a cadence that skips u there): refused, the run goes on
    opts = {"run": run, "steps": 4, "second": True, "cadence": {"u": 2, "w": 4}}
    proc = start_sim(cluster, 2, opts)
    analytics.run()
    result = finish_sim(proc)
    assert result.returncode == 0, result.stderr[-3000:]
    errors = same_everywhere({r: {e["step"]: e["error"] for e in evs}
                              for r, evs in result.by_rank("send-error").items()}, 2)  # fmt: skip
    assert sorted(errors) == [1, 3]
    assert errors[1] == "SendError: send(1) carried no array; pass at least one of ['u', 'w']"
    assert seen == [0, 2]
