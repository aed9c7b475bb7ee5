"""Supervised analytics (issue 16 item 3): ``insitu analytics --supervise`` restarts an analytics that
is killed or hangs; the restarted one attaches as a higher incarnation and resumes; the simulation
drops the steps of the gap (``bridge.stats``) and sends again, and policy ``raise`` applies only once
restarts are exhausted. Real mpiexec, real Ray cluster, real signals."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import ROOT, finish_sim, run_name, start_sim
from tests.test_consumers import wait_consumers
from tests.test_failures import same_everywhere

pytestmark = pytest.mark.cluster


def _supervisor(cluster: Any, run: str, restarts: int, options: dict[str, Any]) -> subprocess.Popen[str]:
    env = {**os.environ, **cluster.environment(), "INSITU_DEADLINE": "60"}
    ana = [str(ROOT / "tests/sims/ana.py"), json.dumps({"run": run, **options})]
    cmd = [sys.executable, "-m", "insitu", "analytics", "--supervise", "--max-restarts", str(restarts),
           "--heartbeat-deadline", "6", *ana]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip


def _stderr_tails(run: str, sim: Any) -> dict[int, str]:
    """Poll the head's status while the simulation runs: the stderr tails of failed consumers."""
    import time

    import ray

    from insitu.actors.head import head_name

    tails: dict[int, str] = {}
    end = time.monotonic() + 200
    while sim.poll() is None and len(tails) < 2 and time.monotonic() < end:
        try:
            doc = ray.get(ray.get_actor(head_name(run), namespace="insitu").status.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - not there yet, or busy
            time.sleep(0.5)
            continue
        tails.update({c["incarnation"]: c["stderr_tail"] for c in doc["consumers"] if c["stderr_tail"]})
        time.sleep(0.5)
    return tails


def _events(result: Any, rank: int) -> list[tuple[str, int, bool]]:
    return [(e["event"], e["step"], e["ok"]) for e in result.events
            if e["rank"] == rank and e["event"] in ("sent", "dropped")]  # fmt: skip


def test_a_killed_then_hung_analytics_is_restarted_and_resumes(cluster: Any) -> None:
    run = run_name("supervise")
    sup = _supervisor(cluster, run, 2, {"crash": {"1": 3}, "hang": {"2": 3}, "stderr": True})
    try:
        wait_consumers(run, 1)
        sim = start_sim(cluster, 4, {"run": run, "steps": 240, "sleep": 0.1, "config": {"deadline": 30}})
        tails = _stderr_tails(run, sim)
        result = finish_sim(sim, timeout=240)
        out, err = sup.communicate(timeout=120)
    finally:
        if sup.poll() is None:
            os.killpg(sup.pid, 9)
            sup.wait()
    assert result.returncode == 0, result.stderr[-3000:]
    assert sup.returncode == 0, err[-3000:]
    assert "the analytics was killed by SIGKILL; restart 1 of 2" in err, err[-3000:]
    assert "gave no heartbeat" in err and "restart 2 of 2" in err, err[-3000:]
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    steps = [(e["incarnation"], e["step"]) for e in lines if "step" in e]
    by_inc = {i: [s for j, s in steps if j == i] for i in (1, 2, 3)}
    assert len(by_inc[1]) == 3 and len(by_inc[2]) == 3 and by_inc[3], steps  # killed, hung, then to the end
    assert max(by_inc[1]) < min(by_inc[2]) and max(by_inc[2]) < min(by_inc[3])  # each resumes later
    (done,) = [e for e in lines if "done" in e]
    assert done["incarnation"] == 3 and done["resumed_after"] == by_inc[2][1], (done, by_inc)
    # the simulation: the steps of each gap dropped (counted, analytics_ok false), then sent again
    views = same_everywhere({r: _events(result, r) for r in range(4)}, 4)
    kinds = [k for k, _, _ in views]
    gaps = sum(1 for a, b in zip(kinds, kinds[1:], strict=False) if a == "sent" and b == "dropped")
    assert gaps == 2, kinds
    assert all(ok == (k == "sent") for k, _, ok in views[len(by_inc[1]) + 3 :]), views  # ok false exactly in gaps
    assert views[-1][0] == "sent" and set(by_inc[3]) <= {s for k, s, _ in views if k == "sent"}
    totals = same_everywhere({r: (e["sent"], e["dropped"], e["ok"]) for r, e in result.one("done").items()}, 4)
    assert totals == (kinds.count("sent"), kinds.count("dropped"), True)
    # the steps the simulation had dropped when incarnation 3 attached: both gaps, as far as the ranks knew
    before_third = sum(1 for k, s, _ in views if k == "dropped" and s < min(by_inc[3]))
    assert 0 < done["dropped_before"] <= before_third, (done, before_third)
    # each failed incarnation's last stderr lines reached the run's status with its successor
    for inc in (1, 2):
        assert tails[inc].splitlines()[-1] == f"ana incarnation {inc} step {by_inc[inc][-1]}", tails


def test_policy_raise_applies_only_once_restarts_are_exhausted(cluster: Any) -> None:
    run = run_name("superaise")
    sup = _supervisor(cluster, run, 1, {"crash": {"1": 2, "2": 2}})
    try:
        wait_consumers(run, 1)
        opts = {"run": run, "steps": 400, "sleep": 0.1, "catch": False,
                "config": {"deadline": 30, "on_analytics_failure": "raise"}}  # fmt: skip
        result = finish_sim(start_sim(cluster, 4, opts), timeout=240)
        _, err = sup.communicate(timeout=120)
    finally:
        if sup.poll() is None:
            os.killpg(sup.pid, 9)
            sup.wait()
    assert sup.returncode == 128 + 9, err[-3000:]  # the last incarnation's SIGKILL
    assert "no restart left (1 used)" in err, err[-3000:]
    errors = same_everywhere({r: (e["step"], e["error"].split(":")[0]) for r, e in result.one("send-error").items()}, 4)
    views = same_everywhere({r: _events(result, r) for r in range(4)}, 4)
    kinds = [k for k, _, _ in views]
    # the first failure (a restart left): steps dropped, no raise; then sent again; then the final one raises
    first_drop = kinds.index("dropped")
    assert "sent" in kinds[first_drop:], kinds
    assert errors[1] == "AnalyticsFailedError" and errors[0] > views[-1][1], (errors, views[-3:])


def test_sigterm_to_the_supervisor_leaves_nothing(cluster: Any) -> None:
    """SIGTERM to ``insitu analytics --supervise`` (issue 17 item 4): its analytics goes, the run sees the
    consumer leave, the heartbeat directory is removed; one line and exit 128 + 15."""
    import signal
    import time
    from pathlib import Path

    from tests.test_consumers import head_stats

    run = run_name("supterm")
    sup = _supervisor(cluster, run, 2, {})
    wait_consumers(run, 1)

    def parent(p: Path) -> str:
        try:
            return (p / "stat").read_text().rsplit(")", 1)[1].split()[1]
        except OSError:
            return ""

    (child,) = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and parent(p) == str(sup.pid)]
    env = dict(e.split("=", 1) for e in Path(f"/proc/{child}/environ").read_text().split("\0") if "=" in e)
    beat = Path(env["INSITU_HEARTBEAT_FILE"])
    assert beat.exists() and env["INSITU_RESTARTS_LEFT"] == "2"
    sup.send_signal(signal.SIGTERM)
    _, err = sup.communicate(timeout=60)
    assert sup.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert err.strip().splitlines()[-1] == (
        "insitu analytics: interrupted by SIGTERM; everything it started was torn down"
    ), err[-2000:]
    assert not Path(f"/proc/{child}").exists() and not beat.parent.exists()
    end, state = time.monotonic() + 30, "ATTACHED"
    while state == "ATTACHED" and time.monotonic() < end:
        try:
            state = head_stats(run)["consumers"][1]["state"]
        except ValueError:  # reclaimed: the consumer left before any simulation registered
            state = "reclaimed"
        time.sleep(0.2)
    assert state != "ATTACHED"


