"""The wheel as a site installs it: built with ``pip wheel``, installed into a fresh virtualenv
without system site-packages, every command run from a directory outside the checkout with
``PATH=/usr/bin:/bin`` (no activated environment), the C heat2d built against the install.

The fresh environment reuses this environment's versions as constraints (``pip list`` of it),
so it installs from pip's indexes in about a minute and talks to the session's Ray cluster.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from insitu.cli import main
from tests.conftest import ROOT, mpi_command, run_coupled, run_name

MPICC = shutil.which("mpicc.mpich")
MPIEXEC = shutil.which("mpiexec.mpich")
NX, NY, STEPS = 30, 27, 12
_SKIP_COPY = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                    ".hypothesis", "insitu-demo-output", "results")  # fmt: skip


def _run(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float = 300,
         ok: bool = True) -> subprocess.CompletedProcess[str]:  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    if ok:
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The wheel installed into a fresh venv; the bare environment and the directory to run commands in."""
    base = tmp_path_factory.mktemp("wheel")
    src, dist, venv, work = base / "src", base / "dist", base / "venv", base / "work"
    work.mkdir()
    # a copy of the tree: a stale build/ of the checkout cannot leak files into the wheel
    shutil.copytree(ROOT, src, ignore=_SKIP_COPY)
    pip_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(src), "-w", str(dist)], pip_env, base)
    (wheel,) = dist.glob("insitu-*.whl")
    _run([sys.executable, "-m", "venv", str(venv)], pip_env, base)
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    freeze = _run([sys.executable, "-m", "pip", "list", "--format=freeze"], pip_env, base).stdout
    constraints = base / "constraints.txt"
    constraints.write_text("".join(f"{line}\n" for line in freeze.splitlines()
                                   if "==" in line and not line.lower().startswith("insitu==")))  # fmt: skip
    python = venv / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "-q", "-c", str(constraints), f"{wheel}[mpich,plot,monitor]"],
         pip_env, base, timeout=600)  # fmt: skip
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", str(base)), "LANG": "C.UTF-8",
           "XDG_CACHE_HOME": str(base / "cache"), "RAY_USAGE_STATS_ENABLED": "0"}  # fmt: skip
    return {"venv": venv, "bin": venv / "bin", "python": str(python), "insitu": str(venv / "bin" / "insitu"),
            "env": env, "work": work, "cache": base / "cache"}  # fmt: skip


