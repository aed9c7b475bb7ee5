"""insitu.compat.deisa: deisa-ray programs on insitu with only their imports changed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from insitu.errors import ContractError
from tests.conftest import DATA, ROOT, mpi_command, run_coupled, run_name

GRAY_SCOTT = DATA / "examples" / "python" / "gray_scott.py"
GRAY_SCOTT_STATS = DATA / "analytics" / "gray_scott_stats.py"


def test_metadata_maps_to_blocks_and_a_bad_entry_on_one_rank_raises_on_every_rank() -> None:
    cmd = mpi_command(4, ["127.0.0.1"], [sys.executable, str(ROOT / "tests/sims/deisa_metadata.py")])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "INSITU_"))}
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ranks = {r["rank"]: r for r in json.loads(proc.stdout.strip().splitlines()[-1])}
    assert sorted(ranks) == [0, 1, 2, 3]
    # uneven 2x2 split of (10, 7): rows 6 + 4, columns 4 + 3; start = extents of the lower positions
    expected = {0: ((0, 0), (6, 4)), 1: ((0, 4), (6, 3)), 2: ((6, 0), (4, 4)), 3: ((6, 4), (4, 3))}
    for rank, (start, shape) in expected.items():
        for name in ("U", "V"):
            assert ranks[rank]["blocks"][name] == {"global_shape": [10, 7], "start": list(start), "shape": list(shape)}
    malformed = {r["rank"]: r["malformed"] for r in ranks.values()}
    assert all(m == malformed[0] for m in malformed.values())  # the same exception on every rank
    assert malformed[0]["raised"] == "ContractError"
    assert malformed[0]["message"] == "rank 2: array 'V': chunk_shape must contain only integers; got (4, '3')"
    overlap = {r["rank"]: r["overlap"] for r in ranks.values()}
    assert all(o == overlap[0] for o in overlap.values())
    assert overlap[0] == {
        "raised": "ContractError",
        "message": "array 'U': blocks overlap: ranks 2, 3 all declare block (1, 0)",
    }
    assert all(r["after_ok"] for r in ranks.values())
    incomplete = {r["rank"]: r["incomplete"] for r in ranks.values()}
    assert all(i == incomplete[0] for i in incomplete.values())
    assert incomplete[0]["raised"] == "SendError"
    assert "lacks array 'V'" in incomplete[0]["message"]
    not_array = {r["rank"]: r["not_array"] for r in ranks.values()}
    assert all(n == not_array[0] for n in not_array.values())
    assert not_array[0]["raised"] == "SendError"
    assert not_array[0]["message"].startswith("rank 1: array 'U': not an array (ValueError")


def test_deisa_analytics_refuses_what_insitu_cannot_keep() -> None:
    from insitu.compat.deisa import Deisa, Window

    with pytest.raises(ContractError, match="ray_start is not supported"):
        Deisa(ray_start=lambda: None)
    d = Deisa()
    with pytest.raises(ContractError, match="while execute_callbacks"):
        d.set("k", 1, timestep=0)
    with pytest.raises(ContractError, match="window sizes must be >= 1"):
        d.register(Window("U", size=0))(lambda U: None)  # noqa: N803
    with pytest.raises(ContractError, match="register at least one callback"):
        d.execute_callbacks()


def reference(dump: Path, steps: int) -> dict[int, dict[str, float]]:
    out = {}
    for step in range(steps):
        f = np.load(dump / f"step{step:05d}.npz")
        out[step] = {"U_mean": f["U"].mean(), "U_max": f["U"].max(), "V_mean": f["V"].mean(), "V_max": f["V"].max()}
    return out


@pytest.mark.cluster
def test_gray_scott_in_deisa_form_runs_on_insitu_and_matches_numpy(cluster: Any, tmp_path: Path) -> None:
    steps = 30
    run = run_name("deisa")
    env = {**os.environ, **cluster.environment(), "INSITU_RUN": run, "INSITU_DEADLINE": "60"}
    out, dump = tmp_path / "stats.json", tmp_path / "dump"
    sim_cmd = [sys.executable, str(GRAY_SCOTT), "--n", "30", "--steps", str(steps), "--dump", str(dump), "--pack"]
    sim = run_coupled(mpi_command(4, cluster.node_ips, sim_cmd), [sys.executable, str(GRAY_SCOTT_STATS),
                      "--out", str(out)], env, timeout=120)  # fmt: skip
    stats: dict[str, Any] = json.loads(out.read_text())
    ref = reference(dump, steps)
    assert sorted(map(int, stats)) == list(range(steps))  # every timestep, once
    for step, want in ref.items():
        got = stats[str(step)]
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-15), (step, key)
        # deisa-ray windows: partial first, then the last two timesteps, oldest first
        assert got["window"] == ([0] if step == 0 else [step - 1, step])
        if step:
            assert got["dV_mean"] == pytest.approx(want["V_mean"] - ref[step - 1]["V_mean"], abs=1e-12)
        else:
            assert "dV_mean" not in got
    assert ref[steps - 1]["V_mean"] != pytest.approx(ref[0]["V_mean"], rel=1e-6)  # the fields did evolve
    # feedback: Deisa.set(key, value, timestep) reaches Bridge.get(key) as [(timestep, value), ...]
    line = next(x for x in sim.stdout.splitlines() if x.startswith("feedback "))
    feedback = json.loads(line.removeprefix("feedback "))
    assert feedback, sim.stdout
    assert [t for t, _ in feedback] == list(range(len(feedback)))
    for t, value in feedback:
        assert value == pytest.approx(ref[t]["V_mean"], rel=1e-12)


@pytest.mark.cluster
def test_per_array_windows_exception_handlers_and_ray_address(cluster: Any, tmp_path: Path) -> None:
    steps = 5
    env = {k: v for k, v in os.environ.items() if k != "INSITU_ADDRESS"}
    env.update(cluster.environment(), INSITU_RUN=run_name("deisa-win"), INSITU_DEADLINE="60")
    env["RAY_ADDRESS"] = env.pop("INSITU_ADDRESS")  # deisa-ray's variable: both sides find the cluster by it
    out = tmp_path / "seen.json"
    sim_cmd = [sys.executable, str(GRAY_SCOTT), "--n", "16", "--steps", str(steps)]
    run_coupled(mpi_command(4, cluster.node_ips, sim_cmd), [sys.executable, str(ROOT / "tests/sims/deisa_ana.py"),
                str(out)], env, timeout=120)  # fmt: skip
    seen = json.loads(out.read_text())
    assert seen["steps"] == steps
    # per-array windows, partial from the first timestep, oldest first; .t, .timestep and .step agree
    assert seen["reaction"] == [{"U": list(range(max(0, t - 2), t + 1)), "V": [t], "step": t} for t in range(steps)]
    # the handler saw the exception and every timestep still reached the callback
    assert seen["flaky"] == list(range(steps))
    assert seen["handled"] == ["ValueError: planned failure at timestep 1"]
    assert seen["summary_handled"] == {"flaky": 1}


@pytest.mark.cluster
def test_arrays_at_their_own_cadence_in_deisa_form(cluster: Any, tmp_path: Path) -> None:
    """V every 3rd timestep: "AND" runs at V's timesteps, "OR" at every timestep with V's latest window."""
    steps = 7
    env = {**os.environ, **cluster.environment(), "INSITU_RUN": run_name("deisa-cad"), "INSITU_DEADLINE": "60"}
    out, dump = tmp_path / "seen.json", tmp_path / "dump"
    sim_cmd = [sys.executable, str(GRAY_SCOTT), "--n", "16", "--steps", str(steps), "--v-every", "3", "--dump",
               str(dump)]  # fmt: skip
    run_coupled(mpi_command(4, cluster.node_ips, sim_cmd), [sys.executable, str(ROOT / "tests/sims/deisa_ana.py"),
                str(out), "--cadence"], env, timeout=120)  # fmt: skip
    seen = json.loads(out.read_text())
    assert seen["and"] == [{"U": [0], "V": [0]}, {"U": [3], "V": [0, 3]}, {"U": [6], "V": [3, 6]}]
    v_at = {0: [0], 1: [0], 2: [0], 3: [0, 3], 4: [0, 3], 5: [0, 3], 6: [3, 6]}
    assert [(e["U"], e["V"]) for e in seen["or"]] == [([t], v_at[t]) for t in range(steps)]
    ref = reference(dump, steps)
    for t, e in enumerate(seen["or"]):
        assert e["V_mean"] == pytest.approx(ref[v_at[t][-1]]["V_mean"], rel=1e-12)
    assert seen["steps"] == steps
