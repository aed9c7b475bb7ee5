"""The C and Fortran shim: build, heat2d in three languages, bad calls, no cluster, stub build, one MPI per process.

Needs Debian's MPICH with Fortran (``apt-get install mpich libmpich-dev gfortran``; `.ci/run`
installs it); skipped with the reason printed when it is absent. The Open MPI refusal needs
Debian's Open MPI (``libopenmpi-dev openmpi-bin``, also installed by `.ci/run`).
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

from insitu.capi import CDtype, CStatus
from tests.conftest import DATA, ROOT, mpi_command, run_coupled, run_name

MPICC = shutil.which("mpicc.mpich")
MPIF90 = shutil.which("mpif90.mpich")
MPIEXEC = shutil.which("mpiexec.mpich")
OMPICC, OMPIF90, OMPIEXEC = (shutil.which(f"{n}.openmpi") for n in ("mpicc", "mpif90", "mpiexec"))
C_DIR = DATA / "c"
TESTS = ROOT / "tests" / "capi"
NX, NY, STEPS = 30, 27, 12  # uneven over a 2x2 grid

needs_mpich = pytest.mark.skipif(
    not (MPICC and MPIF90 and MPIEXEC),
    reason="Debian MPICH with Fortran is not installed (apt-get install -y mpich libmpich-dev gfortran)",
)


needs_openmpi = pytest.mark.skipif(
    not (OMPICC and OMPIF90 and OMPIEXEC),
    reason="Debian Open MPI is not installed (apt-get install -y libopenmpi-dev openmpi-bin)",
)
# the mpich wheel's libmpi.so.12, beside the interpreter's libpython: a second MPICH for the mismatch tests
WHEEL_LIBMPI = Path(sysconfig.get_config_var("LIBDIR") or "/nonexistent") / "libmpi.so.12"


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
        "mpiver_pyfirst": base / "mpi_version_pyfirst",
        "signals": base / "signals",
    }
    _run([MPICC, "-O2", "-Wall", "-Werror", str(DATA / "examples/c/heat2d.c"), *cflags, *libs, "-lm", "-o",
          str(exe["c"])])  # fmt: skip
    _run([MPIF90, "-O2", "-c", fortran, "-o", str(base / "insitu.o")], cwd=base)
    _run([MPIF90, "-O2", str(DATA / "examples/fortran/heat2d.f90"), str(base / "insitu.o"), *libs, "-o",
          str(exe["f"])], cwd=base)  # fmt: skip
    _run([MPICC, "-Wall", str(TESTS / "bad_calls.c"), *cflags, *libs, "-o", str(exe["bad"])])
    _run([MPICC, "-Wall", "-Werror", str(TESTS / "signals.c"), *cflags, *libs, "-o", str(exe["signals"])])
    _run([MPICC, str(TESTS / "mpi_version.c"), *cflags, *libs, *_embed(), "-o", str(exe["mpiver"])])
    # the interpreter's lib directory (holding the mpich wheel's libmpi.so.12) first in the run path
    _run([MPICC, str(TESTS / "mpi_version.c"), *cflags, "-Wl,--disable-new-dtags", *_embed(), *libs, "-o",
          str(exe["mpiver_pyfirst"])])  # fmt: skip
    # the stub build: only the two headers, no libinsitu, no Python
    stub_inc = base / "stub-include"
    stub_inc.mkdir()
    for h in ("insitu.h", "insitu_stub.h"):
        shutil.copy(C_DIR / "include" / h, stub_inc / h)
    _run([MPICC, "-DINSITU_STUB", "-Wall", "-Werror", f"-I{stub_inc}", str(DATA / "examples/c/heat2d.c"), "-lm",
          "-o", str(exe["stub"])])  # fmt: skip
    return {"exe": exe, "libdir": libdir, "base": base}


def _embed() -> list[str]:
    """Flags that link the embedded interpreter's libpython (test programs call the Python C API)."""
    py_inc, py_lib, py_ver = (sysconfig.get_paths()["include"], sysconfig.get_config_var("LIBDIR"),
                              sysconfig.get_config_var("LDVERSION"))  # fmt: skip
    return [f"-I{py_inc}", f"-L{py_lib}", f"-Wl,-rpath,{py_lib}", f"-lpython{py_ver}"]


def _clean_env(built: dict[str, Any], extra: dict[str, str]) -> dict[str, str]:
    """``env -i`` plus PATH and the library path from ``insitu config`` (and the run's INSITU_* settings)."""
    return {"PATH": os.environ["PATH"], "LD_LIBRARY_PATH": built["libdir"], **extra}


def _mpiexec(ranks: int, node_ips: list[str], argv: list[str]) -> list[str]:
    return mpi_command(ranks, node_ips, argv, mpiexec=MPIEXEC)