def _insitu(installed: dict[str, Any], *args: str, ok: bool = True, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    return _run([installed["insitu"], *args], env or installed["env"], installed["work"], timeout=timeout, ok=ok)


def _site_packages(installed: dict[str, Any]) -> Path:
    (site,) = installed["venv"].glob("lib/python*/site-packages")
    return site


def test_the_installed_package_is_the_wheel_in_the_fresh_venv(installed: dict[str, Any]) -> None:
    out = _run([installed["python"], "-c", "import insitu, sys; print(insitu.__file__); print(sys.path)"],
               installed["env"], installed["work"]).stdout.splitlines()  # fmt: skip
    assert Path(out[0]).is_relative_to(_site_packages(installed) / "insitu"), out[0]
    assert str(ROOT) not in out[1]  # no path of the checkout, no editable install
    data = Path(_insitu(installed, "config", "--data").stdout.strip())
    shipped = {str(p.relative_to(data)) for p in data.rglob("*") if p.is_file()}
    assert {"c/include/insitu.h", "c/include/insitu_stub.h", "c/src/insitu.c", "fortran/insitu.f90",
            "launch/insitu.sbatch", "launch/insitu_node.sh", "examples/python/heat2d.py", "examples/c/heat2d.c",
            "examples/fortran/heat2d.f90", "analytics/heat_stats.py", "monitor/index.html"} <= shipped  # fmt: skip


def test_python_m_insitu_is_the_command(installed: dict[str, Any]) -> None:
    proc = _run([installed["python"], "-m", "insitu", "--help"], installed["env"], installed["work"])
    for command in ("demo", "config", "launch", "steer", "build-shim", "debug-info", "status", "monitor", "analytics"):
        assert command in proc.stdout


def test_insitu_monitor_from_the_wheel_serves_its_page_and_modules(installed: dict[str, Any]) -> None:
    """The page ships in the wheel and the modules start from it (no cluster needed to serve the page)."""
    import signal
    import urllib.request

    env = {**installed["env"], "INSITU_ADDRESS": "127.0.0.1:9"}  # nothing listens: the modules show it
    proc = subprocess.Popen([installed["insitu"], "monitor", "--run", "w", "--port", "0"], env=env,
                            cwd=installed["work"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        url = re.search(r"at (http://\S+/)", proc.stdout.readline()).group(1)  # type: ignore[union-attr]
        with urllib.request.urlopen(url, timeout=30) as resp:
            assert resp.status == 200 and b"insitu run" in resp.read()
        with urllib.request.urlopen(url + "api/status", timeout=60) as resp:
            doc = json.loads(resp.read())
        assert doc["run"] == "w" and doc["state"] in ("waiting", "unknown"), doc
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]


def test_build_shim_and_config_use_the_user_cache_not_site_packages(installed: dict[str, Any]) -> None:
    lib = Path(_insitu(installed, "build-shim").stdout.strip())
    shim = installed["cache"] / "insitu" / "shim"
    assert lib.name == "libinsitu.so" and lib.is_file() and lib.is_relative_to(shim), lib
    (key,) = [p.name for p in shim.iterdir()]
    assert key.startswith(f"0.1.0-py{sys.version_info.major}.{sys.version_info.minor}-"), key
    cflags = _insitu(installed, "config", "--cflags").stdout.split()
    assert cflags == [f"-I{lib.parent.parent / 'include'}"]
    assert (lib.parent.parent / "include" / "insitu.h").is_file()
    libs = _insitu(installed, "config", "--libs").stdout.split()
    assert f"-L{lib.parent}" in libs and "-linsitu" in libs
    fortran = Path(_insitu(installed, "config", "--fortran").stdout.strip())
    assert fortran.name == "insitu.f90" and fortran.is_relative_to(_site_packages(installed)) and fortran.is_file()
    assert not list(installed["venv"].rglob("libinsitu.so"))  # never built into the installation


def test_launch_dry_run_points_into_the_installation_and_passes_shellcheck(installed: dict[str, Any]) -> None:
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck)")
    script = _insitu(installed, "launch", "--nodes", "2", "--ranks-per-node", "4", "--simulation", "./heat2d",
                     "--analytics", "python heat_stats.py", "--dry-run").stdout  # fmt: skip
    settings = dict(re.findall(r"^export (INSITU_\w+)=(.*)$", script, flags=re.MULTILINE))
    launch_dir = Path(settings["INSITU_LAUNCH_DIR"])
    assert launch_dir.is_relative_to(_site_packages(installed))
    assert os.access(launch_dir / "insitu_node.sh", os.X_OK)
    assert settings["INSITU_PYTHON"] == f"${{INSITU_PYTHON:-{installed['python']}}}"
    assert settings["INSITU_RAY"] == f"${{INSITU_RAY:-{installed['bin'] / 'ray'}}}"
    job = installed["work"] / "job.sbatch"
    job.write_text(script)
    proc = subprocess.run(["shellcheck", str(job)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout


def test_a_user_error_is_one_line_and_debug_shows_the_traceback(installed: dict[str, Any]) -> None:
    proc = _insitu(installed, "steer", "--run", "r", "stop=true", ok=False)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "insitu steer: error: no Ray address: pass --address host:port or set INSITU_ADDRESS (the job log prints it)"
    ]
    proc = _insitu(installed, "steer", "--address", "127.0.0.1:9", "--run", "r", "stop=true", ok=False)
    assert proc.returncode == 1
    assert len(proc.stderr.splitlines()) == 1 and "cannot reach the Ray cluster at 127.0.0.1:9" in proc.stderr
    proc = _insitu(installed, "launch", "--nodes", "two", "--ranks-per-node", "1", "--simulation", "s",
                   "--analytics", "a", "--dry-run", ok=False)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "insitu launch: error: argument --nodes: invalid int value: 'two' (see insitu launch --help)"
    ]
    proc = _insitu(installed, "steer", "--debug", "--run", "r", "stop=true", ok=False)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "insitu.errors.ConfigError: no Ray address" in proc.stderr


def test_any_other_exception_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    import insitu

    def broken() -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(insitu, "print_debug_info", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["debug-info"])


def test_insitu_demo_from_the_wheel(installed: dict[str, Any]) -> None:
    out = installed["work"] / "demo"
    proc = _insitu(installed, "demo", "--steps", "60", "--nx", "48", "--ny", "48", "--png-every", "20", "--out",
                   str(out), timeout=240)  # fmt: skip
    assert "insitu demo: done" in proc.stdout, proc.stdout[-2000:]
    assert len(list(out.glob("temperature_*.png"))) >= 1 and (out / "timeseries.png").exists()
    stats = json.loads((out / "stats.json").read_text())["stats"]
    assert len(stats) >= 10
    assert all(s["min"] <= s["mean"] <= s["max"] for s in stats.values())


@pytest.mark.skipif(not (MPICC and MPIEXEC), reason="Debian MPICH is not installed (apt-get install -y mpich "
                    "libmpich-dev): the C example needs mpicc.mpich and mpiexec.mpich")  # fmt: skip
@pytest.mark.cluster
def test_c_heat2d_built_against_the_wheel_runs_with_its_analytics(installed: dict[str, Any], cluster: Any) -> None:
    assert MPICC and MPIEXEC
    work, data = installed["work"], Path(_insitu(installed, "config", "--data").stdout.strip())
    flags = [*_insitu(installed, "config", "--cflags").stdout.split(),
             *_insitu(installed, "config", "--libs").stdout.split()]  # fmt: skip
    exe = work / "heat2d"
    _run([MPICC, "-O2", "-Wall", "-Werror", str(data / "examples" / "c" / "heat2d.c"), *flags, "-lm", "-o", str(exe)],
         installed["env"], work)  # fmt: skip
    libdir = _insitu(installed, "config", "--libdir").stdout.strip()
    run, out = run_name("wheel"), work / "heat"
    env = {**installed["env"], **cluster.environment(), "INSITU_RUN": run, "INSITU_DEADLINE": "60",
           "INSITU_RECLAIM_DEADLINE": "20"}  # fmt: skip
    ana = [installed["python"], str(data / "analytics" / "heat_stats.py"), "--out", str(out), "--print-every", "1000",
           "--npy-every", "5"]  # fmt: skip
    sim = mpi_command(4, cluster.node_ips, [str(exe), "--nx", str(NX), "--ny", str(NY), "--steps", str(STEPS)],
                      mpiexec=MPIEXEC)  # fmt: skip
    proc = run_coupled(sim, ana, env, sim_env={**env, "LD_LIBRARY_PATH": libdir})
    assert "insitu: error" not in proc.stderr, proc.stderr[-3000:]
    stats = {int(k): v for k, v in json.loads((out / "stats.json").read_text())["stats"].items()}
    assert sorted(stats) == list(range(STEPS))
    for step in (0, 5, 10):
        field = np.load(out / f"temperature_{step:05d}.npy")
        assert field.shape == (NX, NY)
        assert stats[step]["min"] == pytest.approx(field.min())
        assert stats[step]["mean"] == pytest.approx(field.mean())
        assert stats[step]["max"] == pytest.approx(field.max())
    assert 0 < stats[STEPS - 1]["max"] < stats[0]["max"] <= 100  # the plate cools: a real field, not zeros
