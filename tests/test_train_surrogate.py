"""The shipped analytics/train_surrogate.py: online torch training on a slice of two hosts, next to heat2d.

Every torch test is in this module; it is skipped, with the reason, when torch is absent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DATA, HEAT2D_PY, mpi_command, run_name

torch = pytest.importorskip("torch", reason="torch is not installed (pip install torch); the training example needs it")

SLICE = {"insitu_slice_a": 1.0}


@pytest.fixture(scope="module")
def slice_cluster() -> Iterator[Any]:
    """Head + two raylets forming one emulated slice (each carries ``insitu_slice_a``)."""
    from insitu.cluster.local import LocalCluster

    with LocalCluster(nodes=3, cpus_per_node=2, resources={1: SLICE, 2: SLICE}) as cluster:
        yield cluster


def _train(cluster: Any, tmp: Path, extra: list[str]) -> tuple[dict[str, Any], str]:
    run = run_name("train")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "INSITU_"))}
    env.update(cluster.environment(), INSITU_RUN=run, INSITU_DEADLINE="120")
    out = tmp / "surrogate.json"
    ana = subprocess.Popen([sys.executable, str(DATA / "analytics" / "train_surrogate.py"), "--out", str(out),
                            "--hosts", "2", "--seed", "0", "--iters", "10", *extra], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    heat = [sys.executable, str(HEAT2D_PY), "--nx", "32", "--ny", "32", "--steps", "32"]
    try:
        sim = subprocess.run(mpi_command(4, cluster.node_ips, heat), env=env, capture_output=True, text=True,
                             timeout=240, check=False)  # fmt: skip
        stdout, stderr = ana.communicate(timeout=180)
    finally:
        if ana.poll() is None:
            ana.kill()
            ana.wait()
    assert sim.returncode == 0, sim.stderr[-2000:]
    assert ana.returncode == 0, stderr[-3000:]
    return json.loads(out.read_text()), stdout


@pytest.mark.timeout(300)
def test_training_on_a_cpu_slice_learns_and_keeps_hosts_in_step(slice_cluster: Any, tmp_path: Path) -> None:
    got, stdout = _train(slice_cluster, tmp_path, ["--device", "cpu"])
    losses = [got["loss"][k] for k in sorted(got["loss"], key=int)]
    assert len(losses) == 30  # 32 steps, windows of 3, steering off: every step trained on
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    host0, host1 = got["params"]  # one slice of two hosts, flat
    assert len(host0) == 2 * 9 + 1 and host0 == host1  # identical to the last bit
    assert [g.split(" on ")[0] for g in got["groups"]] == ["gloo rank 0/2", "gloo rank 1/2"]
    assert "loss" in stdout


@pytest.mark.timeout(300)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_training_on_a_gpu_slice(tmp_path: Path) -> None:
    from insitu.cluster.local import LocalCluster

    gpu_slice = {**SLICE, "GPU": 1.0}
    with LocalCluster(nodes=3, cpus_per_node=2, resources={1: gpu_slice, 2: gpu_slice}) as cluster:
        got, _ = _train(cluster, tmp_path, ["--device", "cuda"])
    losses = [got["loss"][k] for k in sorted(got["loss"], key=int)]
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])
    assert got["params"][0] == got["params"][1]
    assert all("nccl" in g for g in got["groups"])
