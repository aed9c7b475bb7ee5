"""Faults in a run (issue 17): the whole Ray cluster goes away, or one node process dies, under a running simulation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from insitu.cluster.local import LocalCluster
from tests.conftest import ROOT, finish_sim, run_name, start_sim

STEPS = 150  # of the simulations below: 7.5 s at 0.05 s a step, most of them after the fault


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
            sim = start_sim(c, 2, {"run": run, "steps": 150, "sleep": 0.05}, env={"INSITU_DEADLINE": "10"})
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
        assert dropped == list(range(len(sent), 150))  # every later step dropped, none lost silently
        assert [e["event"] for e in events][-1] == "done"


def _running(cluster: Any, run: str, restarts: int = 0) -> tuple[list[int], list[BaseException], threading.Thread, Any]:
    """An analytics on ``u`` in a thread (steps seen, its failure) and a 4-rank, ``STEPS``-step simulation
    that has sent at least 5 steps; node processes restarted ``restarts`` times. The ranks' deadline
    is 10 s: how long they wait, at ``close()``, for a node process that might still be restarted."""
    from tests.test_failures import make_analytics

    analytics = make_analytics(run, node_restarts=restarts)
    seen: list[int] = []
    analytics.on_step("u")(lambda step, u: seen.append(step))
    failure: list[BaseException] = []

    def consume() -> None:
        try:
            analytics.run()
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            failure.append(exc)

    thread = threading.Thread(target=consume)
    thread.start()
    sim = start_sim(cluster, 4, {"run": run, "steps": STEPS, "sleep": 0.05, "config": {"node_restarts": restarts}},
                    env={"INSITU_DEADLINE": "10"})  # fmt: skip
    end = time.monotonic() + 120
    while _sent(sim) < 5 and time.monotonic() < end:
        time.sleep(0.2)
    assert _sent(sim) >= 5, "the simulation did not start sending"
    return seen, failure, thread, sim


def test_a_lost_node_process_is_named_by_the_analytics_and_the_simulation(cluster: Any) -> None:
    """SIGKILL to the node actor of the second node mid-run, without restarts (``node_restarts=0``): the
    analytics ends with NodeLostError naming
    the node's address, id and ranks and the last complete step, not a generic timeout; the simulation
    warns once, naming the node, drops the later steps and finishes."""
    import ray

    from insitu.actors.head import head_name
    from insitu.errors import NodeLostError

    run = run_name("nodelost")
    seen, failure, thread, sim = _running(cluster, run)
    head = ray.get_actor(head_name(run), namespace="insitu")
    pids = ray.get(head.node_processes.remote(), timeout=30)
    ip_of = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    lost = next(n for n in pids if ip_of[n] == cluster.node_ips[1])  # ranks 2 and 3 live there
    os.kill(pids[lost], signal.SIGKILL)
    killed_at = time.monotonic()
    thread.join(60)
    result = finish_sim(sim, timeout=120)
    assert not thread.is_alive()
    assert time.monotonic() - killed_at < 60
    (exc,) = failure
    assert isinstance(exc, NodeLostError), repr(exc)
    message = str(exc)
    assert f"node {cluster.node_ips[1]} (id {lost[:12]}, ranks [2, 3])" in message, message
    assert f"after step {seen[-1]}, the last complete step" in message, (message, seen[-3:])
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "RuntimeWarning" in line]
    assert len(warnings) == 1 and lost[:12] in warnings[0], result.stderr[-3000:]
    for rank in range(4):
        events = [e for e in result.events if e["rank"] == rank]
        sent = [e["step"] for e in events if e["event"] == "sent"]
        dropped = [e["step"] for e in events if e["event"] == "dropped"]
        assert sent == list(range(len(sent))) and dropped == list(range(len(sent), STEPS))
        done = next(e for e in events if e["event"] == "done")
        assert (done["sent"], done["dropped"], done["ok"]) == (len(sent), len(dropped), False)


def test_a_lost_head_is_named_by_the_analytics_and_the_simulation_finishes(cluster: Any) -> None:
    """The run's head actor killed mid-run (its node actors die with it): the analytics ends with
    RunLostError naming the run and its last step; the simulation warns once, drops the rest, finishes."""
    import ray

    from insitu.actors.head import head_name
    from insitu.errors import RunLostError

    run = run_name("headlost")
    seen, failure, thread, sim = _running(cluster, run)
    ray.kill(ray.get_actor(head_name(run), namespace="insitu"))
    killed_at = time.monotonic()
    thread.join(60)
    result = finish_sim(sim, timeout=120)
    assert not thread.is_alive() and time.monotonic() - killed_at < 60
    (exc,) = failure
    assert isinstance(exc, RunLostError), repr(exc)
    assert str(exc).startswith(f"run {run!r}: its head actor died after step {seen[-1]} "), str(exc)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "RuntimeWarning" in line]
    assert len(warnings) == 1 and "lost the connection to the node actor" in warnings[0], result.stderr[-3000:]
    for rank in range(4):
        events = [e for e in result.events if e["rank"] == rank]
        sent = [e["step"] for e in events if e["event"] == "sent"]
        dropped = [e["step"] for e in events if e["event"] == "dropped"]
        assert sent == list(range(len(sent))) and dropped == list(range(len(sent), STEPS))


def _raylet_pid(base_dir: str, ip: str) -> int:
    """The raylet process of the private cluster under ``base_dir`` serving ``ip``."""
    from pathlib import Path

    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if cmd and cmd[0].endswith(b"/raylet") and f"--node_ip_address={ip}".encode() in cmd \
                and any(base_dir.encode() in part for part in cmd):  # fmt: skip
            return int(proc.name)
    raise AssertionError(f"no raylet for {ip} under {base_dir}")


def test_a_lost_raylet_is_named_by_the_analytics_and_the_simulation() -> None:
    """SIGKILL to the second node's raylet (as the OOM killer would) mid-run, on a private cluster: the
    analytics ends with NodeLostError saying the raylet is gone and naming the node; the simulation warns
    once naming the node, drops the later steps and finishes."""
    with LocalCluster(nodes=2, cpus_per_node=2) as c:
        assert c.base_dir is not None
        run = run_name("rayletlost")
        env = {**os.environ, **c.environment(), "INSITU_RUN": run, "INSITU_DEADLINE": "20"}
        ana_cmd = [sys.executable, str(ROOT / "tests/sims/ana.py"), json.dumps({"run": run})]
        ana = subprocess.Popen(ana_cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # fmt: skip
        try:
            sim = start_sim(c, 4, {"run": run, "steps": STEPS, "sleep": 0.05}, env={"INSITU_DEADLINE": "10"})
            end = time.monotonic() + 120
            while _sent(sim) < 5 and time.monotonic() < end:
                time.sleep(0.2)
            assert _sent(sim) >= 5, "the simulation did not start sending"
            os.kill(_raylet_pid(c.base_dir, c.node_ips[1]), signal.SIGKILL)
            lost_at = time.monotonic()
            result = finish_sim(sim, timeout=120)
            _, err = ana.communicate(timeout=120)
        finally:
            if ana.poll() is None:
                ana.kill()
                ana.wait()
    assert time.monotonic() - lost_at < 90
    assert result.returncode == 0, result.stderr[-3000:]
    assert ana.returncode != 0 and "NodeLostError: the raylet (node manager " in err, err[-3000:]
    assert f"refuses connections) and with it the insitu node process of node {c.node_ips[1]} " in err, err[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "RuntimeWarning" in line]
    assert len(warnings) == 1, result.stderr[-3000:]
    for rank in range(4):
        events = [e for e in result.events if e["rank"] == rank]
        sent = [e["step"] for e in events if e["event"] == "sent"]
        dropped = [e["step"] for e in events if e["event"] == "dropped"]
        assert sent == list(range(len(sent))) and dropped == list(range(len(sent), STEPS))


def watching_gaps(run: str) -> tuple[dict[int, float], list[Any], dict[str, Any], threading.Thread]:
    """An analytics of ``run`` running in a thread: the mean of ``u`` per step it saw, the
    ``Gap`` s it was told of, and ``{"summary": RunSummary}`` once ``run()`` returned."""
    from tests.test_failures import make_analytics

    analytics = make_analytics(run)
    seen: dict[int, float] = {}
    gaps: list[Any] = []
    analytics.on_gap(gaps.append)
    analytics.on_step("u")(lambda step, u: seen.__setitem__(step, float(u[0].mean().compute())))
    outcome: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("summary", analytics.run()))
    thread.start()
    return seen, gaps, outcome, thread


def test_a_lost_node_process_is_restarted_and_the_run_goes_on_after_the_gap(cluster: Any) -> None:
    """SIGKILL to the node actor of the second node mid-run (``node_restarts`` 3 by default): Ray restarts
    it on its node, its ranks reconnect at their next send, the run goes on. Both sides report the gap:
    the ranks dropped one contiguous range of steps (the same on every rank; a warning when it began and
    one when steps flowed again), the analytics gets one Gap naming the node, never a step inside it,
    and every other step with exact values; ``insitu status`` lists the restart."""
    import pytest
    import ray

    from insitu.actors.head import head_name
    from tests.conftest import expected_field
    from tests.test_failures import same_everywhere

    run, steps = run_name("restart"), 200
    seen, gaps, outcome, thread = watching_gaps(run)
    sim = start_sim(cluster, 4, {"run": run, "steps": steps, "sleep": 0.05}, env={"INSITU_DEADLINE": "20"})
    end = time.monotonic() + 120
    while _sent(sim) < 20 and time.monotonic() < end:
        time.sleep(0.2)
    head = ray.get_actor(head_name(run), namespace="insitu")
    pids = ray.get(head.node_processes.remote(), timeout=30)
    ip_of = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    lost = next(n for n in pids if ip_of[n] == cluster.node_ips[1])  # ranks 2 and 3 live there
    os.kill(pids[lost], signal.SIGKILL)
    end = time.monotonic() + 60
    while not gaps and time.monotonic() < end:
        time.sleep(0.2)
    assert gaps, "no gap reached the analytics within 60 s of the kill"
    restarts = ray.get(head.status.remote(), timeout=30)["node_restarts"]
    assert [(r["node"], r["epoch"], r["after"], r["resume"]) for r in restarts] == [
        (lost, 1, gaps[0].after, gaps[0].resume)]  # fmt: skip
    result = finish_sim(sim, timeout=180)
    thread.join(120)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = outcome["summary"]
    (gap,) = summary.gaps
    assert gaps == [gap] and gap.node == lost and gap.node_ip == cluster.node_ips[1]
    per_rank = {}
    for rank in range(4):
        events = [e for e in result.events if e["rank"] == rank]
        dropped = [e["step"] for e in events if e["event"] == "dropped"]
        done = next(e for e in events if e["event"] == "done")
        per_rank[rank] = (tuple(dropped), done["gaps"], done["dropped"], done["ok"])
    dropped, bridge_gaps, count, ok = same_everywhere(per_rank, 4)
    assert dropped and list(dropped) == list(range(dropped[0], dropped[-1] + 1)) and ok
    assert bridge_gaps == [[dropped[0], dropped[-1], len(dropped)]] and count == len(dropped)
    assert result.stderr.count("steps flow again from step") == 1, result.stderr[-3000:]
    assert gap.after < dropped[0] and dropped[-1] < gap.resume  # the ranks' gap lies inside the consumer's
    assert not set(seen) & set(gap.missing)
    assert set(seen) == set(range(steps)) - set(gap.missing) - set(gap.lost_retained) - set(summary.lost)
    assert gap.resume in seen and max(seen) == steps - 1
    for step, mean in seen.items():
        assert mean == pytest.approx(expected_field(step, (8, 6)).mean())


def test_a_short_soak_with_two_node_process_kills_loses_only_the_gaps_and_leaves_nothing() -> None:
    """``benchmarks/soak.py`` in short (1,000 steps at 64 KiB per rank, node processes SIGKILLed at
    steps 300 and 600, one per node): every value checked, the steps lost are exactly the gaps both
    sides were told of, RSS, descriptors and store bytes stay flat, nothing is left at the end."""
    out = Path(tempfile.mkdtemp(prefix="insitu-soak-test-")) / "soak.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "INSITU_"))}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.soak", "--steps", "1000", "--kill-every", "300",
                           "--sample-every", "250", "--pace", "0.01", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=400, check=False)  # fmt: skip
    assert out.exists(), proc.stdout[-2000:] + proc.stderr[-4000:]
    record = json.loads(out.read_text())
    assert record["sim_exit"] == 0, record["sim_stderr_tail"]
    why = {k: record.get(k) for k in ("kills", "gaps", "ranks_gaps", "analytics_end", "end_status")}
    assert len(record["kills"]) == 2 and len({k["node"] for k in record["kills"]}) == 2, why
    assert len(record["gaps"]) == 2 and not record["wrong_values"]
    assert record["loss_equals_gaps"], {k: record[k] for k in ("gaps", "ranks_gaps", "steps_missing", "steps_seen")}
    assert record["flat"], record["samples"]
    assert record["nothing_left"], record["left"]
    assert proc.returncode == 0, proc.stdout[-2000:]
