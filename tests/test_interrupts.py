"""Interrupted commands leave nothing (issue 17 item 4): SIGTERM or SIGINT to `insitu demo` mid-run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import processes_mentioning, wait_nothing_left


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_insitu_demo_mid_run_tears_down_everything_it_started(tmp_path: Path, sig: int) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "INSITU_"))}
    demo = subprocess.Popen([sys.executable, "-m", "insitu", "demo", "--steps", "100000", "--out", str(tmp_path)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    signalled = False
    try:
        assert demo.stdout is not None
        run = re.search(r"insitu demo: run (\S+),", demo.stdout.readline())
        assert run, "the demo did not name its run"
        address = ""
        end = time.monotonic() + 180
        while time.monotonic() < end and not address:
            line = demo.stdout.readline()
            found = re.search(r"private Ray cluster (\S+) up", line)
            address = found[1] if found else ""
        assert address, "the demo did not bring its cluster up"
        end = time.monotonic() + 120
        stats = tmp_path / "stats.jsonl"
        while time.monotonic() < end and not (stats.exists() and stats.read_text().count("\n")):
            time.sleep(0.5)
        assert stats.exists() and stats.read_text().count("\n"), "the demo's analytics never computed a step"
        assert processes_mentioning(address), "the demo's raylets should be running now"
        ranks = processes_mentioning(f"INSITU_RUN={run[1]}", where="environ")
        assert any("heat2d.py" in r for r in ranks), "the demo's simulation ranks should be running now"
        demo.send_signal(sig)
        signalled = True
    finally:  # a failure above must not leave the demo (and its cluster) to the next tests
        if not signalled:
            demo.send_signal(signal.SIGTERM)
            demo.communicate(timeout=90)
    _, err = demo.communicate(timeout=90)
    assert demo.returncode == 128 + sig, err[-2000:]
    assert f"interrupted by {signal.Signals(sig).name}; everything it started was torn down" in err
    assert "Traceback" not in err, err[-3000:]
    # a run driver inside a Ray call when the cluster vanished ends at Ray's GCS reconnect timeout (60 s)
    end = time.monotonic() + 90
    while time.monotonic() < end and (processes_mentioning(address)
                                      or processes_mentioning(f"INSITU_RUN={run[1]}", where="environ")):  # fmt: skip
        time.sleep(0.5)
    assert processes_mentioning(address) == []  # raylets, GCS, workers of its private cluster
    assert processes_mentioning(f"INSITU_RUN={run[1]}", where="environ") == []  # analytics, mpiexec, ranks
    assert list(Path("/dev/shm").glob("insitu-demo-*")) == []


_KEEPS_HANDLER = """
import os, signal, sys, time
from insitu.comm import connect_ray
from insitu.config import Config
got = []
signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
connect_ray(Config.from_env())
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.2)
print(got, signal.getsignal(signal.SIGTERM).__name__)
"""


def test_connecting_to_ray_leaves_the_process_its_own_sigterm_handler(cluster: object) -> None:
    """``ray.init`` sets SIGTERM to ``sys.exit``; insitu's connection puts the process's handler back
    (an analytics drawing with matplotlib at SIGTERM printed a traceback; a command's teardown was skipped)."""
    proc = subprocess.run([sys.executable, "-c", _KEEPS_HANDLER], capture_output=True, text=True, timeout=120,
                          check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["[15]", "<lambda>"]


def test_sigterm_to_an_analytics_detaches_it_at_the_next_step_and_exits_143(cluster: object) -> None:
    """SIGTERM lands while a callback runs (a 2 s sleep): the callback finishes, the analytics leaves
    the run as *detached* (a SIGKILLed one is *failed*), and exits 143; the simulation goes on."""
    from tests.conftest import finish_sim, run_name, start_sim
    from tests.test_consumers import head_stats, start_ana

    run = run_name("sigterm")
    ana = start_ana(cluster, {"run": run, "sleep": 2.0})
    proc = start_sim(cluster, 2, {"run": run, "steps": 40, "sleep": 0.2})
    assert ana.stdout is not None
    first = json.loads(ana.stdout.readline())
    assert first["step"] == 0  # now in step 0's 2 s sleep
    ana.send_signal(signal.SIGTERM)
    rest, _ = ana.communicate(timeout=60)
    assert ana.returncode == 143
    assert [json.loads(line).get("step") for line in rest.splitlines()] == []  # no step after the signal
    stats = head_stats(run)  # while the simulation still runs (40 steps of 0.2 s)
    assert [c["state"] for c in stats["consumers"].values()] == ["DETACHED"], stats["consumers"]
    assert stats["analytics"] == "DETACHED"  # what the ranks are told (FAILED for a killed one)
    result = finish_sim(proc)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not result.by_rank("send-error")  # policy continue: the steps after the detach are dropped
    done = result.one("done")
    assert sorted(done) == [0, 1] and all(d["dropped"] > 0 and not d["ok"] for d in done.values()), done


def test_sigterm_to_the_benchmark_harness_mid_run_tears_down_its_cluster_and_simulation(tmp_path: Path) -> None:
    """``python -m benchmarks.run`` SIGTERMed while its simulation runs: exit 143 with one line, the
    JSON written so far kept, and no process left of its private cluster (4 raylets and their
    workers), its run driver, mpiexec or ranks: each has the harness's private directory in its
    environment (the cluster's token path)."""
    from tests.conftest import ROOT

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "INSITU_"))}
    out = tmp_path / "bench.json"
    tmp = Path(tempfile.gettempdir())
    before = set(tmp.glob("insitu-bench-*"))
    others = {*tmp.glob("insitu-driver-*"), *tmp.glob("hydra_*")}  # a spawned driver's log, mpiexec's topology
    bench = subprocess.Popen([sys.executable, "-m", "benchmarks.run", "--sections", "insitu", "--sizes", "65536",
                              "--steps", "100000", "--out", str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    end = time.monotonic() + 180
    ranks: list[str] = []
    base = None
    while time.monotonic() < end and bench.poll() is None and len(ranks) < 4:
        made = set(tmp.glob("insitu-bench-*")) - before
        base = base or (made.pop() if made else None)
        if base is not None:
            ranks = [p for p in processes_mentioning(str(base), where="environ") if "sim_bench.py" in p
                     and "mpiexec" not in p]  # fmt: skip
        time.sleep(0.2)
    if len(ranks) < 4:
        bench.kill()
        pytest.fail(f"the harness's 4 ranks never ran: {ranks}\n{bench.communicate()[1][-3000:]}")
    time.sleep(2)  # well inside the run
    assert any("raylet" in p for p in processes_mentioning(str(base), where="environ"))
    bench.send_signal(signal.SIGTERM)
    _, err = bench.communicate(timeout=120)
    assert bench.returncode == 143, err[-3000:]
    assert err.strip().splitlines()[-1] == ("benchmarks.run: interrupted by SIGTERM; its cluster and simulations "
                                            "were torn down"), err[-3000:]  # fmt: skip
    assert "Traceback" not in err, err[-3000:]
    assert json.loads(out.read_text())["finished_utc"]  # what was measured is kept
    left = wait_nothing_left({str(base): "environ"}, timeout=60)
    assert left == {}, left
    assert base is not None and not base.exists()
    assert list(Path("/dev/shm").glob("insitu-bench-*")) == []
    assert {*tmp.glob("insitu-driver-*"), *tmp.glob("hydra_*")} - others == set()


def test_stop_from_another_thread_detaches_the_analytics_at_the_next_step(cluster: object) -> None:
    """``Analytics.stop()`` (how a program running ``run()`` in a thread ends it, as the benchmark
    harness does when interrupted): ``run()`` returns with reason STOPPED after the steps it
    processed, the consumer is DETACHED, and the simulation finishes."""
    import threading

    import insitu
    from insitu.messages import EndReason
    from tests.conftest import finish_sim, run_name, start_sim
    from tests.test_consumers import head_stats

    run = run_name("stop")
    proc = start_sim(cluster, 2, {"run": run, "steps": 60, "sleep": 0.1})
    analytics = insitu.Analytics(run=run, deadline=60)
    seen: list[int] = []
    third = threading.Event()

    @analytics.on_step("u")
    def count(step: int, u: list) -> None:
        seen.append(step)
        if len(seen) == 3:
            third.set()

    done: dict[str, object] = {}
    thread = threading.Thread(target=lambda: done.update(summary=analytics.run()))
    thread.start()
    assert third.wait(60), "the analytics never processed 3 steps"
    analytics.stop()
    thread.join(30)
    assert not thread.is_alive()
    summary = done["summary"]
    assert isinstance(summary, insitu.RunSummary)
    assert summary.reason == EndReason.STOPPED
    assert summary.steps == len(seen) and summary.last_step == seen[-1] and seen == list(range(len(seen)))
    assert len(seen) < 60  # left part-way
    assert [c["state"] for c in head_stats(run)["consumers"].values()] == ["DETACHED"]
    assert finish_sim(proc).returncode == 0
