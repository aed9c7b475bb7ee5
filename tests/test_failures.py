"""Bad input, back-pressure, failures of either side, and reclamation (real MPI + Ray)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import pytest

from tests.conftest import ROOT, expected_field, finish_sim, run_name, run_sim, start_sim, wait_gone

pytestmark = pytest.mark.cluster


def make_analytics(run: str, **cfg: Any) -> Any:
    import insitu

    return insitu.Analytics(run=run, deadline=60, **cfg)


def same_everywhere(per_rank: dict[int, Any], ranks: int) -> Any:
    assert len(per_rank) == ranks, per_rank
    values = list(per_rank.values())
    assert all(v == values[0] for v in values), per_rank
    return values[0]


@pytest.mark.parametrize(
    ("layout", "pattern"),
    [("overlap", "overlap"), ("dtype", "disagree on dtype")],
)
def test_bad_layout_raises_the_same_contract_error_on_every_rank(cluster: Any, layout: str, pattern: str) -> None:
    result = run_sim(cluster, 4, {"run": run_name("badlayout"), "layout": layout})
    errors = {r: e["error"] for r, e in result.one("init-error").items()}
    msg = same_everywhere(errors, 4)
    assert msg.startswith("ContractError")
    assert pattern in msg


@pytest.mark.parametrize(
    ("env", "pattern"),
    [
        ({"INSITU_ADDRESS": "127.0.0.1:9"}, "cannot reach Ray"),
        ({"INSITU_NODE": "127.0.0.99"}, "matches no live Ray node"),
    ],
)
def test_setup_failures_reach_every_rank(cluster: Any, env: dict[str, str], pattern: str) -> None:
    nodes = [env.pop("INSITU_NODE")] if "INSITU_NODE" in env else None
    proc = start_sim(cluster, 4, {"run": run_name("badsetup")},
                     env={"INSITU_DEADLINE": "3", "INSITU_STARTUP_DEADLINE": "3", **env}, nodes=nodes)  # fmt: skip
    result = finish_sim(proc)
    errors = {r: e["error"] for r, e in result.one("init-error").items()}
    msg = same_everywhere(errors, 4)
    assert pattern in msg


def test_launcher_task_count_mismatch(cluster: Any, tmp_path: Any) -> None:
    # a singleton MPI process that the launcher believes is one of 4 tasks
    opts = {"run": run_name("launcher"), "events": str(tmp_path)}
    env = {**os.environ, **cluster.environment(), "OMPI_COMM_WORLD_SIZE": "4", "INSITU_DEADLINE": "3"}
    subprocess.run([sys.executable, str(ROOT / "tests/sims/sim.py"), json.dumps(opts)], env=env, timeout=120,
                   capture_output=True, check=False)  # fmt: skip
    (line,) = (tmp_path / "rank0.jsonl").read_text().splitlines()
    assert "launcher started 4 tasks" in json.loads(line)["error"]


def test_every_bad_input_raises_everywhere_and_the_run_goes_on(cluster: Any) -> None:
    run = run_name("badinput")
    kinds = ["shape", "dtype", "unknown", "missing", "notarray", "step", "mismatch", "ragged", "dict", "bigstep"]
    faults = {str(i + 1): {"rank": 1, "kind": k} for i, k in enumerate(kinds)}
    steps = len(kinds) + 3
    proc = start_sim(cluster, 4, {"run": run, "steps": steps, "faults": faults})
    analytics = make_analytics(run)
    got: dict[int, np.ndarray] = {}
    analytics.on_step("u")(lambda step, u: got.__setitem__(step, u[0].compute()))
    analytics.run()
    result = finish_sim(proc)
    assert result.returncode == 0
    errors = result.by_rank("send-error")
    expected = {
        "shape": "SendError: rank 1: sent 'u' with shape",
        "dtype": "SendError: rank 1: sent 'u' with dtype float32",
        "unknown": "SendError: rank 1: unknown array(s) ['w']",
        "missing": "SendError: rank 1: array 'u' is missing",
        "notarray": "SendError: rank 1: 'u' must be a numpy.ndarray; got list",
        "step": "SendError: rank 1: step -1 is below the previous step 0",
        "mismatch": "SendError: ranks 0, 1, 2, 3: ranks passed different steps (7 to 1007)",
        "ragged": "SendError: rank 1: 'u' must be a numpy.ndarray; got list",
        "dict": "SendError: rank 1: 'u' must be a numpy.ndarray; got dict",
        "bigstep": "SendError: rank 1: step 9223372036854775808 is outside the 64-bit range of steps",
    }
    for i, kind in enumerate(kinds):
        per_rank = {r: next(e["error"] for e in evs if e["step"] == i + 1) for r, evs in errors.items()}
        msg = same_everywhere(per_rank, 4)
        assert msg.startswith(expected[kind]), msg
    # nothing of a bad step was published; the good ones were
    assert sorted(got) == [0, *range(len(kinds) + 1, steps)]
    for step, field in got.items():
        np.testing.assert_array_equal(field, expected_field(step, (8, 6)))


@pytest.mark.parametrize("policy", ["block", "skip"])
def test_backpressure_with_a_parked_callback(cluster: Any, policy: str) -> None:
    run = run_name(f"bp{policy}")
    release = threading.Event()
    analytics = make_analytics(run)
    seen: list[int] = []

    @analytics.on_step("u")
    def park(step: int, u: list) -> None:
        seen.append(step)
        release.wait(120)

    thread = threading.Thread(target=analytics.run)
    thread.start()
    opts = {"run": run, "steps": 8, "catch": False, "config": {"backpressure": policy, "deadline": 3}}
    result = run_sim(cluster, 4, opts)
    release.set()
    thread.join(60)
    sent = {r: [e["step"] for e in evs] for r, evs in result.by_rank("sent").items()}
    assert same_everywhere(sent, 4) == [0, 1]
    if policy == "block":
        errors = {r: (e["step"], e["error"].split(":")[0]) for r, e in result.one("send-error").items()}
        assert same_everywhere(errors, 4) == (2, "BackpressureTimeout")
    else:
        skipped = {r: [e["step"] for e in evs] for r, evs in result.by_rank("skipped").items()}
        assert same_everywhere(skipped, 4) == list(range(2, 8))
        assert same_everywhere({r: e["skipped"] for r, e in result.one("done").items()}, 4) == 6
    assert seen == [0, 1]


@pytest.mark.parametrize("policy", ["continue", "raise"])
def test_callback_exception_policies(cluster: Any, policy: str) -> None:
    import insitu

    run = run_name(f"fail{policy}")
    proc = start_sim(cluster, 4, {"run": run, "steps": 40, "sleep": 0.05, "catch": False,
                                  "config": {"on_analytics_failure": policy}})  # fmt: skip
    analytics = make_analytics(run)

    @analytics.on_step("u")
    def boom(step: int, u: list) -> None:
        if step == 2:
            raise ZeroDivisionError("bad analytics")

    with pytest.raises(insitu.errors.CallbackError, match="step 2 on array.s. u: ZeroDivisionError") as info:
        analytics.run()
    assert info.value.step == 2
    assert info.value.arrays == ("u",)
    result = finish_sim(proc)
    if policy == "continue":
        assert result.returncode == 0
        first_drop = {r: evs[0]["step"] for r, evs in result.by_rank("dropped").items()}
        t = same_everywhere(first_drop, 4)
        assert 2 < t <= 2 + 2 + 1
        assert all(not e["ok"] for e in result.events if e["event"] == "dropped")
        assert same_everywhere({r: e["ok"] for r, e in result.one("done").items()}, 4) is False
    else:
        errors = {r: (e["step"], e["error"].split(":")[0]) for r, e in result.one("send-error").items()}
        step, cls = same_everywhere(errors, 4)
        assert cls == "AnalyticsFailedError"
        assert 2 < step <= 5
    assert wait_gone(run)


def test_sigkill_of_the_analytics_is_seen_by_every_rank(cluster: Any) -> None:
    run = run_name("killana")
    env = {**os.environ, **cluster.environment(), "INSITU_DEADLINE": "60"}
    ana = subprocess.Popen([sys.executable, str(ROOT / "tests/sims/ana.py"), json.dumps({"run": run})], env=env,
                           stdout=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    proc = start_sim(cluster, 4, {"run": run, "steps": 120, "sleep": 0.05})
    assert ana.stdout is not None
    for _ in range(3):
        json.loads(ana.stdout.readline())
    os.kill(ana.pid, signal.SIGKILL)
    ana.wait()
    ana.stdout.close()
    result = finish_sim(proc)
    assert result.returncode == 0
    first_drop = {r: evs[0]["step"] for r, evs in result.by_rank("dropped").items()}
    same_everywhere(first_drop, 4)
    assert same_everywhere({r: e["ok"] for r, e in result.one("done").items()}, 4) is False
    assert wait_gone(run), "the run must be reclaimed after the analytics died and the simulation closed"


def test_sigkill_of_a_rank_ends_the_run(cluster: Any) -> None:
    import insitu

    run = run_name("killsim")
    proc = start_sim(cluster, 4, {"run": run, "steps": 50, "sleep": 0.05, "faults": {"5": {"rank": 2, "kind": "kill"}}})
    analytics = make_analytics(run)
    seen: list[int] = []
    analytics.on_step("u")(lambda step, u: seen.append(step))
    try:
        # the launcher kills the other ranks too: the report lists every rank that died
        with pytest.raises(insitu.errors.SimulationFailedError, match=r"simulation ranks? (.*, )?2 \(node "):
            analytics.run()
    finally:
        finish_sim(proc)
    assert seen == list(range(len(seen)))
    assert len(seen) <= 5
    assert wait_gone(run)


def test_ranks_exit_after_close_while_the_analytics_is_busy(cluster: Any) -> None:
    run = run_name("exitearly")
    proc = start_sim(cluster, 4, {"run": run, "steps": 8, "config": {"in_flight": 10}})
    analytics = make_analytics(run)
    fields: dict[int, np.ndarray] = {}

    @analytics.on_step("u")
    def slow(step: int, u: list) -> None:
        if step == 0:
            proc.wait(60)  # every rank's process has exited before we read anything
        fields[step] = u[0].compute()

    analytics.run()
    assert finish_sim(proc).returncode == 0
    for step in range(8):
        np.testing.assert_array_equal(fields[step], expected_field(step, (8, 6)))


def test_memory_stays_bounded_over_1000_steps(cluster: Any) -> None:
    from ray.util.state import list_objects

    run = run_name("soak")
    chunk = 64 * 1024
    shape = (128, 256)  # 4 ranks x 64 KiB of float64
    window, in_flight, ranks = 3, 2, 4
    proc = start_sim(cluster, ranks, {"run": run, "steps": 1000, "shape": list(shape)}, env={"INSITU_DEADLINE": "120"})
    analytics = make_analytics(run)
    step_bytes = ranks * chunk
    sizes: list[int] = []

    def chunk_bytes() -> int:
        # a node actor stores a step's blocks as one object (plus a few hundred bytes of metadata)
        objs = list_objects(address=cluster.address, limit=10000, raise_on_missing_output=False)
        return sum({o.object_id: o.object_size or 0 for o in objs if (o.object_size or 0) >= chunk}.values())

    @analytics.on_step("u", window=window)
    def mean(step: int, u: list) -> None:
        assert float(u[-1].mean().compute()) == pytest.approx(expected_field(step, shape).mean())
        if step % 250 == 0:
            sizes.append(chunk_bytes())

    summary = analytics.run()
    assert finish_sim(proc, timeout=300).returncode == 0
    assert summary.steps == 1000
    # window + in flight, plus two steps whose release is still travelling (Ray frees asynchronously)
    bound = (window + in_flight + 2) * step_bytes * 1.01
    assert sizes and max(sizes) <= bound, (sizes, bound)
    assert min(sizes) >= window * step_bytes, f"the windows' own chunks must be counted: {sizes}"
    assert wait_gone(run)
    end = time.monotonic() + 30
    while chunk_bytes() and time.monotonic() < end:
        time.sleep(0.5)
    assert chunk_bytes() == 0


def test_analytics_alone_says_what_it_waits_for(cluster: Any) -> None:
    import insitu

    run = run_name("alone")
    analytics = insitu.Analytics(run=run, deadline=2)
    analytics.on_step("u")(lambda step, u: None)
    with pytest.raises(insitu.errors.StepTimeoutError, match=f"no simulation has registered run '{run}'"):
        analytics.run()
    assert wait_gone(run), "a head made by an analytics that left must be reclaimed"


def test_simulation_alone_says_what_it_waits_for(cluster: Any) -> None:
    run = run_name("simalone")
    result = run_sim(cluster, 2, {"run": run, "steps": 5, "catch": False, "config": {"deadline": 2}},
                     env={"INSITU_RECLAIM_DEADLINE": "3"})  # fmt: skip
    errors = {r: e["error"] for r, e in result.one("send-error").items()}
    msg = same_everywhere(errors, 2)
    assert msg.startswith("BackpressureTimeout") and "analytics state pending" in msg
    assert wait_gone(run, timeout=30), "a run nobody attached to must be reclaimed after the reclaim deadline"
