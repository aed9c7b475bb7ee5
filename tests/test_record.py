"""Record a run to Zarr next to its analytics, open it with xarray (insitu.record)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import HEAT2D_PY, HEAT_STATS, mpi_command, run_coupled, run_name
from tests.test_consumers import wait_consumers

pytestmark = pytest.mark.cluster


def cluster_nodes(cluster: Any) -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] in cluster.node_ips]


def test_record_next_to_the_analytics_then_open_with_xarray(cluster: Any, tmp_path: Path) -> None:
    import zarr

    import insitu

    run = run_name("rec")
    env = {**os.environ, **cluster.environment(), "INSITU_RUN": run, "INSITU_DEADLINE": "60"}
    store, dump = tmp_path / "rec.zarr", tmp_path / "dump"
    recorder = subprocess.Popen([sys.executable, "-m", "insitu", "record", "--arrays", "temperature", "--every", "2",
                                 "--out", str(store)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)  # fmt: skip
    try:
        wait_consumers(run, 1)
        heat2d = [sys.executable, str(HEAT2D_PY), "--nx", "40", "--ny", "36", "--steps", "11", "--dump", str(dump)]
        ana = [sys.executable, str(HEAT_STATS), "--out", str(tmp_path / "out"), "--print-every", "100"]
        run_coupled(mpi_command(4, cluster.node_ips, heat2d), ana, env)
        out, err = recorder.communicate(timeout=120)
    finally:
        if recorder.poll() is None:
            recorder.kill()
    assert recorder.returncode == 0, err[-3000:]
    assert "recorded 6 steps" in err and "last step 10" in err, err
    assert "6 steps of temperature" in out

    ds = insitu.open_recording(store)
    assert ds.temperature.dims == ("step", "temperature_d0", "temperature_d1")
    assert list(ds.step.values) == [0, 2, 4, 6, 8, 10]
    assert ds.time.dtype == np.dtype("datetime64[ns]") and bool((np.diff(ds.time.values) >= np.timedelta64(0)).all())
    for step in ds.step.values:
        np.testing.assert_array_equal(ds.temperature.sel(step=step).values, np.load(dump / f"step{step:05d}.npy"))
    meta = ds.attrs["insitu"]
    assert meta["run"] == run and meta["size"] == 4 and meta["every"] == 2
    assert meta["arrays"]["temperature"]["chunks"] == [[20, 20], [18, 18]]
    assert sorted(r for _, r in meta["arrays"]["temperature"]["owners"]) == [0, 1, 2, 3]
    # each block was written by the node holding it: both raylets wrote, 1/2 of the bytes each
    by_node = meta["bytes_by_node"]
    assert sorted(by_node) == sorted(n["NodeID"] for n in cluster_nodes(cluster))
    assert set(by_node.values()) == {6 * 40 * 36 * 8 // 2}
    # an even 2 x 2 split: one Zarr chunk per block and step
    assert zarr.open_group(store, mode="r")["temperature"].chunks == (1, 20, 18)

    # replay through a real Bridge, heat_stats unchanged: the recorded decomposition and nodes give the live
    # run's statistics bit for bit; 3 ranks (a 3 x 1 uneven split) give exact min/max and means to 1e-12
    live = _stats(tmp_path / "out")
    for ranks, exact_mean in ((None, True), (3, False)):
        replay_run = run_name("replay")
        out_dir = tmp_path / f"replay-{ranks}"
        renv = {**env, "INSITU_RUN": replay_run}
        cmd = [sys.executable, "-m", "insitu", "replay", str(store), "--run", replay_run]
        cmd += ["--ranks", str(ranks)] if ranks else []
        ana = [sys.executable, str(HEAT_STATS), "--out", str(out_dir), "--print-every", "100"]
        sim = run_coupled(cmd, ana, renv)
        assert json.loads(sim.stdout.strip().splitlines()[-1]) == {"replayed": 6, "ranks": ranks or 4}
        got = _stats(out_dir)
        assert sorted(got) == [0, 2, 4, 6, 8, 10]
        for step, s in got.items():
            assert (s["min"], s["max"]) == (live[step]["min"], live[step]["max"])
            if exact_mean:
                assert s["mean"] == live[step]["mean"]
            else:
                assert s["mean"] == pytest.approx(live[step]["mean"], rel=1e-12)


def _stats(out: Path) -> dict[int, dict[str, float]]:
    return {int(k): v for k, v in json.loads((out / "stats.json").read_text())["stats"].items()}


def test_uneven_blocks_get_a_chunk_grid_that_divides_every_block() -> None:
    from insitu.record import zarr_chunks

    assert zarr_chunks(((21, 20), (18, 18))) == (1, 18)
    assert zarr_chunks(((12, 8, 4),)) == (4,)


def test_a_store_one_node_cannot_see_is_refused_naming_that_node(tmp_path: Path) -> None:
    """Raylet 1 runs in its own mount namespace with a tmpfs over the store's directory: it cannot see it."""
    from insitu.cluster.local import LocalCluster
    from tests.conftest import start_sim

    shared = tmp_path / "shared"
    shared.mkdir()
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs none {shared}"], capture_output=True,
                           text=True, check=False)  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"mount namespaces are denied here: {probe.stderr.strip()}")
    hide = ["unshare", "-m", "sh", "-c", f'mount -t tmpfs none {shared} && exec "$@"', "sh"]
    with LocalCluster(nodes=2, cpus_per_node=1, wrappers={1: hide}) as c:  # a short base dir (socket paths)
        run = run_name("blind")
        env = {**os.environ, **c.environment(), "INSITU_RUN": run, "INSITU_DEADLINE": "60"}
        sim = start_sim(c, 2, {"run": run, "steps": 400, "sleep": 0.05})
        recorder = subprocess.run([sys.executable, "-m", "insitu", "record", "--arrays", "u", "--out",
                                   str(shared / "rec.zarr")], env=env, capture_output=True, text=True,
                                  timeout=180, check=False)  # fmt: skip
        sim.kill()
        sim.wait()
    assert recorder.returncode == 1, recorder.stderr[-3000:]
    err = recorder.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in recorder.stderr, recorder.stderr[-3000:]
    assert f"the recording store {shared / 'rec.zarr'} is not visible from node(s) {c.node_ips[1]} (" in err[0]
    assert "of the 2 holding the run's blocks" in err[0]


