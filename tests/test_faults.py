"""Faults in a run (issue 17): the whole Ray cluster goes away under a running simulation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from insitu.cluster.local import LocalCluster
from tests.conftest import ROOT, finish_sim, run_name, start_sim


def _sent(proc: object) -> int:
    from pathlib import Path

    path = Path(proc.events_dir) / "rank0.jsonl"  # type: ignore[attr-defined]
    lines = path.read_text().splitlines() if path.exists() else []
    return sum(1 for line in lines if '"event": "sent"' in line)


def test_the_simulation_finishes_without_hanging_when_the_cluster_goes_away() -> None:
    with LocalCluster(nodes=2, cpus_per_node=1) as c:
        run = run_name("loss")
        env = {**os.environ, **c.environment(), "INSITU_RUN": run, "INSITU_DEADLINE": "20"}
        ana_cmd = [sys.executable, str(ROOT / "tests/sims/ana.py"), json.dumps({"run": run})]
        ana = subprocess.Popen(ana_cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # fmt: skip
        try:
            sim = start_sim(c, 2, {"run": run, "steps": 300, "sleep": 0.05}, env={"INSITU_DEADLINE": "20"})
            end = time.monotonic() + 120
            while _sent(sim) < 5 and time.monotonic() < end:
                time.sleep(0.2)
            assert _sent(sim) >= 5, "the simulation did not start sending"
            c.stop()  # every raylet, the GCS, the head and node actors: gone
            lost_at = time.monotonic()
            result = finish_sim(sim, timeout=120)
        finally:
            ana.kill()
            ana.wait()
    assert result.returncode == 0, result.stderr[-3000:]
    assert time.monotonic() - lost_at < 60  # within the deadlines, not a hang
    warnings = [line for line in result.stderr.splitlines() if "RuntimeWarning" in line]
    assert len(warnings) == 1, result.stderr[-3000:]  # one warning for the event, not one per step or rank
    # the reason is whichever the ranks saw first: the node actor's socket closing, or the analytics' failure
    # (its message may span lines: a callback's failure carries the error's text)
    assert "analytics unavailable (" in warnings[0] and result.stderr.count("further steps are dropped") == 1
    for rank in (0, 1):
        events = [e for e in result.events if e["rank"] == rank]
        sent = [e["step"] for e in events if e["event"] == "sent"]
        dropped = [e["step"] for e in events if e["event"] == "dropped"]
        assert sent == list(range(len(sent))) and len(sent) >= 5
        assert dropped == list(range(len(sent), 300))  # every later step dropped, none lost silently
        assert [e["event"] for e in events][-1] == "done"
