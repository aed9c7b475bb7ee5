"""``insitu status`` (issue 16 item 1) on a live run: real mpiexec over two raylets, a slow analytics
(window 2) and back-pressure ``skip``, so that steps are retained, consumed late and skipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest

from tests.conftest import finish_sim, run_name, start_sim
from tests.test_consumers import start_ana, wait_consumers

pytestmark = pytest.mark.cluster


def _status(cluster: Any, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **cluster.environment()}
    return subprocess.run([sys.executable, "-m", "insitu", "status", *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip


def test_status_of_a_live_run(cluster: Any) -> None:
    run = run_name("status")
    ana = start_ana(cluster, {"run": run, "window": 2, "sleep": 0.4})
    wait_consumers(run, 1)
    sim = start_sim(cluster, 4, {"run": run, "steps": 150, "sleep": 0.05,
                                 "config": {"backpressure": "skip", "in_flight": 1}})  # fmt: skip
    try:
        doc: dict[str, Any] = {}
        end = time.monotonic() + 90
        while time.monotonic() < end:  # until the run shows retained steps and skipped ones
            got = _status(cluster, "--run", run, "--json")
            assert got.returncode == 0, got.stderr[-2000:]
            doc = json.loads(got.stdout)
            if doc["skipped"] and doc["held_steps"].get("u") and doc["consumers"][0]["completed"] is not None:
                break
            time.sleep(0.5)
        text = _status(cluster, "--run", run)
    finally:
        result = finish_sim(sim)
        ana.communicate(timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert doc["schema"] == 1 and doc["run"] == run and doc["state"] == "running", doc
    nodes = {n["ip"]: n for n in doc["simulation"]["nodes"]}
    assert sorted(nodes) == sorted(cluster.node_ips)
    assert sorted(n["ranks"] for n in nodes.values()) == [[0, 1], [2, 3]]
    assert {n["route"] for n in nodes.values()} == {"direct"}
    # store bytes: the steps the head holds of u x the node's half of the 8x6 float64 field
    held = doc["held_steps"]["u"]
    assert held >= 1 and {n["store_bytes"] for n in nodes.values()} == {held * 8 * 6 * 8 // 2}, doc
    (c,) = doc["consumers"]
    assert (c["incarnation"], c["kind"], c["state"], c["windows"]) == (1, "analytics", "attached", {"u": 2})
    assert c["completed"] is not None and c["lag"] == doc["steps"]["last"] - c["completed"] >= 0
    newest = max([a["step"] for a in doc["steps"]["assembling"]] + [doc["steps"]["last"]])
    assert doc["steps"]["in_flight"] == newest - c["completed"] >= c["lag"], doc["steps"]
    assert [r["rank"] for r in doc["ranks"]] == [0, 1, 2, 3]
    assert all(r["calls"] >= 1 and r["send_p50_ms"] > 0 and r["send_p95_ms"] >= r["send_p50_ms"] for r in doc["ranks"])
    # the ranks' counts, read from two node actors one after the other while steps go on, may differ
    # by the steps between the reads; the ranks agree on the steps they skip (their own final counts)
    skipped = [r["skipped"] for r in doc["ranks"]]
    assert min(skipped) >= 1 and max(skipped) - min(skipped) <= 2 and doc["skipped"] == max(skipped), skipped
    finals = {e["skipped"] for e in result.one("done").values()}
    assert len(finals) == 1 and finals.pop() >= max(skipped), result.one("done")
    assert doc["drop_reasons"] == ["back-pressure skip: 1 steps in flight"], doc["drop_reasons"]
    assert text.returncode == 0 and "consumers:" in text.stdout and "rank 3: send p50" in text.stdout, text.stdout


def test_status_of_an_unknown_run_is_one_line(cluster: Any) -> None:
    got = _status(cluster, "--run", "no-such-run")
    assert got.returncode == 1
    assert got.stderr.strip().splitlines() == [
        f"insitu status: error: no run 'no-such-run' on the cluster at {cluster.address} (namespace 'insitu'): "
        "it has not started, or it ended and was reclaimed"
    ]
