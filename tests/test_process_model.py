"""The process model: no Ray in any rank; the run driver outlives the simulation's step and goes with the run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import expected_field, finish_sim, run_name, start_sim, wait_gone

pytestmark = pytest.mark.cluster


def driver_pids(run: str) -> list[int]:
    """PIDs of the run drivers of ``run`` on this host (by their command line)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"insitu.driver" in cmd and run.encode() in cmd:
                pids.append(int(proc.name))
    return pids


def test_no_rank_imports_ray_and_the_driver_outlives_the_step(cluster: Any) -> None:
    import insitu

    run = run_name("noray")
    steps = 4
    proc = start_sim(cluster, 4, {"run": run, "steps": steps, "probe": True, "config": {"in_flight": steps}})
    result = finish_sim(proc)  # no analytics yet: the simulation goes first and exits
    assert result.returncode == 0, result.stderr[-3000:]
    probes = result.one("probe")
    assert sorted(probes) == [0, 1, 2, 3]
    for rank, p in probes.items():
        assert p["ray_imported"] == [], f"rank {rank} imported {p['ray_imported']}"
        assert p["raylet_mapped"] is False, f"rank {rank} maps Ray's _raylet"
    assert all(e["last_sent"] == steps - 1 for e in result.one("done").values())
    # the driver rank 0 spawned outlives the mpiexec step, in its own session
    pids = driver_pids(run)
    assert len(pids) == 1, pids
    sim_pids = {p["pid"] for p in probes.values()}
    assert pids[0] not in sim_pids
    # the analytics attaches afterwards and reads every step the ranks left behind
    analytics = insitu.Analytics(run=run, deadline=60)
    means: dict[int, float] = {}

    @analytics.on_step("u")
    def mean(step: int, u: list) -> None:
        means[step] = float(u[0].mean().compute())

    summary = analytics.run()
    assert summary.steps == steps
    assert sorted(means) == list(range(steps))
    assert wait_gone(run)
    end = time.monotonic() + 30
    while driver_pids(run) and time.monotonic() < end:
        time.sleep(0.2)
    assert driver_pids(run) == [], "the run driver must exit once its run is reclaimed"


def test_a_failed_setup_leaves_no_driver(cluster: Any) -> None:
    run = run_name("nodriver")
    proc = start_sim(cluster, 2, {"run": run, "layout": "overlap"}, env={"INSITU_DEADLINE": "5"})
    result = finish_sim(proc)
    assert set(result.one("init-error")) == {0, 1}
    end = time.monotonic() + 20
    while driver_pids(run) and time.monotonic() < end:
        time.sleep(0.2)
    assert driver_pids(run) == []


def test_relays_carry_steps_statuses_and_the_close(cluster: Any) -> None:
    """fanin=1, head_fanin=1 on two nodes: a two-level relay tree (one relay per node, one above both)."""
    import numpy as np
    import ray

    import insitu
    from insitu.actors.head import head_name

    run = run_name("relay")
    shape = (8, 6)
    proc = start_sim(cluster, 4, {"run": run, "steps": 200, "shape": list(shape), "sleep": 0.01},
                     env={"INSITU_FANIN": "1", "INSITU_HEAD_FANIN": "1"})  # fmt: skip
    analytics = insitu.Analytics(run=run, deadline=60, fanin=1, head_fanin=1)
    seen: dict[int, np.ndarray] = {}
    stats: dict[str, Any] = {}

    @analytics.on_step("u")
    def check(step: int, u: list) -> None:
        seen[step] = u[0].compute()
        if step == 5:
            stats.update(ray.get(ray.get_actor(head_name(run), namespace="insitu").stats.remote()))
            analytics.set("stop", True)  # travels head -> relay -> relays -> node actors -> ranks

    summary = analytics.run()
    result = finish_sim(proc)
    assert result.returncode == 0, result.stderr[-3000:]
    stops = {r: e["stop_at"] for r, e in result.one("done").items()}
    assert len(set(stops.values())) == 1 and 5 < stops[0] <= 5 + 3, stops
    assert summary.steps == stops[0] + 1  # the close travelled through the relays after every step
    for step, field in seen.items():
        np.testing.assert_array_equal(field, expected_field(step, shape))
    assert (stats["units"], stats["relays"]) == (1, 3)
    assert list(stats["messages"]) == [f"insitu-relay-{run}-2-0"], stats["messages"]  # only the top relay
    assert wait_gone(run)


def test_a_relay_forwards_the_pushes_that_came_before_it_started(cluster: Any) -> None:
    """A consumer attaching while the run registers makes the head push a status before the relays are
    started: the relay keeps it and forwards it at start (found in CI: a lost push left the nodes
    waiting for that sequence number, the ranks stalled under back-pressure)."""
    import ray

    from insitu.actors.relay import StepRelay
    from insitu.messages import AnalyticsState, Status

    @ray.remote(num_cpus=0)
    class Member:
        def __init__(self) -> None:
            self.seqs: list[int] = []

        async def update(self, status: Status) -> None:
            self.seqs.append(status.seq)

        async def got(self) -> list[int]:
            return self.seqs

    member = Member.remote()
    relay = StepRelay.remote(run_name("early"), "relay-early", ("n1",))  # type: ignore[attr-defined]
    ray.get(relay.update.remote(Status(-1, AnalyticsState.ATTACHED, (), "", 1)))
    ray.get(relay.start.remote({"n1": member}, None))
    ray.get(relay.update.remote(Status(-1, AnalyticsState.ATTACHED, (), "", 2)))
    end = time.monotonic() + 10
    while ray.get(member.got.remote()) != [1, 2] and time.monotonic() < end:
        time.sleep(0.1)
    assert ray.get(member.got.remote()) == [1, 2]
    ray.kill(relay)
    ray.kill(member)
