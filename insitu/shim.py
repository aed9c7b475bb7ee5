"""Build and locate ``libinsitu.so``, the C-callable shim (``insitu build-shim``, ``insitu config --cflags``).

The library embeds the CPython of the environment insitu is installed in; its path is
compiled in (``INSITU_PYTHON`` overrides it at run time). It is built from
``sim_adapters/c`` into ``<build dir>/lib`` (default: ``sim_adapters/c/build`` of the
checkout; ``INSITU_SHIM_DIR`` or ``--prefix`` chooses another), next to a
``libmpi.so.12`` link to the simulation's MPICH so that the embedded mpi4py loads the
same MPI library as the program (one MPI per process).

Examples
--------
>>> flags = compile_flags("/opt/insitu")
>>> flags.split()[0]
'-I/opt/insitu/include'
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from insitu.errors import ConfigError

__all__ = ["build_shim", "compile_flags", "default_prefix", "find_mpich", "link_flags", "sources"]

log = logging.getLogger(__name__)

_MPICH_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libmpich.so.12",
    "/usr/lib/aarch64-linux-gnu/libmpich.so.12",
    "/usr/lib64/mpich/lib/libmpich.so.12",
    "/usr/lib/libmpich.so.12",
)


def sources() -> Path:
    """``sim_adapters/c`` of the checkout this package runs from."""
    src = Path(__file__).resolve().parent.parent / "sim_adapters" / "c"
    if not (src / "src" / "insitu.c").is_file():
        raise ConfigError(
            f"the C shim's sources are not next to the package (looked in {src}); "
            "build libinsitu from a source checkout installed with 'pip install -e'"
        )
    return src


def default_prefix() -> Path:
    """Where the library is built: ``$INSITU_SHIM_DIR`` or ``sim_adapters/c/build``."""
    env = os.environ.get("INSITU_SHIM_DIR")
    return Path(env) if env else sources() / "build"


def compile_flags(prefix: str | Path) -> str:
    """``-I`` flags for code including ``insitu.h``."""
    return f"-I{Path(prefix) / 'include'}"


def link_flags(prefix: str | Path) -> str:
    """Flags that link ``libinsitu`` (with a run path, so no library path is needed at run time)."""
    lib = Path(prefix) / "lib"
    return f"-L{lib} -Wl,--disable-new-dtags,-rpath,{lib} -linsitu"


def find_mpich(explicit: str | None = None) -> Path | None:
    """The MPICH library the C and Fortran simulations link (``$INSITU_MPI_LIBRARY`` overrides)."""
    for cand in (explicit, os.environ.get("INSITU_MPI_LIBRARY"), *_MPICH_CANDIDATES):
        if cand and Path(cand).exists():
            return Path(cand)
    return None


def _stale(target: Path, inputs: list[Path]) -> bool:
    return not target.exists() or any(p.stat().st_mtime > target.stat().st_mtime for p in inputs)


def build_shim(prefix: str | Path | None = None, python: str | None = None, mpi_library: str | None = None,
               force: bool = False) -> Path:  # fmt: skip
    """Build ``<prefix>/lib/libinsitu.so`` and copy the headers to ``<prefix>/include``.

    Parameters
    ----------
    prefix
        Build directory (default :func:`default_prefix`).
    python
        Interpreter the library embeds (default: this one, ``sys.executable``).
    mpi_library
        The simulation's MPICH ``libmpich.so.12`` (default: Debian's, if present).
    force
        Rebuild even if the library is newer than its sources.

    Returns
    -------
    Path
        The built library.
    """
    src = sources()
    out = Path(prefix) if prefix else default_prefix()
    lib_dir, inc_dir = out / "lib", out / "include"
    lib_dir.mkdir(parents=True, exist_ok=True)
    inc_dir.mkdir(parents=True, exist_ok=True)
    for header in sorted((src / "include").glob("*.h")):
        shutil.copy2(header, inc_dir / header.name)
    target = lib_dir / "libinsitu.so"
    inputs = [src / "src" / "insitu.c", *sorted((src / "include").glob("*.h"))]
    python = python or sys.executable
    stamp = lib_dir / "python.txt"
    if force or _stale(target, inputs) or not stamp.exists() or stamp.read_text() != python:
        cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
        include = sysconfig.get_paths()["include"]
        libdir = sysconfig.get_config_var("LIBDIR")
        version = sysconfig.get_config_var("LDVERSION") or sysconfig.get_python_version()
        cmd = [*shlex.split(cc), "-shared", "-fPIC", "-O2", "-std=c11", "-Wall", "-Wextra",
               f"-I{include}", f"-I{src / 'include'}", f'-DINSITU_PYTHON_DEFAULT="{python}"',
               str(src / "src" / "insitu.c"), "-o", str(target),
               f"-L{libdir}", f"-Wl,-rpath,{libdir}", f"-lpython{version}"]  # fmt: skip
        log.info("building libinsitu: %s", shlex.join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise ConfigError(f"building libinsitu failed ({shlex.join(cmd)}):\n{proc.stderr[-3000:]}")
        stamp.write_text(python)
    mpich = find_mpich(mpi_library)
    link = lib_dir / "libmpi.so.12"
    if mpich is not None:
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(mpich)
    return target


def main_config(what: str, prefix: str | None) -> str:
    """The text ``insitu config --cflags|--libs|--libdir|--prefix`` prints (builds the library if needed)."""
    out = Path(prefix) if prefix else default_prefix()
    build_shim(out)
    if what == "cflags":
        return compile_flags(out)
    if what == "libs":
        return link_flags(out)
    if what == "libdir":
        return str(out / "lib")
    if what == "fortran":
        return str(sources().parent / "fortran" / "insitu.f90")
    return str(out)
