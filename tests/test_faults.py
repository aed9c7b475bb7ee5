"""Faults in a run (issue 17): the whole Ray cluster goes away, or one node process dies, under a running simulation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

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


def _running(cluster: Any, run: str) -> tuple[list[int], list[BaseException], threading.Thread, Any]:
    """An analytics on ``u`` in a thread (steps seen, its failure) and a 4-rank, 400-step simulation
    that has sent at least 5 steps."""
    from tests.test_failures import make_analytics

    analytics = make_analytics(run)
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
    sim = start_sim(cluster, 4, {"run": run, "steps": 400, "sleep": 0.05}, env={"INSITU_DEADLINE": "20"})
    end = time.monotonic() + 120
    while _sent(sim) < 5 and time.monotonic() < end:
        time.sleep(0.2)
    assert _sent(sim) >= 5, "the simulation did not start sending"
    return seen, failure, thread, sim


def test_a_lost_node_process_is_named_by_the_analytics_and_the_simulation(cluster: Any) -> None:
    """SIGKILL to the node actor of the second node mid-run: the analytics ends with NodeLostError naming
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
        assert sent == list(range(len(sent))) and dropped == list(range(len(sent), 400))
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
        assert sent == list(range(len(sent))) and dropped == list(range(len(sent), 400))


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
            sim = start_sim(c, 4, {"run": run, "steps": 200, "sleep": 0.05}, env={"INSITU_DEADLINE": "20"})
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
        assert sent == list(range(len(sent))) and dropped == list(range(len(sent), 200))
