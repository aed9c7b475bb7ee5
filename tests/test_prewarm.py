"""Node processes started ahead by a pre-started run driver (issue 11, start-up): adopted on the
nodes with ranks, ended elsewhere, and restarted like any other when one dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import expected_field, finish_sim, run_name, start_sim

pytestmark = pytest.mark.cluster


def _gone(pid: int, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < end:
        time.sleep(0.1)
    return not Path(f"/proc/{pid}").exists()


def test_node_processes_started_ahead_are_adopted_ended_if_unused_and_restarted(cluster: Any, tmp_path: Path) -> None:
    """``python -m insitu.driver --create-head --ready-file F`` (as the batch script starts it):
    F appears once one node process runs on every alive node. A 2-rank simulation on the first
    node only adopts that very process (same pid) and the other node's process ends. SIGKILLed
    mid-run, the adopted process (created before it knew its ranks) is restarted: one gap, every
    other step delivered with exact values."""
    import ray

    from insitu.actors.head import head_name
    from insitu.interrupt import end_processes
    from tests.test_faults import _sent, watching_gaps

    run, steps = run_name("warm"), 120
    ready = tmp_path / "driver.ready"
    env = {**os.environ, **cluster.environment(), "INSITU_RUN": run}
    with open(tmp_path / "driver.log", "wb") as log:
        driver = subprocess.Popen([sys.executable, "-m", "insitu.driver", "--run", run, "--create-head",
                                   "--ready-file", str(ready)], env=env, stdin=subprocess.DEVNULL, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        end = time.monotonic() + 120
        while not ready.exists() and driver.poll() is None and time.monotonic() < end:
            time.sleep(0.1)
        assert ready.exists(), (tmp_path / "driver.log").read_text()[-3000:]
        head = ray.get_actor(head_name(run), namespace="insitu")
        warm = ray.get(head.warm_processes.remote(), timeout=30)
        alive = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
        assert set(warm) == set(alive) and len(alive) >= 2
        used = next(n for n, ip in alive.items() if ip == cluster.node_ips[0])

        seen, gaps, outcome, thread = watching_gaps(run)
        sim = start_sim(cluster, 2, {"run": run, "steps": steps, "sleep": 0.05}, nodes=[cluster.node_ips[0]],
                        env={"INSITU_DEADLINE": "20"})  # fmt: skip
        end = time.monotonic() + 120
        while _sent(sim) < 20 and time.monotonic() < end:
            time.sleep(0.2)
        assert _sent(sim) >= 20, "the simulation did not start sending"
        assert ray.get(head.node_processes.remote(), timeout=30) == {used: warm[used]}  # adopted, not a new one
        assert ray.get(head.warm_processes.remote(), timeout=30) == {}
        assert all(_gone(pid, 30) for node, pid in warm.items() if node != used)  # unused ones ended

        os.kill(warm[used], signal.SIGKILL)
        end = time.monotonic() + 60
        while not gaps and time.monotonic() < end:
            time.sleep(0.2)
        assert gaps, "no gap reached the analytics within 60 s of the kill"
        assert ray.get(head.node_processes.remote(), timeout=30)[used] != warm[used]  # the restarted process
        result = finish_sim(sim, timeout=180)
        thread.join(120)
        assert result.returncode == 0, result.stderr[-3000:]
        (gap,) = outcome["summary"].gaps
        assert gaps == [gap] and gap.node == used
        assert gap.resume in seen and max(seen) == steps - 1 and not set(seen) & set(gap.missing)
        for step, mean in seen.items():
            assert mean == pytest.approx(expected_field(step, (8, 6)).mean())
    finally:
        end_processes([driver])