def coupled(cluster: Any, built: dict[str, Any], argv: list[str], analytics: list[str], clean: bool,
            ranks: int = 4) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Run ``argv`` under ``mpiexec -n ranks`` (blocks of ranks on the cluster's nodes) beside ``analytics``.

    Both get the cluster's settings and a fresh run name; the simulation runs under ``env -i`` plus the
    library path when ``clean``. Both must exit 0 (``run_coupled``); returns the simulation's result.
    """
    settings = {**cluster.environment(), "INSITU_RUN": run_name("capi"), "INSITU_DEADLINE": "60",
                "INSITU_RECLAIM_DEADLINE": "20"}  # fmt: skip
    env = {**os.environ, **settings}
    return run_coupled(_mpiexec(ranks, cluster.node_ips, argv), [sys.executable, *analytics], env,
                       sim_env=_clean_env(built, settings) if clean else env)  # fmt: skip


def _stats(cluster: Any, built: dict[str, Any], argv: list[str], tmp: Path, clean: bool) -> dict[int, dict[str, Any]]:
    """Run one heat2d under mpiexec -n 4 with heat_stats (steering off); its per-step statistics."""
    out = tmp / run_name("stats")
    coupled(cluster, built, [*argv, "--nx", str(NX), "--ny", str(NY), "--steps", str(STEPS)],
            [str(DATA / "analytics/heat_stats.py"), "--out", str(out), "--print-every", "1000", "--npy-every", "5"],
            clean)  # fmt: skip
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
@pytest.mark.parametrize("exe", ["mpiver", "mpiver_pyfirst"])
def test_mpi_seen_from_c_is_the_mpi_of_the_embedded_mpi4py(built: dict[str, Any], exe: str) -> None:
    settings = {"INSITU_ADDRESS": "127.0.0.1:9", "INSITU_DEADLINE": "2", "INSITU_STARTUP_DEADLINE": "2"}
    proc = subprocess.run([MPIEXEC or "", "-n", "2", str(built["exe"][exe])], env=_clean_env(built, settings),
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = _lines(proc.stdout)
    for rank in (0, 1):
        # the MPI check passed; no cluster there, so the set-up failed after it (as a run-time or contract error)
        assert got[("init", rank)].split(" | ")[0] in ("INSITU_ERR_RUNTIME", "INSITU_ERR_CONTRACT"), got
        assert got[("same-version", rank)] == "1"  # mpi4py.MPI imported: the program's library answers
        # the embedded interpreter is the one recorded at build time (this test's Python), even under env -i
        assert got[("executable", rank)] == sys.executable
        # exactly one MPI library mapped, the program's Debian MPICH; with the interpreter's lib directory (and
        # the mpich wheel's libmpi.so.12) first in the run path, insitu_init pinned the name to it
        mapped = got[("libmpi", rank)].split(",")
        assert len(mapped) == 1 and Path(mapped[0]).name.startswith("libmpich.so.12"), mapped


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


def _refusals(stdout: str, ranks: int) -> dict[int, tuple[str, str]]:
    """Every rank's ``init`` line (status, message), plus the libmpi files it had mapped, if printed."""
    got = _lines(stdout)
    out = {}
    for rank in range(ranks):
        status, _, message = got[("init", rank)].partition(" | ")
        out[rank] = (status, message, got.get(("libmpi", rank), ""))
    return out


def _assert_refused(stdout: str, ranks: int, *named: str) -> None:
    """INSITU_ERR_MPI_MISMATCH on every rank, each message naming its rank and both libraries."""
    for rank, (status, message, _) in _refusals(stdout, ranks).items():
        assert status in ("INSITU_ERR_MPI_MISMATCH", str(CStatus.ERR_MPI_MISMATCH.value)), (rank, status, message)
        assert message.startswith(f"one MPI per process: rank {rank}: "), message
        for text in named:
            assert text in message, (text, message)
        assert message.endswith("insitu is disabled for the rest of the run"), message


@pytest.fixture(scope="module")
def second_mpich(built: dict[str, Any]) -> dict[str, Path]:
    """Programs on Debian's MPICH linked with a shim built for the mpich wheel's libmpi.so.12 (a second MPICH)."""
    if not WHEEL_LIBMPI.exists():
        pytest.skip(f"the mpich wheel's libmpi.so.12 is not at {WHEEL_LIBMPI} (pip install mpich)")
    base = built["base"] / "second-mpich"
    prefix = base / "shim"
    _run([sys.executable, "-m", "insitu.cli", "build-shim", "--prefix", str(prefix), "--mpi-library",
          str(WHEEL_LIBMPI)])  # fmt: skip
    assert MPICC and MPIF90
    libs = [f"-L{prefix / 'lib'}", f"-Wl,--disable-new-dtags,-rpath,{prefix / 'lib'}", "-linsitu"]
    _run([MPICC, str(TESTS / "mpi_version.c"), f"-I{prefix / 'include'}", *libs, *_embed(), "-o",
          str(base / "mpi_version")])  # fmt: skip
    _run([MPIF90, "-c", str(DATA / "fortran/insitu.f90"), "-o", str(base / "insitu.o")], cwd=base)
    _run([MPIF90, str(TESTS / "mpi_check.f90"), str(base / "insitu.o"), *libs, "-o", str(base / "mpi_check")],
         cwd=base)  # fmt: skip
    return {"c": base / "mpi_version", "f": base / "mpi_check", "libdir": prefix / "lib"}


@needs_mpich
@pytest.mark.parametrize("lang", ["c", "f"])
def test_a_second_mpich_is_refused_on_every_rank_before_mpi4py_loads_it(second_mpich: dict[str, Path],
                                                                         lang: str) -> None:  # fmt: skip
    env = {"PATH": os.environ["PATH"], "LD_LIBRARY_PATH": str(second_mpich["libdir"]), "INSITU_ADDRESS": "127.0.0.1:9"}
    proc = subprocess.run([MPIEXEC or "", "-n", "2", str(second_mpich[lang])], env=env, capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    # both libraries named: the program's Debian MPICH and the wheel's copy mpi4py's extension would load
    _assert_refused(proc.stdout, 2, "two MPI libraries in one process", "MPICH Version:", "libmpich.so.12",
                    "MPI.mpich.", f"would load {WHEEL_LIBMPI.resolve()}")  # fmt: skip
    if lang == "c":  # the refusal came before the import: the second library was never mapped
        for rank, (_, _, mapped) in _refusals(proc.stdout, 2).items():
            assert "," not in mapped and Path(mapped).name.startswith("libmpich.so.12"), (rank, mapped)
    assert proc.stderr.count("insitu: error: one MPI per process") == 1  # logged once, by the rank named


@pytest.fixture(scope="module")
def openmpi(built: dict[str, Any]) -> dict[str, Path]:
    """mpi_version.c and mpi_check.f90 built with Debian's Open MPI wrappers, linked with the MPICH shim."""
    base = built["base"] / "openmpi"
    base.mkdir()
    assert OMPICC and OMPIF90
    # Open MPI's own libdir first: the interpreter's lib directory holds the mpich wheel's libmpi.so
    first = ["-L" + _run([OMPICC, "--showme:libdirs"]).split()[0]]
    libs = ["-L" + built["libdir"], f"-Wl,--disable-new-dtags,-rpath,{built['libdir']}", "-linsitu"]
    _run([OMPICC, *first, str(TESTS / "mpi_version.c"), f"-I{Path(built['libdir']).parent / 'include'}", *libs,
          *_embed(), "-o", str(base / "mpi_version")])  # fmt: skip
    _run([OMPIF90, "-c", str(DATA / "fortran/insitu.f90"), "-o", str(base / "insitu.o")], cwd=base)
    _run([OMPIF90, *first, str(TESTS / "mpi_check.f90"), str(base / "insitu.o"), *libs, "-o",
          str(base / "mpi_check")], cwd=base)  # fmt: skip
    return {"c": base / "mpi_version", "f": base / "mpi_check"}


@needs_mpich
@needs_openmpi
@pytest.mark.parametrize(("lang", "abi"), [("c", None), ("f", None), ("c", "mpich")])
def test_open_mpi_programs_are_refused_on_every_rank_naming_both_libraries(built: dict[str, Any],
                                                                          openmpi: dict[str, Path], lang: str,
                                                                          abi: str | None) -> None:  # fmt: skip
    env = {**_clean_env(built, {"INSITU_ADDRESS": "127.0.0.1:9"}), **({"MPI4PY_MPIABI": abi} if abi else {})}
    cmd = [OMPIEXEC or "", "-n", "2", "--oversubscribe", "--allow-run-as-root", str(openmpi[lang])]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    if abi is None:  # mpi4py >= 4 picks its Open MPI extension, on the program's own libmpi.so.40: still refused
        named = ("Open MPI v", "libmpi.so.40", "which is not supported", "MPI.openmpi.", "libmpi.so.40 = ")
    else:  # mpi4py forced to its MPICH extension: it would load Debian's MPICH next to Open MPI
        named = ("Open MPI v", "libmpi.so.40", "MPI.mpich.", "libmpi.so.12, not loaded yet", "libmpich.so.12")
    _assert_refused(proc.stdout, 2, *named)
    for rank, (_, _, mapped) in _refusals(proc.stdout, 2).items():
        if lang == "c":
            assert [Path(m).name.split(".so")[0] for m in mapped.split(",")] == ["libmpi"], (rank, mapped)
            assert "libmpi.so.40" in mapped


RECORDED_VERSIONS = {
    "MPICH Version:      4.0.2\nMPICH Release date: Thu May 19 13:54:09 CDT 2022\nMPICH ABI:          14:2:2": "MPICH",
    "MPICH Version:      5.0.2\nMPICH Release date: Fri Sep 25 20:45:26 UTC 2026\nMPICH ABI:          18:2:6": "MPICH",
    "Intel(R) MPI Library 2021.10 for Linux* OS\n": "MPICH",
    "MVAPICH2 Version      :\t2.3.7\nMVAPICH2 Release date :\tWed March 02 22:00:00 EST 2022": "MPICH",
    "CRAY MPICH version 8.1.25.17 (ANL base 3.4a2)": "MPICH",
    "Open MPI v4.1.4, package: Debian OpenMPI, ident: 4.1.4, repo rev: v4.1.4, May 26, 2022": "OPEN_MPI",
    "Open MPI v5.0.3, package: Open MPI conda@builder Distribution, ident: 5.0.3": "OPEN_MPI",
    "Microsoft MPI 10.1": "UNKNOWN",
}


@pytest.mark.parametrize(("version", "family"), RECORDED_VERSIONS.items())
def test_the_mpi_family_rule_on_recorded_version_strings(version: str, family: str) -> None:
    from insitu.mpilib import MpiFamily, family_of_version, verdict

    assert family_of_version(version) == MpiFamily[family]
    same = verdict(version, "/usr/lib/libmpi.so.12", "/x/MPI.mpich.so", "libmpi.so.12", "/usr/lib/libmpi.so.12", True)
    other = verdict(version, "/usr/lib/libmpich.so.12", "/x/MPI.mpich.so", "libmpi.so.12", None, False,
                    "/v/libmpi.so.12")  # fmt: skip
    assert other is not None and "/usr/lib/libmpich.so.12" in other and "/v/libmpi.so.12" in other
    if family == "MPICH":  # the one supported family: the same object is fine, another one never
        assert same is None
        assert other.startswith("two MPI libraries in one process")
    else:
        assert same is not None and "which is not supported" in same and version.splitlines()[0] in same


def test_sonames_map_to_families_and_elf_needed_entries_are_read() -> None:
    from insitu.mpilib import MpiFamily, elf_dynamic, family_of_soname

    assert [family_of_soname(n) for n in ("libmpi.so.12", "libmpich.so.12", "libmpi.so.40", "libmpi_abi.so.1",
                                           "libfoo.so.1")] == [MpiFamily.MPICH, MpiFamily.MPICH, MpiFamily.OPEN_MPI,
                                                               MpiFamily.MPI_ABI, MpiFamily.UNKNOWN]  # fmt: skip
    libpython = Path(sysconfig.get_config_var("LIBDIR")) / str(sysconfig.get_config_var("LDLIBRARY"))
    if not libpython.exists():
        pytest.skip("no shared libpython")
    dyn = elf_dynamic(libpython)
    assert dyn.soname and dyn.soname.startswith("libpython")
    assert any(n.startswith("libc.so") for n in dyn.needed)
    with pytest.raises(ValueError, match="not an ELF file"):
        elf_dynamic(Path(__file__))


def test_fortran_constants_match_the_header() -> None:
    header = (C_DIR / "include" / "insitu.h").read_text()
    module = (DATA / "fortran" / "insitu.f90").read_text()
    for enum, pattern in (
        ("insitu_status", r"INSITU_(?:OK|ERR_\w+|DISABLED)"),
        ("insitu_dtype", r"INSITU_(?:[A-Z]+\d+)"),
    ):
        body = header[header.index(f"typedef enum {enum} {{") : header.index(f"}} {enum}_t;")]
        c_values = {m[1]: int(m[2]) for m in re.finditer(r"\b(INSITU_\w+) = (\d+)", body)}
        f_values = {m[1]: int(m[2]) for m in re.finditer(rf"\b({pattern}) = (\d+)", module)}
        assert c_values == f_values, enum
        assert len(c_values) >= 6
    statuses = {m[1]: int(m[2]) for m in re.finditer(r"\b(INSITU_(?:OK|ERR_\w+|DISABLED)) = (\d+)", module)}
    assert statuses == {f"INSITU_{s.name}": s.value for s in CStatus}
    assert {f"INSITU_{d.name}": d.value for d in CDtype} == {
        m[1]: int(m[2]) for m in re.finditer(r"\b(INSITU_(?:[A-Z]+\d+)) = (\d+)", module)
    }
