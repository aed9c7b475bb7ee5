"""Several arrays per step from C and Fortran, every Fortran type and rank 1 to 4, and insitu.h as C++.

A Gray-Scott reaction-diffusion model (``tests/capi/reaction_diffusion.c`` and ``.f90``) sends U and
V (and, from Fortran, four more arrays) in one collective step at 64-bit step numbers, on 4 ranks over
the session's multi-raylet cluster; ``tests/capi/save_steps.py`` saves what the analytics received and
the test compares it element by element with the model recomputed by numpy. Needs Debian's MPICH with
Fortran (see ``tests/test_capi.py``).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from insitu.capi import CStatus
from tests.conftest import ROOT, run_name
from tests.test_capi import MPICC, MPIF90, _lines, _run, built, coupled, needs_mpich

__all__ = ["built"]  # the module-scoped fixture of tests/test_capi.py, shared

TESTS = ROOT / "tests" / "capi"
NX, NY, STEPS = 21, 18, 4  # uneven over a 2x2 grid
BASE = 5_000_000_000  # steps beyond 32 bits
DU, DV, FEED, KILL = 0.16, 0.08, 0.035, 0.065


def gray_scott(nx: int, ny: int, steps: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """U and V after each update, with the operations of the C and Fortran programs in their order."""
    i, j = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
    inside = (nx // 3 <= i) & (i < 2 * nx // 3) & (ny // 3 <= j) & (j < 2 * ny // 3)
    u = np.where(inside, 0.5, 1.0) - 0.005 * ((i + 2 * j) % 3)
    v = np.where(inside, 0.25, 0.0) + 0.01 * ((7 * i + 3 * j) % 5)

    def lap(f: np.ndarray) -> np.ndarray:
        return np.roll(f, 1, 0) + np.roll(f, -1, 0) + np.roll(f, 1, 1) + np.roll(f, -1, 1) - 4.0 * f

    for _ in range(steps):
        uvv = u * v * v
        u, v = u + (DU * lap(u) - uvv + FEED * (1.0 - u)), v + (DV * lap(v) + uvv - (FEED + KILL) * v)
        yield u, v


def _model(cluster: Any, built: dict[str, Any], program: Path, names: list[str], tmp: Path) -> tuple[Any, ...]:
    """Run ``program`` on 4 ranks beside save_steps.py: its output lines, the arrays received per step, stdout."""
    out = tmp / run_name("rd")
    sim = coupled(cluster, built, [str(program), "-", str(NX), str(NY), str(STEPS)],
                  [str(TESTS / "save_steps.py"), "--out", str(out), *names], clean=True)  # fmt: skip
    steps = json.loads((out / "steps.json").read_text())
    assert steps == [BASE + k for k in range(STEPS)]  # every 64-bit step, in order
    received = {k: {n: np.load(out / f"{n}_{BASE + k}.npy") for n in names} for k in range(STEPS)}
    return _lines(sim.stdout), received, sim.stdout[-2000:]


@pytest.fixture(scope="module")
def programs(built: dict[str, Any]) -> dict[str, Path]:
    """The C and Fortran reaction-diffusion programs, linked with the shim of ``built``."""
    base, libdir = built["base"], built["libdir"]
    libs = [f"-L{libdir}", f"-Wl,--disable-new-dtags,-rpath,{libdir}", "-linsitu"]
    assert MPICC and MPIF90
    out = {"c": base / "reaction_diffusion_c", "f": base / "reaction_diffusion_f"}
    _run([MPICC, "-O2", "-Wall", "-Werror", str(TESTS / "reaction_diffusion.c"), f"-I{Path(libdir).parent / 'include'}",
          *libs, "-o", str(out["c"])])  # fmt: skip
    _run([MPIF90, "-O2", "-Wall", str(TESTS / "reaction_diffusion.f90"), str(base / "insitu.o"), *libs, "-o",
          str(out["f"])], cwd=base)  # fmt: skip
    return out


@needs_mpich
@pytest.mark.cluster
def test_two_arrays_per_step_from_c_arrive_element_by_element(
    cluster: Any, built: dict[str, Any], programs: dict[str, Path], tmp_path: Path
) -> None:
    got, received, stdout = _model(cluster, built, programs["c"], ["U", "V"], tmp_path)
    for rank in range(4):
        assert [got[(f"send-{k}", rank)] for k in range(STEPS)] == ["INSITU_OK |"] * STEPS, stdout
    for k, (u, v) in enumerate(gray_scott(NX, NY, STEPS)):
        assert received[k]["U"].shape == received[k]["V"].shape == (NX, NY)
        np.testing.assert_allclose(received[k]["U"], u, rtol=1e-13, atol=1e-15, err_msg=f"U at step {k}")
        np.testing.assert_allclose(received[k]["V"], v, rtol=1e-13, atol=1e-15, err_msg=f"V at step {k}")
        assert np.abs(received[k]["U"] - received[k]["V"]).min() > 0.1  # two different arrays, not one twice


@needs_mpich
@pytest.mark.cluster
def test_six_arrays_of_every_fortran_type_and_rank_per_step_arrive_element_by_element(
    cluster: Any, built: dict[str, Any], programs: dict[str, Path], tmp_path: Path
) -> None:
    names = ["U", "V", "T", "N", "L", "B"]
    got, received, stdout = _model(cluster, built, programs["f"], names, tmp_path)
    for rank in range(4):
        assert got[("init", rank)] == "0 |", stdout
        # insitu_stage's local checks: a strided section and a start of the wrong length, named
        status, _, message = got[("stage-strided", rank)].partition(" | ")
        assert (int(status), "field U is not contiguous") == (CStatus.ERR_ARG, message[:25]), message
        status, _, message = got[("stage-short-start", rank)].partition(" | ")
        assert int(status) == CStatus.ERR_SIZE and "start and count need 2 entries" in message, message
        assert [got[(f"send-{k}", rank)] for k in range(STEPS)] == ["0 |"] * STEPS, stdout
    i, j, a, c = np.meshgrid(np.arange(NX), np.arange(NY), np.arange(2), np.arange(3), indexing="ij")
    for k, (u, v) in enumerate(gray_scott(NX, NY, STEPS)):
        got_k = received[k]
        assert {n: got_k[n].dtype.str for n in names} == {"U": "<f8", "V": "<f8", "T": "<f4", "N": "<i4", "L": "<i8",
                                                          "B": "|i1"}  # fmt: skip
        np.testing.assert_allclose(got_k["U"], u, rtol=1e-13, atol=1e-15, err_msg=f"U at step {k}")
        np.testing.assert_allclose(got_k["V"], v, rtol=1e-13, atol=1e-15, err_msg=f"V at step {k}")
        assert np.abs(got_k["U"] - got_k["V"]).min() > 0.1
        np.testing.assert_allclose(got_k["T"], np.stack([u, v], axis=-1).astype(np.float32), rtol=1e-6)
        g = np.arange(16)
        np.testing.assert_array_equal(got_k["N"], 1000 * (g // 4) + g % 4 + 10 * k)
        np.testing.assert_array_equal(got_k["L"], 2**40 + i + 100 * j + 10000 * a + 100000 * c + k)
        np.testing.assert_array_equal(got_k["B"], ((i[..., 0, 0] + 2 * j[..., 0, 0] + k) % 200 - 100))
        assert got_k["B"].min() < 0  # signed bytes stay signed


@needs_mpich
@pytest.mark.cluster
@pytest.mark.parametrize("lang", ["c", "f"])
def test_arrays_at_their_own_cadence_from_c_and_fortran(
    cluster: Any, built: dict[str, Any], programs: dict[str, Path], tmp_path: Path, lang: str
) -> None:
    """U (and from Fortran T, N, L, B) every step; V every 2nd step in a second call of the same step."""
    names = ["U", "V"] if lang == "c" else ["U", "V", "N"]
    out = tmp_path / run_name("cadence")
    sim = coupled(cluster, built, [str(programs[lang]), "-", str(NX), str(NY), str(STEPS), "2"],
                  [str(TESTS / "save_steps.py"), "--out", str(out), "--each", *names], clean=True)  # fmt: skip
    got, stdout = _lines(sim.stdout), sim.stdout[-2000:]
    ok = "INSITU_OK |" if lang == "c" else "0 |"
    for rank in range(4):
        assert [got[(f"send-{k}", rank)] for k in range(STEPS)] == [ok] * STEPS, stdout
        assert [got[(f"sendv-{k}", rank)] for k in range(0, STEPS, 2)] == [ok] * len(range(0, STEPS, 2)), stdout
    steps = json.loads((out / "steps.json").read_text())
    assert steps["U"] == [BASE + k for k in range(STEPS)]
    assert steps["V"] == [BASE + k for k in range(0, STEPS, 2)]  # only V's own steps
    for k, (u, v) in enumerate(gray_scott(NX, NY, STEPS)):
        np.testing.assert_allclose(np.load(out / f"U_{BASE + k}.npy"), u, rtol=1e-13, atol=1e-15, err_msg=f"U {k}")
        if k % 2 == 0:
            np.testing.assert_allclose(np.load(out / f"V_{BASE + k}.npy"), v, rtol=1e-13, atol=1e-15,
                                       err_msg=f"V {k}")  # fmt: skip
        else:
            assert not (out / f"V_{BASE + k}.npy").exists()
    if lang == "f":
        assert steps["N"] == steps["U"]  # the first call of each step carried the other arrays too


@needs_mpich
def test_insitu_h_compiles_and_links_as_cpp(built: dict[str, Any], tmp_path: Path) -> None:
    mpicxx = MPICC and MPICC.replace("mpicc", "mpicxx")
    source = tmp_path / "use_insitu.cpp"
    source.write_text("""#include <mpi.h>

#include <cstdio>
#include "insitu.h"
int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    insitu_bridge_t *b = nullptr;
    if (argc > 5) insitu_init(MPI_COMM_WORLD, "never", 0, nullptr, &b); /* compiled and linked, not run */
    std::printf("%s %d\\n", insitu_status_name(INSITU_ERR_MPI_MISMATCH), INSITU_CHECK_VERSION());
    MPI_Finalize();
    return 0;
}
""")
    include = Path(built["libdir"]).parent / "include"
    libs = [f"-L{built['libdir']}", f"-Wl,-rpath,{built['libdir']}", "-linsitu"]
    for flags in (["-std=c++11"], ["-std=c++17", "-DINSITU_STUB"]):
        exe = tmp_path / f"use_insitu{len(flags[-1])}"
        _run([mpicxx or "", *flags, "-Wall", "-Wextra", "-Werror", "-pedantic", str(source), f"-I{include}",
              *([] if "-DINSITU_STUB" in flags else libs), "-o", str(exe)])  # fmt: skip
        proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr[-2000:]
        stub = "-DINSITU_STUB" in flags
        assert proc.stdout.split() == ["INSITU_OK" if stub else "INSITU_ERR_MPI_MISMATCH", "0"], proc.stdout
