"""heat_stats' pictures and tables: ``stats.jsonl`` line by line, snapshots with one colour range
per run, the time series; and without matplotlib, one line on stderr and the statistics all the same.

heat2d runs under real ``mpiexec -n 4`` on the session's two-raylet Ray cluster and dumps the
global field per step (``--dump``), which is what the statistics are checked against.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import HEAT2D_PY, HEAT_STATS, mpi_command, run_coupled, run_name

pytestmark = pytest.mark.cluster

NX, NY = 40, 36
NO_MATPLOTLIB = "heat_stats: matplotlib is not installed (pip install 'insitu[plot]'): plots are off"
# runs heat_stats as ``python heat_stats.py ...`` does, with matplotlib made unimportable and stderr in a file
WITHOUT_MATPLOTLIB = (
    "import os, runpy, sys; os.dup2(os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2); "
    "sys.modules['matplotlib'] = None; sys.argv = sys.argv[2:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def _env(cluster: Any, tag: str) -> dict[str, str]:
    return {**os.environ, **cluster.environment(), "INSITU_RUN": run_name(tag), "INSITU_DEADLINE": "60"}


def _heat2d(cluster: Any, steps: int, dump: Path) -> list[str]:
    argv = [sys.executable, str(HEAT2D_PY), "--nx", str(NX), "--ny", str(NY), "--steps", str(steps), "--dump",
            str(dump)]  # fmt: skip
    return mpi_command(4, cluster.node_ips, argv)


def _lines(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]


def _assert_lines_match_fields(lines: list[dict[str, Any]], dump: Path, steps: int) -> None:
    """One line per step, in order, with the statistics numpy computes from the dumped fields."""
    assert [line["step"] for line in lines] == list(range(steps))
    prev = None
    for line in lines:
        field = np.load(dump / f"step{line['step']:05d}.npy")
        assert field.shape == (NX, NY)
        assert line["min"] == pytest.approx(field.min())
        assert line["mean"] == pytest.approx(field.mean())
        assert line["max"] == pytest.approx(field.max())
        if prev is None:
            assert "dmean_dt" not in line and "dmax_dt" not in line
        else:
            assert line["dmean_dt"] == pytest.approx((field - prev).mean(), abs=1e-12)
            assert line["dmax_dt"] == pytest.approx(np.abs(field - prev).max(), abs=1e-12)
        prev = field


def _assert_picture(path: Path) -> None:
    from matplotlib.image import imread

    image = imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4) and min(image.shape[:2]) >= 200, image.shape
    assert image[..., :3].std() > 0.05  # drawn, not blank


@pytest.mark.parametrize("colour_range", [None, (0.0, 50.0)], ids=["first-snapshot", "vmin-vmax"])
def test_stats_lines_snapshots_with_a_fixed_colour_range_and_the_time_series(
    cluster: Any, tmp_path: Path, colour_range: tuple[float, float] | None
) -> None:
    pytest.importorskip("matplotlib", reason="the plots need matplotlib: pip install -e '.[plot]'")
    steps, out, dump = 23, tmp_path / "out", tmp_path / "dump"
    ana = [sys.executable, str(HEAT_STATS), "--out", str(out), "--png-every", "10", "--plot-every", "7",
           "--print-every", "100"]  # fmt: skip
    if colour_range is not None:
        ana += ["--vmin", str(colour_range[0]), "--vmax", str(colour_range[1])]
    run_coupled(_heat2d(cluster, steps, dump), ana, _env(cluster, "plots"))

    lines = _lines(out)
    _assert_lines_match_fields(lines, dump, steps)
    final = json.loads((out / "stats.json").read_text())
    assert final == {"stats": {str(line["step"]): {k: v for k, v in line.items() if k != "step"} for line in lines},
                     "stop_sent_at": []}  # fmt: skip

    shots = [0, 10, 20]
    assert sorted(p.name for p in out.glob("*.png")) == [*(f"temperature_{s:05d}.png" for s in shots), "timeseries.png"]
    for path in out.glob("*.png"):
        _assert_picture(path)
    assert not list(out.glob(".*.tmp")), "a temporary file of an atomic write was left behind"
    first = np.load(dump / "step00000.npy")
    vmin, vmax = colour_range or (first.min(), first.max())
    record = json.loads((out / "snapshots.json").read_text())
    assert record["range_from"] == ("options" if colour_range else "first snapshot")
    assert (record["vmin"], record["vmax"]) == pytest.approx((vmin, vmax))
    assert sorted(record["snapshots"], key=int) == [str(s) for s in shots]
    for used in record["snapshots"].values():  # the range each picture was drawn with: the same for the run
        assert used == pytest.approx([vmin, vmax])


def test_without_matplotlib_heat_stats_says_so_once_and_keeps_the_statistics(cluster: Any, tmp_path: Path) -> None:
    steps, out, dump, err = 8, tmp_path / "out", tmp_path / "dump", tmp_path / "stderr.txt"
    ana = [sys.executable, "-c", WITHOUT_MATPLOTLIB, str(err), str(HEAT_STATS), "--out", str(out), "--png-every", "2",
           "--plot-every", "3", "--print-every", "100"]  # fmt: skip
    run_coupled(_heat2d(cluster, steps, dump), ana, _env(cluster, "nompl"))

    said = [line for line in err.read_text().splitlines() if "matplotlib" in line]
    assert said == [NO_MATPLOTLIB]
    _assert_lines_match_fields(_lines(out), dump, steps)
    assert sorted(json.loads((out / "stats.json").read_text())["stats"], key=int) == [str(s) for s in range(steps)]
    assert not list(out.glob("*.png")) and not (out / "snapshots.json").exists()


def test_a_killed_run_keeps_the_lines_it_computed(cluster: Any, tmp_path: Path) -> None:
    """Each line is on disk once its step is computed: read while heat_stats is parked, then kill -9 it."""
    park, out, dump = 5, tmp_path / "out", tmp_path / "dump"
    env = _env(cluster, "killed")
    err = tmp_path / "stderr.txt"
    with err.open("w") as fh:
        ana = subprocess.Popen([sys.executable, str(HEAT_STATS), "--out", str(out), "--park-at", str(park),
                                "--plot-every", "0", "--print-every", "100"], env=env,
                               stdout=subprocess.DEVNULL, stderr=fh)  # fmt: skip
    sim = subprocess.Popen(_heat2d(cluster, 12, dump), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)  # fmt: skip
    try:
        end, done = time.monotonic() + 90, 0
        while done < park and time.monotonic() < end and ana.poll() is None:
            time.sleep(0.2)
            if (out / "stats.jsonl").exists():
                done = (out / "stats.jsonl").read_text().count("\n")  # complete lines
        assert ana.poll() is None, err.read_text()[-3000:]
        assert done == park, f"{done} of {park} lines on disk while heat_stats runs"
        time.sleep(1.0)  # parked inside step `park`: nothing more comes
        ana.kill()
        ana.wait()
        _assert_lines_match_fields(_lines(out), dump, park)
        assert not (out / "stats.json").exists()  # written only at the end
    finally:
        if ana.poll() is None:
            ana.kill()
            ana.wait()
        if sim.poll() is None:
            os.killpg(sim.pid, signal.SIGKILL)
        sim.wait()
