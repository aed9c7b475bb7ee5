"""The C and Fortran shim: build, heat2d in three languages, bad calls, no cluster, stub build.

Needs Debian's MPICH with Fortran (``apt-get install mpich libmpich-dev gfortran``; `.ci/run`
installs it); skipped with the reason printed when it is absent.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from insitu.capi import CStatus
from tests.conftest import DATA, ROOT, run_name

MPICC = shutil.which("mpicc.mpich")
MPIF90 = shutil.which("mpif90.mpich")
MPIEXEC = shutil.which("mpiexec.mpich")
C_DIR = DATA / "c"
TESTS = ROOT / "tests" / "capi"
NX, NY, STEPS = 30, 27, 12  # uneven over a 2x2 grid

needs_mpich = pytest.mark.skipif(
    not (MPICC and MPIF90 and MPIEXEC),
    reason="Debian MPICH with Fortran is not installed (apt-get install -y mpich libmpich-dev gfortran)",
)


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """libinsitu, the C and Fortran heat2d, the test programs and the stub build."""
    base = tmp_path_factory.mktemp("capi")
    prefix = base / "shim"
    _run([sys.executable, "-m", "insitu.cli", "build-shim", "--prefix", str(prefix)])
    config = [sys.executable, "-m", "insitu.cli", "config", "--shim-dir", str(prefix)]
    cflags = _run([*config, "--cflags"]).split()
    libs = _run([*config, "--libs"]).split()
    libdir = _run([*config, "--libdir"]).strip()
    fortran = _run([*config, "--fortran"]).strip()
    assert MPICC and MPIF90
    exe = {
        "c": base / "heat2d_c",
        "f": base / "heat2d_f",
        "bad": base / "bad_calls",
        "stub": base / "heat2d_stub",
        "mpiver": base / "mpi_version",
        "signals": base / "signals",
    }
    _run([MPICC, "-O2", "-Wall", "-Werror", str(DATA / "examples/c/heat2d.c"), *cflags, *libs, "-lm", "-o",
          str(exe["c"])])  # fmt: skip
    _run([MPIF90, "-O2", "-c", fortran, "-o", str(base / "insitu.o")], cwd=base)
    _run([MPIF90, "-O2", str(DATA / "examples/fortran/heat2d.f90"), str(base / "insitu.o"), *libs, "-o",
          str(exe["f"])], cwd=base)  # fmt: skip
    _run([MPICC, "-Wall", str(TESTS / "bad_calls.c"), *cflags, *libs, "-o", str(exe["bad"])])
    _run([MPICC, "-Wall", "-Werror", str(TESTS / "signals.c"), *cflags, *libs, "-o", str(exe["signals"])])
    py_inc, py_lib, py_ver = (sysconfig.get_paths()["include"], sysconfig.get_config_var("LIBDIR"),
                              sysconfig.get_config_var("LDVERSION"))  # fmt: skip
    embed = [f"-I{py_inc}", f"-L{py_lib}", f"-Wl,-rpath,{py_lib}", f"-lpython{py_ver}"]  # the same libpython
    _run([MPICC, str(TESTS / "mpi_version.c"), *cflags, *libs, *embed, "-o", str(exe["mpiver"])])
    # the stub build: only the two headers, no libinsitu, no Python
    stub_inc = base / "stub-include"
    stub_inc.mkdir()
    for h in ("insitu.h", "insitu_stub.h"):
        shutil.copy(C_DIR / "include" / h, stub_inc / h)
    _run([MPICC, "-DINSITU_STUB", "-Wall", "-Werror", f"-I{stub_inc}", str(DATA / "examples/c/heat2d.c"), "-lm",
          "-o", str(exe["stub"])])  # fmt: skip
    return {"exe": exe, "libdir": libdir, "base": base}


def _clean_env(built: dict[str, Any], extra: dict[str, str]) -> dict[str, str]:
    """``env -i`` plus PATH and the library path from ``insitu config`` (and the run's INSITU_* settings)."""
    return {"PATH": os.environ["PATH"], "LD_LIBRARY_PATH": built["libdir"], **extra}


def _mpiexec(ranks: int, node_ips: list[str], argv: list[str]) -> list[str]:
    from insitu.cli import mpiexec_mpmd

    assert MPIEXEC
    return [MPIEXEC, *mpiexec_mpmd(ranks, node_ips, argv)[1:]]


def _stats(cluster: Any, built: dict[str, Any], argv: list[str], tmp: Path, clean: bool) -> dict[int, dict[str, Any]]:
    """Run one heat2d under mpiexec -n 4 with heat_stats (steering off); its per-step statistics."""
    run = run_name("capi")
    settings = {**cluster.environment(), "INSITU_RUN": run, "INSITU_DEADLINE": "60", "INSITU_RECLAIM_DEADLINE": "20"}
    out = tmp / run
    ana = subprocess.Popen([sys.executable, str(DATA / "analytics/heat_stats.py"), "--out", str(out),
                            "--print-every", "1000", "--npy-every", "5"], env={**os.environ, **settings},
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        env = _clean_env(built, settings) if clean else {**os.environ, **settings}
        cmd = _mpiexec(4, cluster.node_ips, [*argv, "--nx", str(NX), "--ny", str(NY), "--steps", str(STEPS)])
        sim = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, check=False)
        assert sim.returncode == 0, sim.stdout[-2000:] + sim.stderr[-3000:]
        _, err = ana.communicate(timeout=120)
        assert ana.returncode == 0, err[-3000:]
    finally:
        if ana.poll() is None:
            ana.kill()
            ana.wait()
    stats = json.loads((out / "stats.json").read_text())["stats"]
    fields = {int(f.stem.split("_")[1]): np.load(f) for f in out.glob("temperature_*.npy")}
    return {int(k): {**v, "field": fields.get(int(k))} for k, v in stats.items()}


@needs_mpich
@pytest.mark.cluster
def test_heat2d_in_c_fortran_and_python_gives_the_same_statistics(cluster: Any, built: dict[str, Any],
                                                                   tmp_path: Path) -> None:  # fmt: skip
    c = _stats(cluster, built, [str(built["exe"]["c"])], tmp_path, clean=True)
    f = _stats(cluster, built, [str(built["exe"]["f"])], tmp_path, clean=True)
    py = _stats(cluster, built, [sys.executable, str(DATA / "examples/python/heat2d.py")], tmp_path, clean=False)
    assert sorted(c) == sorted(f) == sorted(py) == list(range(STEPS))
    for step in range(STEPS):
        for key in ("min", "mean", "max", "dmean_dt", "dmax_dt"):
            if key in py[step]:
                assert c[step][key] == pytest.approx(py[step][key], rel=1e-12, abs=1e-12), (step, key)
                assert f[step][key] == pytest.approx(py[step][key], rel=1e-12, abs=1e-12), (step, key)
    assert 0 < py[STEPS - 1]["max"] < py[0]["max"] <= 100  # the plate cools: a real field, not zeros
    # the whole field, element by element: same axis order in Dask for all three languages
    for step in (0, 5, 10):
        assert py[step]["field"].shape == (NX, NY)
        np.testing.assert_allclose(c[step]["field"], py[step]["field"], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(f[step]["field"], py[step]["field"], rtol=1e-12, atol=1e-12)


@needs_mpich
@pytest.mark.cluster
def test_bad_calls_return_the_documented_status(cluster: Any, built: dict[str, Any]) -> None:
    run = run_name("capibad")
    settings = {**cluster.environment(), "INSITU_DEADLINE": "30", "INSITU_RECLAIM_DEADLINE": "10"}
    cmd = _mpiexec(2, cluster.node_ips[:1], [str(built["exe"]["bad"]), run])
    proc = subprocess.run(cmd, env=_clean_env(built, settings), capture_output=True, text=True, timeout=120,
                          check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    got: dict[tuple[str, int], tuple[str, str]] = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"(\w+) (INSITU_\w+) (\d+) \| (.*)", line)
        if m:
            got[(m[1], int(m[3]))] = (m[2], m[4])
    expected = {
        "send_before_init": CStatus.ERR_STATE,
        "get_before_init": CStatus.ERR_STATE,
        "finalize_before_init": CStatus.ERR_STATE,
        "finalize_null": CStatus.ERR_NULL,
        "init_null_out": CStatus.ERR_NULL,
        "version_ok": CStatus.OK,
        "version_bad": CStatus.ERR_VERSION,
        "init": CStatus.OK,
        "send_fields_null": CStatus.ERR_NULL,
        "send_data_null": CStatus.ERR_NULL,
        "send_unknown_name": CStatus.ERR_NAME,
        "send_wrong_nelems": CStatus.ERR_SIZE,
        "send_wrong_count": CStatus.ERR_SIZE,
        "send_selection_outside": CStatus.ERR_SIZE,
        "send_wrong_dtype": CStatus.ERR_DTYPE,
        "send_bad_ndim": CStatus.ERR_ARG,
        "send_good": CStatus.OK,
        "send_step_not_increasing": CStatus.ERR_SEND,
        "get_null_key": CStatus.ERR_NULL,
        "get_null_value": CStatus.ERR_NULL,
        "get_unset_key": CStatus.OK,
        "finalize": CStatus.OK,
        "finalize_again": CStatus.ERR_STATE,
        "finalize_stale": CStatus.ERR_STATE,
        "send_after_finalize": CStatus.ERR_STATE,
        "get_after_finalize": CStatus.ERR_STATE,
    }
    for case, status in expected.items():
        for rank in (0, 1):
            assert got[(case, rank)][0] == f"INSITU_{status.name}", (case, rank, got.get((case, rank)))
    # one rank's bad input: that rank gets its own status, the other ERR_SEND; the step went nowhere
    assert got[("send_one_rank_wrong", 1)][0] == "INSITU_ERR_SIZE"
    assert got[("send_one_rank_wrong", 0)][0] == "INSITU_ERR_SEND"
    assert "rank 1" in got[("send_one_rank_wrong", 0)][1]
    assert "nelems" in got[("send_wrong_nelems", 0)][1]
    assert "declared: ['u']" in got[("send_unknown_name", 0)][1]
    assert "float32" in got[("send_wrong_dtype", 0)][1]
    # no Ray in any rank of a C simulation: the embedded CPython is there, Ray's _raylet is not
    for rank in (0, 1):
        assert f"mapped libpython 1 {rank}" in proc.stdout
        assert f"mapped _raylet 0 {rank}" in proc.stdout
    assert "found_unset 0 0" in proc.stdout
    assert "handle_after_finalize NULL 0" in proc.stdout


@needs_mpich
def test_heat2d_c_without_a_cluster_finishes_with_one_logged_error(built: dict[str, Any]) -> None:
    settings = {"INSITU_ADDRESS": "127.0.0.1:9", "INSITU_RUN": "no-cluster", "INSITU_DEADLINE": "3"}
    cmd = [MPIEXEC or "", "-n", "4", str(built["exe"]["c"]), "--nx", "20", "--ny", "20", "--steps", "30"]
    proc = subprocess.run(cmd, env=_clean_env(built, settings), capture_output=True, text=True, timeout=120,
                          check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("insitu: error")]
    assert len(errors) == 1, proc.stderr
    assert "127.0.0.1:9" in errors[0]
    assert "last step 29" in proc.stdout


@needs_mpich
def test_stub_build_runs_without_insitu(built: dict[str, Any]) -> None:
    cmd = [MPIEXEC or "", "-n", "4", str(built["exe"]["stub"]), "--nx", "20", "--ny", "20", "--steps", "15"]
    proc = subprocess.run(cmd, env={"PATH": os.environ["PATH"]}, capture_output=True, text=True, timeout=60,
                          check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "last step 14" in proc.stdout
    assert "libinsitu" not in subprocess.run(["ldd", str(built["exe"]["stub"])], capture_output=True,
                                             text=True, check=False).stdout  # fmt: skip


@needs_mpich
def test_mpi_seen_from_c_is_the_mpi_of_the_embedded_mpi4py(built: dict[str, Any]) -> None:
    settings = {"INSITU_ADDRESS": "127.0.0.1:9", "INSITU_DEADLINE": "2"}
    proc = subprocess.run([MPIEXEC or "", "-n", "1", str(built["exe"]["mpiver"])], env=_clean_env(built, settings),
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    c_part, py_part = proc.stdout.split("\n---\n")[:2]
    c_version = c_part.removeprefix("C: ").strip()
    py_version = py_part.removeprefix("mpi4py: ").strip()
    assert "MPICH" in c_version
    assert c_version == py_version
    # the embedded interpreter is the one recorded at build time (this test's Python), even under env -i
    assert f"sys.executable: {sys.executable}" in proc.stdout


def test_status_codes_match_the_header() -> None:
    header = (C_DIR / "include" / "insitu.h").read_text()
    values = {m[1]: int(m[2]) for m in re.finditer(r"INSITU_(\w+) = (\d+)", header)}
    for status in CStatus:
        assert values[status.name] == status.value, status


def _lines(stdout: str) -> dict[tuple[str, int], str]:
    """``<what> <value> <rank>[ | message]`` lines of tests/capi/signals.c."""
    got: dict[tuple[str, int], str] = {}
    for line in stdout.splitlines():
        m = re.match(r"([\w-]+) (\S+) (\d+)(?: \| (.*))?$", line)
        if m:
            got[(m[1], int(m[3]))] = m[2] if m[4] is None else f"{m[2]} | {m[4]}".rstrip()
    return got


@needs_mpich
def test_the_simulations_signal_handlers_survive_init_and_its_sigterm_handler_runs_on_every_rank(
    cluster: Any, built: dict[str, Any]
) -> None:
    run = run_name("capisig")
    # no analytics: steps beyond the in-flight limit are skipped, not waited for
    settings = {**cluster.environment(), "INSITU_DEADLINE": "60", "INSITU_RECLAIM_DEADLINE": "10",
                "INSITU_BACKPRESSURE": "skip"}  # fmt: skip
    cmd = _mpiexec(4, cluster.node_ips[:1], [str(built["exe"]["signals"]), run])
    proc = subprocess.run(cmd, env=_clean_env(built, settings), capture_output=True, text=True, timeout=180,
                          check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    got = _lines(proc.stdout)
    for rank in range(4):
        assert got[("init", rank)] == "INSITU_OK |", proc.stdout[-3000:]
        for sig in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2"):
            assert got[(f"sigaction-{sig}", rank)] == "kept", (sig, rank, proc.stdout[-3000:])
            assert got[(f"final-{sig}", rank)] == "kept", (sig, rank, proc.stdout[-3000:])
        assert got[("terminated", rank)] == "1"  # the simulation's own SIGTERM handler ran
        assert got[("last_step", rank)] == "2"  # at the step it was sent, on every rank
        assert got[("finalize", rank)] == "INSITU_OK |"
        assert ("send", rank) not in got  # every step before the signal was sent


@needs_mpich
def test_python_failing_to_start_on_one_rank_fails_init_on_every_rank_naming_it(built: dict[str, Any]) -> None:
    exe = str(built["exe"]["signals"])
    assert MPIEXEC
    # MPMD: ranks 0-2 start their embedded Python; rank 3's cannot (no standard library there)
    cmd = [MPIEXEC, "-n", "3", exe, "r", ":", "-n", "1", "-env", "PYTHONHOME", "/nonexistent", exe, "r"]
    settings = {"INSITU_ADDRESS": "127.0.0.1:1", "INSITU_DEADLINE": "5", "INSITU_STARTUP_DEADLINE": "5"}
    proc = subprocess.run(cmd, env=_clean_env(built, settings), capture_output=True, text=True, timeout=120,
                          check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    got = _lines(proc.stdout)
    for rank in range(4):
        status, _, message = got[("init", rank)].partition(" | ")
        assert status == "INSITU_ERR_RUNTIME", got[("init", rank)]
        assert message.startswith("rank 3: the embedded Python could not start"), message
        assert got[("send", rank)].startswith("INSITU_DISABLED")  # the next calls work: no-ops, no hang
        assert got[("finalize", rank)] == "INSITU_OK |"
        assert got[("sigaction-SIGTERM", rank)] == "kept"
    assert "failed to get the Python codec" in got[("init", 3)]  # the failing rank also says why
