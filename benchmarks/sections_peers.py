"""Sections measuring the peers on the same simulation and analytics: post hoc files, ADIOS2 SST, deisa-ray.

A peer that cannot be installed here is recorded as a string (the reason) instead of rows.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import HERE, KIB, MIB, RETRIES, ROOT, Runner, fmt_ms, with_retries

DEISA_PIN = "deisa-ray==0.1.8"


def _peer_size(label: str, size: int, one: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """One size of a peer, retried if it fails, printed."""
    row = with_retries(label, one)
    row["size"] = size
    if "error" not in row:
        print(f"{label}: write median {fmt_ms(row['send_median_s'])} ms; e2e/step {fmt_ms(row['e2e_per_step_s'])} ms",
              flush=True)  # fmt: skip
    return row


def section_posthoc(runner: Runner, sizes: list[int], steps: int, warmup: int) -> list[dict[str, Any]]:
    """Peer: .npy files in /dev/shm during the run, global mean per step analysed after it."""
    rows = []
    for size in sizes:
        # every step stays in /dev/shm until the analysis: cap the run at 2 GiB of files
        n = max(5, min(steps, (2 << 30) // (4 * size) - warmup))

        def one(size: int = size, n: int = n) -> dict[str, Any]:
            shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
            d = Path(tempfile.mkdtemp(prefix="insitu-posthoc-", dir=shm))
            try:
                t0 = time.time()
                r = runner.sim(4, {"chunk": size, "steps": n, "warmup": warmup, "insitu": False, "posthoc": str(d)})
                for step in range(n + warmup):
                    blocks = [np.load(f) for f in sorted(d.glob(f"s{step:06d}-r*.npy"))]
                    float(np.mean(np.concatenate([b.ravel() for b in blocks])))
                total = time.time() - max(t0, r["first_send_wall"] or t0)
            finally:
                shutil.rmtree(d, ignore_errors=True)
            return {"steps": n, "send_median_s": r["send_median_s"], "send_p95_s": r["send_p95_s"],
                    "e2e_per_step_s": total / (n + warmup)}  # fmt: skip

        rows.append(_peer_size(f"posthoc {size // KIB:>7} KiB", size, one))
    return rows


def section_adios2(runner: Runner, sizes: list[int], steps: int, warmup: int) -> list[dict[str, Any]] | str:
    """Peer: ADIOS2 SST (serial wheel), one stream per rank on loopback, one reader computing the global mean."""
    try:
        import adios2  # noqa: F401
    except ImportError as exc:
        reason = f"skipped: adios2 is not installed ({exc}); pip install adios2"
        print(f"adios2  {reason}", flush=True)
        return reason
    os.environ["CM_INTERFACE"] = "lo"  # SST's control plane on loopback (the ranks inherit it)
    rows = []
    total = steps + warmup
    for size in sizes:

        def one(size: int = size) -> dict[str, Any]:
            work = Path(tempfile.mkdtemp(prefix="insitu-adios2-"))
            name = f"sst{size}"
            opt = {"name": name, "ranks": 4, "steps": total, "out": str(work / "r.json")}
            reader = subprocess.Popen([sys.executable, str(HERE / "peer_adios2.py"), json.dumps(opt)], cwd=work,
                                      env={**os.environ, "CM_INTERFACE": "lo"})  # fmt: skip
            try:
                r = runner.sim(4, {"chunk": size, "steps": steps, "warmup": warmup, "insitu": False, "adios2": name},
                               cwd=str(work))  # fmt: skip
                reader.wait(600)
                got = json.loads((work / "r.json").read_text())
            finally:
                if reader.poll() is None:
                    reader.kill()
                    reader.wait()
                shutil.rmtree(work, ignore_errors=True)
            return {"send_median_s": r["send_median_s"], "send_p95_s": r["send_p95_s"],
                    "e2e_per_step_s": (got["t_end"] - r["first_send_wall"]) / total}  # fmt: skip

        rows.append(_peer_size(f"adios2  {size // KIB:>7} KiB SST", size, one))
    return rows


def _uv_python() -> str | None:
    """The Python 3.12 ``uv`` manages, if ``uv`` is installed and has one."""
    uv = shutil.which("uv")
    if uv is None:
        return None
    got = subprocess.run([uv, "python", "find", "3.12"], capture_output=True, text=True, timeout=60, check=False)
    return got.stdout.strip() or None if got.returncode == 0 else None


def _python312() -> str | None:
    """A Python >= 3.12 that runs (a pyenv shim on PATH may not: it is checked)."""
    candidates = [os.environ.get("INSITU_BENCH_PYTHON312"),
                  *sorted(str(p) for p in (Path.home() / ".pyenv" / "versions").glob("3.1[2-9]*/bin/python")),
                  _uv_python(), shutil.which("python3.12"), shutil.which("python3.13")]  # fmt: skip
    for c in candidates:
        if not c or not Path(c).exists():
            continue
        ok = subprocess.run([c, "-c", "import sys; sys.exit(sys.version_info < (3, 12))"], capture_output=True,
                            timeout=60, check=False)  # fmt: skip
        if ok.returncode == 0:
            return c
    return None


def deisa_venv() -> Path:
    """Build (once) the deisa-ray virtualenv: it needs Python >= 3.12 and pins its own dask.

    The Python is ``$INSITU_BENCH_PYTHON312``, else a pyenv 3.12, else ``python3.12`` on PATH;
    the virtualenv lives in ``$INSITU_BENCH_CACHE`` (default ``~/.cache/insitu-bench``).
    """
    cache = Path(os.environ.get("INSITU_BENCH_CACHE", Path.home() / ".cache" / "insitu-bench"))
    venv = cache / "deisa-venv"
    py = venv / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", "import deisa.ray, ray.util.client"],
                                      capture_output=True, check=False).returncode == 0:  # fmt: skip
        return py
    base = _python312()
    if base is None:
        raise FileNotFoundError("no Python 3.12 found (deisa-ray needs >= 3.12): set INSITU_BENCH_PYTHON312")
    shutil.rmtree(venv, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=300)
    # ray[client]: LocalCluster pins the client-server port; mpich: the same MPI wheel as insitu's
    pip = subprocess.run([str(py), "-m", "pip", "install", "-q", DEISA_PIN, "ray[client]==2.60.0", "mpich"],
                         capture_output=True, text=True, timeout=1200, check=False)  # fmt: skip
    if pip.returncode != 0:
        raise RuntimeError(f"pip install {DEISA_PIN} failed:\n{pip.stderr[-2000:]}")
    return py


def section_deisa(sizes: list[int], steps: int, warmup: int) -> list[dict[str, Any]] | str:
    """Peer: deisa-ray in its own virtualenv and its own Ray cluster, same simulation and analytics.

    Back-to-back at every size, sleep-paced (200 ms) at 64 KiB and 8 MiB; a failed case is
    retried inside ``peer_deisa.py`` (at most ``RETRIES`` times, recorded in its row).
    """
    try:
        py = deisa_venv()
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        reason = f"skipped: could not build the deisa-ray virtualenv ({exc})"
        print(f"deisa   {reason}", flush=True)
        return reason
    cases: list[dict[str, Any]] = [{"size": s, "pace": "none"} for s in sizes]
    cases += [{"size": s, "pace": "sleep", "pace_arg": 0.2} for s in sizes if s in (64 * KIB, 8 * MIB)]
    out = Path(tempfile.mkdtemp(prefix="insitu-deisa-out-")) / "rows.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "INSITU_"))}
    env["PYTHONPATH"] = str(ROOT)
    opt = {"cases": cases, "steps": steps, "warmup": warmup, "ranks": 4, "out": str(out), "retries": RETRIES}
    proc = subprocess.run([str(py), str(HERE / "peer_deisa.py"), "orchestrate", json.dumps(opt)], env=env,
                          capture_output=True, text=True, timeout=3600, check=False)  # fmt: skip
    rows: list[dict[str, Any]] = json.loads(out.read_text()) if out.exists() else []
    shutil.rmtree(out.parent, ignore_errors=True)
    for row in rows:
        if "error" in row:
            print(f"deisa   {row['size'] // KIB:>7} KiB {row['pace']:5}: FAILED {row['attempts']} times: "
                  f"{row['error'][:300]}", flush=True)  # fmt: skip
            continue
        print(f"deisa   {row['size'] // KIB:>7} KiB {row['pace']:5}: send median {fmt_ms(row['send_median_s'])} ms "
              f"p95 {fmt_ms(row['send_p95_s'])} ms; loop {fmt_ms(row['loop_median_s'])} ms; "
              f"e2e/step {fmt_ms(row['e2e_per_step_s'])} ms", flush=True)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"deisa-ray peer failed after {len(rows)} of {len(cases)} cases:\n{proc.stderr[-3000:]}")
    return rows