def _child(supervisor: subprocess.Popen[str]) -> int | None:
    """The supervisor's current analytics process."""
    from pathlib import Path

    found = [int(p) for t in Path(f"/proc/{supervisor.pid}/task").iterdir()
             for p in (t / "children").read_text().split()]  # fmt: skip
    return found[0] if found else None


def test_heat2d_with_its_analytics_killed_three_times(cluster: Any, tmp_path: Any) -> None:
    """heat2d, 300 steps on 4 ranks, heat_stats under supervision SIGKILLed three times: it finishes;
    every step it analysed has the statistics of the simulation's own field, across its four
    incarnations (a restart resumes stats.jsonl); the gaps are the steps the simulation dropped."""
    import time

    import numpy as np

    from tests.conftest import HEAT2D_PY, HEAT_STATS, mpi_command

    run, dump, out = run_name("heat3kill"), tmp_path / "dump", tmp_path / "out"
    env = {**os.environ, **cluster.environment(), "INSITU_DEADLINE": "60", "INSITU_RUN": run}
    ana = [sys.executable, "-m", "insitu", "analytics", "--supervise", "--max-restarts", "3", str(HEAT_STATS),
           "--out", str(out), "--plot-every", "0", "--print-every", "1000"]  # fmt: skip
    heat = [sys.executable, str(HEAT2D_PY), "--nx", "32", "--ny", "32", "--steps", "300", "--sleep", "0.15",
            "--dump", str(dump)]  # fmt: skip
    logs = {name: (tmp_path / f"{name}.out").open("w+") for name in ("sup", "sim", "sim-err")}
    sup = subprocess.Popen(ana, env=env, stdout=subprocess.DEVNULL, stderr=logs["sup"], text=True,
                           start_new_session=True)  # fmt: skip
    sim = subprocess.Popen(mpi_command(4, cluster.node_ips, heat), env=env, stdout=logs["sim"],
                           stderr=logs["sim-err"], text=True, start_new_session=True)  # fmt: skip
    lines = out / "stats.jsonl"

    def analysed() -> int:
        return lines.read_text().count("\n") if lines.exists() else 0

    try:
        killed: list[int] = []
        end = time.monotonic() + 200
        while len(killed) < 3 and sim.poll() is None and time.monotonic() < end:
            child = _child(sup)
            if child is not None and child not in killed and analysed() >= 10 + 25 * len(killed):
                os.kill(child, signal.SIGKILL)
                killed.append(child)
            time.sleep(0.1)
        assert len(killed) == 3, f"only {len(killed)} kills before the simulation ended"
        sim.wait(timeout=200)
        sup.wait(timeout=120)
    finally:
        for proc in (sim, sup):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for fh in logs.values():
            fh.close()
    sim_out, sim_err, err = ((tmp_path / f"{name}.out").read_text() for name in ("sim", "sim-err", "sup"))
    assert sim.returncode == 0, sim_err[-3000:]
    assert sup.returncode == 0 and "restart 3 of 3" in err, err[-3000:]
    stats = {int(k): v for k, v in json.loads((out / "stats.json").read_text())["stats"].items()}
    for step, s in stats.items():  # correct for every step analysed, by any incarnation
        field = np.load(dump / f"step{step:05d}.npy")
        assert (s["min"], s["mean"], s["max"]) == pytest.approx((field.min(), field.mean(), field.max())), step
    steps = sorted(stats)
    runs = 1 + sum(1 for a, b in zip(steps, steps[1:], strict=False) if b != a + 1)
    assert steps[0] == 0 and steps[-1] == 299 and runs == 4, steps  # four incarnations, three gaps
    dropped = int(re.search(r"dropped (\d+)", sim_out).group(1))  # type: ignore[union-attr]
    # the steps missing from the statistics are the ones the simulation dropped in the gaps, plus at
    # most the steps in flight (back-pressure: 2) and the one being analysed when each incarnation died
    missing = 300 - len(steps)
    assert dropped >= 3 and 0 <= missing - dropped <= 3 * (2 + 1), (missing, dropped)
