"""deisa-ray peer: the benchmark simulation and the global-mean analytics on deisa-ray.

deisa-ray needs Python >= 3.12 and pins its own dask, so it runs in its own virtualenv
(built by ``benchmarks/sections_peers.py``, section ``deisa``) against its own single-raylet Ray
cluster started from that virtualenv (a Ray driver must run the cluster's Python).

Modes (run with the virtualenv's Python, the repository on ``PYTHONPATH``)::

    python peer_deisa.py orchestrate '<json: cases [{size, pace, pace_arg}], steps, warmup, ranks, out>'
    python peer_deisa.py analytics '<json: steps, out>'

The simulation is ``sim_bench.py`` with ``"deisa": true``. deisa-ray's ranks own their
chunks (``ray.put`` in the rank), so a rank must not close before the analytics has read
its last step (every pending read would fail with ``OwnerDiedError``): the analytics
publishes a ``done`` feedback value for the last step and the ranks poll it before closing.
That wait happens after the timed loop and is not part of the send cost.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DONE_KEY = "insitu_bench_done"


def analytics(opt: dict[str, Any]) -> int:
    """Global mean per step on deisa-ray; writes the wall time the last step finished."""
    from deisa.ray import Deisa

    total = opt["steps"]
    state: dict[str, Any] = {"n": 0, "t_end": None}
    d = Deisa()

    @d.register("u")
    def mean(u: list) -> None:
        float(u[0].mean().compute())
        state["t_end"] = time.time()
        step = state["n"]
        state["n"] += 1
        if step == total - 1:
            d.set(DONE_KEY, True, timestep=step)

    d.execute_callbacks()
    Path(opt["out"]).write_text(json.dumps({"t_end": state["t_end"], "steps": state["n"]}))
    return 0


def _one(case: dict[str, Any], opt: dict[str, Any], work: Path) -> dict[str, Any]:
    from insitu.cli import mpiexec_mpmd
    from insitu.cluster.local import LocalCluster

    size = case["size"]
    base = Path(tempfile.mkdtemp(prefix="c", dir=work))  # short: Ray sockets live below it
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(base / "auth_token")
    total = opt["steps"] + opt["warmup"]
    with LocalCluster(nodes=1, cpus_per_node=opt["ranks"] + 2, base_dir=str(base), object_store_bytes=1 << 30) as c:
        env = {**os.environ, **c.environment(), "RAY_ADDRESS": c.address, "DEISA_RAY_ADDRESS": c.address}
        ana_out = base / "analytics.json"
        ana = subprocess.Popen(
            [sys.executable, __file__, "analytics", json.dumps({"steps": total, "out": str(ana_out)})],
            env=env, stdout=subprocess.DEVNULL, stderr=open(base / "analytics.err", "w"),  # noqa: SIM115
        )  # fmt: skip
        try:
            sim_out = base / "sim"
            sim_out.mkdir()
            sim_opt = {"chunk": size, "steps": opt["steps"], "warmup": opt["warmup"], "insitu": False,
                       "pace": case.get("pace", "none"), "pace_arg": case.get("pace_arg", 0),
                       "deisa": {"done_key": DONE_KEY, "deadline": 600}, "out": str(sim_out)}  # fmt: skip
            argv = [sys.executable, str(HERE / "sim_bench.py"), json.dumps(sim_opt)]
            proc = subprocess.run(mpiexec_mpmd(opt["ranks"], c.node_ips, argv), env=env, capture_output=True,
                                  text=True, timeout=1800, check=False)  # fmt: skip
            if proc.returncode != 0:
                raise RuntimeError(f"deisa-ray simulation failed:\n{proc.stderr[-3000:]}")
            ana.wait(600)
            got = json.loads(ana_out.read_text())
        finally:
            if ana.poll() is None:
                ana.kill()
                ana.wait()
        per_rank = [json.loads((sim_out / f"rank{r}.json").read_text()) for r in range(opt["ranks"])]
    sends = sorted(x for r in per_rank for x in r["send_s"])
    loops = sorted(x for r in per_rank for x in r["loop_s"])
    first = per_rank[0]["first_send_wall"]
    return {
        **case,
        "loop_median_s": loops[len(loops) // 2],
        "steps": got["steps"],
        "send_median_s": sends[len(sends) // 2],
        "send_p95_s": sends[min(len(sends) - 1, int(0.95 * len(sends)))],
        "e2e_per_step_s": (got["t_end"] - first) / total,
    }


def orchestrate(opt: dict[str, Any]) -> int:
    """One fresh cluster per case (deisa-ray's detached actors outlive a run); JSON rows to ``out``.

    A failed case is run again on a fresh cluster, at most ``opt["retries"]`` times; its row
    records ``attempts`` and the earlier errors (``retry_errors``), or ``error`` if all failed.
    """
    work = Path(tempfile.mkdtemp(prefix="deisa-"))
    rows: list[dict[str, Any]] = []
    tries = opt.get("retries", 2) + 1
    try:
        for case in opt["cases"]:
            errors: list[str] = []
            for attempt in range(1, tries + 1):
                try:
                    row = {**_one(case, opt, work), "attempts": attempt}
                except Exception as exc:  # noqa: BLE001 - recorded in the row and retried
                    errors.append(f"{type(exc).__name__}: {str(exc)[-600:]}")
                    continue
                if errors:
                    row["retry_errors"] = errors
                break
            else:
                row = {**case, "error": errors[-1], "attempts": tries, "retry_errors": errors}
            rows.append(row)
            Path(opt["out"]).write_text(json.dumps(rows))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    mode, arg = sys.argv[1], json.loads(sys.argv[2])
    sys.exit({"analytics": analytics, "orchestrate": orchestrate}[mode](arg))
