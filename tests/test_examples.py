"""The shipped examples run as users run them: heat2d + heat_stats (``insitu demo`` runs in test_wheel.py,
from an installed wheel)."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import HEAT2D_PY, HEAT_STATS, mpi_command, run_coupled, run_name

pytestmark = pytest.mark.cluster


def test_heat2d_with_heat_stats_matches_numpy_and_stops_by_steering(cluster: Any, tmp_path: Path) -> None:
    run = run_name("heat")
    env = {**os.environ, **cluster.environment(), "INSITU_RUN": run, "INSITU_DEADLINE": "60"}
    out, dump = tmp_path / "out", tmp_path / "dump"
    ana = [sys.executable, str(HEAT_STATS), "--out", str(out), "--threshold", "20", "--png-every", "5",
           "--print-every", "100"]  # fmt: skip
    heat2d = [sys.executable, str(HEAT2D_PY), "--nx", "40", "--ny", "36"]
    sim = run_coupled(mpi_command(4, cluster.node_ips, [*heat2d, "--steps", "200", "--dump", str(dump)]), ana, env)
    result = json.loads((out / "stats.json").read_text())
    stats = {int(k): v for k, v in result["stats"].items()}
    for step, s in stats.items():
        field = np.load(dump / f"step{step:05d}.npy")
        assert s["min"] == pytest.approx(field.min())
        assert s["mean"] == pytest.approx(field.mean())
        assert s["max"] == pytest.approx(field.max())
        if step > 0:
            prev = np.load(dump / f"step{step - 1:05d}.npy")
            assert s["dmean_dt"] == pytest.approx((field - prev).mean(), abs=1e-12)
    (stop_sent,) = result["stop_sent_at"]
    stopped = {int(r): int(s) for r, s in re.findall(r"rank (\d+) stopped after step (\d+)", sim.stderr)}
    assert len(stopped) == 4 and len(set(stopped.values())) == 1, stopped
    t = next(iter(stopped.values()))
    assert stop_sent < t <= stop_sent + 3
    assert stats[stop_sent]["max"] < 20 <= stats[stop_sent - 1]["max"]
    assert sorted(p.name for p in out.glob("*.png"))[:2] == ["temperature_00000.png", "temperature_00005.png"]

