"""Several consumers per run, the per-array retention rule, an analytics restarted after a crash."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, expected_field, finish_sim, run_name, start_sim, wait_gone

pytestmark = pytest.mark.cluster
SHAPE = (8, 6)


def head_stats(run: str) -> dict[str, Any]:
    import ray

    from insitu.actors.head import head_name

    return ray.get(ray.get_actor(head_name(run), namespace="insitu").stats.remote())


def wait_consumers(run: str, n: int, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if len(head_stats(run)["consumers"]) >= n:
                return
        except ValueError:  # the head does not exist yet
            pass
        time.sleep(0.2)
    raise AssertionError(f"{n} consumer(s) did not attach to run {run} within {timeout} s")


def start_ana(cluster: Any, options: dict[str, Any]) -> subprocess.Popen[str]:
    env = {**os.environ, **cluster.environment(), "INSITU_DEADLINE": "60"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests/sims/ana.py"), json.dumps(options)], env=env,
                            stdout=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    assert proc.stdout is not None
    assert "node" in json.loads(proc.stdout.readline())  # its first line says where it runs
    return proc


def sim_events(proc: Any, rank: int = 0) -> list[dict[str, Any]]:
    path = Path(proc.events_dir) / f"rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def test_retention_per_array_windows_one_and_three(cluster: Any) -> None:
    """u is read with window 1, w with window 3: u's blocks must not live as long as w's."""
    from ray.util.state import list_objects

    import insitu

    run = run_name("retain")
    in_flight, steps = 1, 10
    proc = start_sim(cluster, 4, {"run": run, "steps": steps, "second": True, "config": {"in_flight": in_flight}})
    analytics = insitu.Analytics(run=run, deadline=60)
    ids: dict[str, dict[str, int]] = {"u": {}, "w": {}}  # object id -> step (ids only: holding refs would pin them)
    live_max: dict[str, int] = {"u": 0, "w": 0}
    checked: list[int] = []
    trace: list[Any] = []

    @analytics.on_step("u")
    def on_u(step: int, u: list) -> None:
        for b in analytics.blocks(u[0]).values():
            ids["u"][b.ref.hex()] = step
        assert float(u[0].mean().compute()) == pytest.approx(expected_field(step, SHAPE).mean())

    @analytics.on_step("w", window=3)
    def on_w(step: int, w: list) -> None:
        for b in analytics.blocks(w[-1]).values():
            ids["w"][b.ref.hex()] = step
        if step < 4:
            return
        # the owners release asynchronously: poll until the bound holds (or report the last count)
        end = time.monotonic() + 10
        while True:
            alive = {o.object_id for o in list_objects(address=cluster.address, limit=10000,
                                                      raise_on_missing_output=False)}  # fmt: skip
            live = {a: {s for oid, s in ids[a].items() if oid in alive} for a in ids}
            if len(live["u"]) <= 1 + in_flight or time.monotonic() > end:
                break
            time.sleep(0.2)
        for a in live:
            live_max[a] = max(live_max[a], len(live[a]))
        trace.append((step, sorted(live["u"]), sorted(live["w"])))
        assert {step - 2, step - 1, step} <= live["w"], (step, live)  # w's window is alive
        checked.append(step)

    summary = analytics.run()
    assert finish_sim(proc).returncode == 0
    assert summary.steps == steps
    assert checked == list(range(4, steps))
    # store bytes of A <= (max window over A + in-flight steps) x A's bytes per step
    assert live_max["u"] <= 1 + in_flight, (live_max, trace)
    assert 3 <= live_max["w"] <= 3 + in_flight, live_max
    assert wait_gone(run)


def test_a_second_consumer_shares_backpressure_and_its_death_releases_it(cluster: Any) -> None:
    import insitu

    run = run_name("twocons")
    slow = start_ana(cluster, {"run": run, "park_at": 3})
    wait_consumers(run, 1)
    analytics = insitu.Analytics(run=run, deadline=60)
    seen: dict[int, float] = {}
    analytics.on_step("u")(lambda step, u: seen.__setitem__(step, float(u[0].mean().compute())))
    outcome: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("summary", analytics.run()), daemon=True)
    thread.start()
    wait_consumers(run, 2)
    steps, in_flight = 30, 2
    proc = start_sim(cluster, 4, {"run": run, "steps": steps, "sleep": 0.02, "config": {"in_flight": in_flight}})
    assert slow.stdout is not None
    got = [json.loads(slow.stdout.readline()) for _ in range(4)]
    assert [g["step"] for g in got] == [0, 1, 2, 3]  # the slow consumer now parks inside step 3
    time.sleep(3)
    held = max((e["step"] for e in sim_events(proc) if e["event"] == "sent"), default=-1)
    assert 3 <= held <= 3 + in_flight, f"the parked consumer must hold the simulation back (sent up to {held})"
    os.kill(slow.pid, signal.SIGKILL)  # policy continue: the other consumer goes on, nothing is dropped
    slow.wait()
    slow.stdout.close()
    result = finish_sim(proc)
    thread.join(120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert outcome["summary"].steps == steps
    assert sorted(seen) == list(range(steps))
    for step, mean in seen.items():
        assert mean == pytest.approx(expected_field(step, SHAPE).mean())
    assert not [e for e in result.events if e["event"] == "dropped"]
    assert all(e["ok"] for e in result.one("done").values())
    assert wait_gone(run)


def test_an_analytics_restarted_after_a_crash_gets_its_window_refilled(cluster: Any) -> None:
    import insitu

    run = run_name("restart")
    first = start_ana(cluster, {"run": run, "park_at": 3, "window": 2})
    wait_consumers(run, 1)
    proc = start_sim(cluster, 4, {"run": run, "steps": 400, "sleep": 0.02})
    assert first.stdout is not None
    got = [json.loads(first.stdout.readline()) for _ in range(3)]  # steps 1..3 (step 0 only fills the window)
    assert [g["window"] for g in got] == [[0, 1], [1, 2], [2, 3]]
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    first.stdout.close()
    end = time.monotonic() + 60
    while not [e for e in sim_events(proc) if e["event"] == "dropped"]:  # the ranks saw the crash
        assert time.monotonic() < end, "the simulation did not see the analytics die"
        time.sleep(0.1)
    analytics = insitu.Analytics(run=run, deadline=60)
    windows: list[list[int]] = []

    @analytics.on_step("u", window=2)
    def again(step: int, u: list) -> None:
        windows.append([a.step for a in u])
        assert float(u[-1].mean().compute()) == pytest.approx(expected_field(step, SHAPE).mean())
        assert float(u[0].mean().compute()) == pytest.approx(expected_field(u[0].step, SHAPE).mean())
        if len(windows) == 3:
            analytics.set("stop", True)

    analytics.run()
    result = finish_sim(proc)
    assert result.returncode == 0, result.stderr[-2000:]
    before = windows[0][0]  # retained from before the crash: the last step assembled then
    assert 3 <= before <= 3 + 2
    events = result.by_rank("sent")[0]
    dropped = [e["step"] for e in result.by_rank("dropped")[0]]
    assert dropped and min(dropped) > before and max(dropped) < windows[0][1]
    resumed = [e for e in events if e["step"] > max(dropped)]
    assert resumed and all(e["ok"] for e in resumed), "the simulation must send again once a consumer attached"
    stops = {r: e["stop_at"] for r, e in result.one("done").items()}
    assert len(set(stops.values())) == 1 and None not in stops.values()
    assert wait_gone(run)


def test_the_last_steps_of_a_node_are_delivered_before_the_end_whatever_order_ray_runs_them(cluster: Any) -> None:
    """Ray may run a node's step messages and its close out of order: here step 1 (seq 1), then the
    close (2 messages sent), then step 0 (seq 0). Both steps reach the consumer before the end.
    (Found in CI: the head ended the run between handling seq 0 and seq 1 of one in-order batch.)"""
    import numpy as np
    import ray

    from insitu.actors.head import HeadActor
    from insitu.analytics import _link_class
    from insitu.config import Config
    from insitu.layout import ArraySpec, validate_layout
    from insitu.messages import NodeStep, RunEnd, SimInfo, StepData, Waiting

    @ray.remote(num_cpus=0)
    class Impersonated:  # the node actor the head holds; the test sends its messages itself
        async def start(self, status: Any, parent: Any = None) -> str:
            return "\0impersonated-node"

        async def update(self, status: Any) -> None:
            pass

        async def park(self) -> None:
            import asyncio

            await asyncio.Event().wait()

    run = run_name("order")
    node = "ab" * 28
    head = HeadActor.options(name=f"insitu-head-{run}", namespace="insitu").remote(  # type: ignore[attr-defined]
        run, Config(address="local", deadline=60.0)
    )
    layouts = validate_layout([{"u": ArraySpec("u", (2,), "f8", start=(0,), shape=(2,))}])
    ray.get(head.register_simulation.remote(SimInfo(1, tuple(layouts.values()), (node,), 2),
                                            {node: Impersonated.remote()}))  # fmt: skip
    link = _link_class().remote()
    cid = ray.get(head.attach.remote(link, {"u": 1}, "analytics")).consumer
    refs = [ray.put((np.full(2, s),)) for s in (0, 1)]
    ray.get(head.node_step.remote(NodeStep(node, 1, ("u",), (refs[1],), 1)))
    ray.get(head.node_closed.remote(node, 1, 2))
    ray.get(head.node_step.remote(NodeStep(node, 0, ("u",), (refs[0],), 0)))
    got: list[Any] = []
    while not got or not isinstance(got[-1], RunEnd):
        batch = ray.get(head.next_steps.remote(cid, 10.0))
        assert not isinstance(batch, Waiting), (got, batch)
        got.extend(batch)
    assert [g.step for g in got if isinstance(g, StepData)] == [0, 1]
    assert got[-1].last_step == 1
    ray.kill(head)
    ray.kill(link)