def test_interrupted_record_and_replay_keep_a_usable_recording_and_leave_nothing(cluster: Any, tmp_path: Path) -> None:
    """Issue 17 item 4. ``insitu record`` SIGINTed mid-run: one line, exit 130, the recorder leaves
    the run as *detached* (the simulation goes on), and the store holds every step up to the last
    whole one, exact. ``insitu replay --pace recorded`` of it SIGTERMed mid-replay: one line, exit
    143; every rank stops before the same step and closes, so the analytics ends normally with a
    prefix of the steps; no rank or mpiexec is left."""
    import insitu
    from tests.conftest import expected_field, finish_sim, processes_mentioning, start_sim, wait_nothing_left
    from tests.test_consumers import head_stats, start_ana

    run = run_name("recint")
    env = {**os.environ, **cluster.environment(), "INSITU_RUN": run, "INSITU_DEADLINE": "60"}
    store = tmp_path / "rec.zarr"
    recorder = subprocess.Popen([sys.executable, "-m", "insitu", "record", "--arrays", "u", "--out", str(store)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert recorder.stderr is not None
    wait_consumers(run, 1)
    sim = start_sim(cluster, 4, {"run": run, "steps": 60, "sleep": 0.2, "shape": [16, 12]})
    while "recorded 20 steps" not in (line := recorder.stderr.readline()):
        assert line, f"the recorder ended early: {recorder.communicate()}"
    recorder.send_signal(signal.SIGINT)
    _, err = recorder.communicate(timeout=60)
    assert recorder.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == "insitu record: interrupted by SIGINT; everything it started was torn down"
    assert "Traceback" not in err, err[-3000:]
    assert [c["state"] for c in head_stats(run)["consumers"].values()] == ["DETACHED"]
    assert finish_sim(sim).returncode == 0
    ds = insitu.open_recording(store)
    steps = [int(s) for s in ds.step.values]
    assert len(steps) >= 20 and steps == list(range(len(steps))), steps
    for step in steps:
        np.testing.assert_array_equal(ds.u.sel(step=step).values, expected_field(step, (16, 12)))

    replay_run = run_name("repint")
    ana = start_ana(cluster, {"run": replay_run})
    assert ana.stdout is not None
    replay = subprocess.Popen([sys.executable, "-m", "insitu", "replay", str(store), "--run", replay_run, "--pace",
                               "recorded"], env={**env, "INSITU_RUN": replay_run}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    first = json.loads(ana.stdout.readline())
    assert first["step"] == 0
    assert len(processes_mentioning(f"INSITU_RUN={replay_run}", where="environ")) >= 5  # mpiexec and 4 ranks
    replay.send_signal(signal.SIGTERM)
    _, err = replay.communicate(timeout=60)
    assert replay.returncode == 143, err[-3000:]
    assert err.strip().splitlines()[-1] == "insitu replay: interrupted by SIGTERM; everything it started was torn down"
    assert "Traceback" not in err, err[-3000:]
    rest, _ = ana.communicate(timeout=60)
    assert ana.returncode == 0, rest  # the run closed: no rank died
    lines = [json.loads(line) for line in rest.splitlines()]
    got = [0] + [x["step"] for x in lines if "step" in x]
    assert got == list(range(len(got))) and len(got) < len(steps), got  # stopped part-way, nothing skipped
    assert lines[-1]["done"] == len(got)
    assert wait_nothing_left({f"INSITU_RUN={replay_run}": "environ"}, timeout=30) == {}
