"""Callback options (issue 14 items 2-3): partial windows, per-callback error handling."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.conftest import expected_field, finish_sim, run_name, start_sim
from tests.test_consumers import SHAPE, start_ana, wait_consumers

pytestmark = pytest.mark.cluster


def _lines(proc: Any) -> list[dict[str, Any]]:
    out, _ = proc.communicate(timeout=120)
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_a_partial_window_calls_from_the_first_step_with_the_steps_so_far(cluster: Any) -> None:
    run = run_name("partial")
    ana = start_ana(cluster, {"run": run, "window": 3, "partial": True})
    wait_consumers(run, 1)
    result = finish_sim(start_sim(cluster, 2, {"run": run, "steps": 5}))
    assert result.returncode == 0, result.stderr[-2000:]
    got = [e for e in _lines(ana) if "step" in e]
    assert ana.returncode == 0
    assert [e["window"] for e in got] == [[0], [0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4]]
    assert [e["mean"] for e in got] == pytest.approx([expected_field(s, SHAPE).mean() for s in range(5)])


@pytest.mark.parametrize("handler_raises", [False, True])
def test_on_error_handles_one_callback_and_a_raising_handler_fails_it(cluster: Any, handler_raises: bool) -> None:
    run = run_name("onerr")
    ana = start_ana(cluster, {"run": run, "fail_at": 3, "handle": True, "handler_raises": handler_raises})
    wait_consumers(run, 1)
    result = finish_sim(start_sim(cluster, 2, {"run": run, "steps": 6}))
    assert result.returncode == 0, result.stderr[-2000:]  # policy continue: the simulation finishes either way
    lines = _lines(ana)
    handled = [e["handled"] for e in lines if "handled" in e and "done" not in e]
    if handler_raises:
        assert handled == [3] and ana.returncode != 0  # the handler gave up: a callback failure
        assert not [e for e in lines if "done" in e]
    else:
        assert ana.returncode == 0
        assert handled == [3, 4, 5]  # every failing step went to the handler; the run went on
        (done,) = [e for e in lines if "done" in e]
        assert done == {"done": 6, "handled": {"step": 3}, "incarnation": 1, "resumed_after": None,
                        "dropped_before": None}  # fmt: skip
        assert [e["step"] for e in lines if "step" in e and "mean" in e] == list(range(6))
