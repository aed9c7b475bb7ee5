"""Build and locate ``libinsitu.so``, the C-callable shim (``insitu build-shim``, ``insitu config --cflags``).

The library embeds the CPython of the environment insitu is installed in; its path is
compiled in (``INSITU_PYTHON`` overrides it at run time). It is built from the sources
shipped in the package (``insitu/data/c``) into ``<build dir>/lib``, next to a
``libmpi.so.12`` link to the simulation's MPICH so that the embedded mpi4py loads the
same MPI library as the program (one MPI per process). The build directory is
``--prefix``, else ``$INSITU_SHIM_DIR``, else a per-user cache keyed by the insitu
version, the interpreter and the MPI library (:func:`default_prefix`); never the
installed package.

Examples
--------
>>> flags = compile_flags("/opt/insitu")
>>> flags.split()[0]
'-I/opt/insitu/include'
>>> default_prefix(env={"XDG_CACHE_HOME": "/c"}, mpi_library=None).parent
PosixPath('/c/insitu/shim')
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable, Mapping
from pathlib import Path

from insitu.errors import ConfigError
from insitu.resources import data_path

__all__ = ["build_shim", "compile_flags", "default_prefix", "find_mpich", "link_flags", "sources"]

log = logging.getLogger(__name__)

_MPICH_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libmpich.so.12",
    "/usr/lib/aarch64-linux-gnu/libmpich.so.12",
    "/usr/lib64/mpich/lib/libmpich.so.12",
    "/usr/lib/libmpich.so.12",
)


def sources() -> Path:
    """``insitu/data/c`` of the installed package (``include/``, ``src/``)."""
    return data_path("c")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("insitu")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"


def default_prefix(env: Mapping[str, str] | None = None, mpi_library: str | None = None) -> Path:
    """Where the library is built when no ``--prefix`` is given.

    ``$INSITU_SHIM_DIR`` if set; else ``$XDG_CACHE_HOME/insitu/shim/<key>`` (``~/.cache`` when
    unset), ``<key>`` naming the insitu version, the Python version and the MPI library, plus a
    digest of the interpreter's and the MPI library's paths (two environments never share a build).

    Parameters
    ----------
    env
        Environment to read (default ``os.environ``).
    mpi_library
        Explicit MPICH library (else :func:`find_mpich`).
    """
    env = os.environ if env is None else env
    if env.get("INSITU_SHIM_DIR"):
        return Path(env["INSITU_SHIM_DIR"])
    cache = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    mpich = find_mpich(mpi_library, env)
    mpi_name = mpich.name if mpich is not None else "nompi"
    py = f"py{sys.version_info.major}.{sys.version_info.minor}"
    digest = hashlib.sha256(f"{sys.executable}\0{mpich and mpich.resolve()}".encode()).hexdigest()[:10]
    return cache / "insitu" / "shim" / f"{_version()}-{py}-{mpi_name}-{digest}"


def compile_flags(prefix: str | Path) -> str:
    """``-I`` flags for code including ``insitu.h``."""
    return f"-I{Path(prefix) / 'include'}"


def link_flags(prefix: str | Path) -> str:
    """Flags that link ``libinsitu`` (with a run path, so no library path is needed at run time)."""
    lib = Path(prefix) / "lib"
    return f"-L{lib} -Wl,--disable-new-dtags,-rpath,{lib} -linsitu"


def find_mpich(explicit: str | None = None, env: Mapping[str, str] | None = None) -> Path | None:
    """The MPICH library the C and Fortran simulations link (``$INSITU_MPI_LIBRARY`` overrides)."""
    env = os.environ if env is None else env
    for cand in (explicit, env.get("INSITU_MPI_LIBRARY"), *_MPICH_CANDIDATES):
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
    out = Path(prefix) if prefix else default_prefix(mpi_library=mpi_library)
    lib_dir, inc_dir = out / "lib", out / "include"
    lib_dir.mkdir(parents=True, exist_ok=True)
    inc_dir.mkdir(parents=True, exist_ok=True)
    headers = sorted((src / "include").glob("*.h"))
    for header in headers:
        _replace(inc_dir / header.name, functools.partial(shutil.copy2, header))
    target = lib_dir / "libinsitu.so"
    python = python or sys.executable
    stamp = lib_dir / "build.txt"
    recorded = f"{python}\n{_version()}\n"
    inputs = [src / "src" / "insitu.c", *headers]
    fresh = stamp.exists() and stamp.read_text() == recorded and not _stale(target, inputs)
    if force or not fresh:
        cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
        include = sysconfig.get_paths()["include"]
        libdir = sysconfig.get_config_var("LIBDIR")
        version = sysconfig.get_config_var("LDVERSION") or sysconfig.get_python_version()

        def compile_to(tmp: Path) -> None:
            cmd = [*shlex.split(cc), "-shared", "-fPIC", "-O2", "-std=c11", "-Wall", "-Wextra",
                   f"-I{include}", f"-I{src / 'include'}", f'-DINSITU_PYTHON_DEFAULT="{python}"',
                   str(src / "src" / "insitu.c"), "-o", str(tmp),
                   # the shim's own directory first: its libmpi.so.12 link decides which file the name
                   # denotes when insitu_start_mpi pins it (insitu/mpilib.py)
                   f"-L{libdir}", f"-Wl,-rpath,{lib_dir}:{libdir}", f"-lpython{version}", "-ldl"]  # fmt: skip
            log.info("building libinsitu: %s", shlex.join(cmd))
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            except FileNotFoundError:
                raise ConfigError(f"the C compiler {cc!r} is not installed; set CC or install gcc") from None
            if proc.returncode != 0:
                raise ConfigError(f"building libinsitu failed ({shlex.join(cmd)}):\n{proc.stderr[-3000:]}")

        _replace(target, compile_to)
        _replace(stamp, lambda tmp: tmp.write_text(recorded))
    mpich = find_mpich(mpi_library)
    if mpich is not None:
        _replace(lib_dir / "libmpi.so.12", lambda tmp: tmp.symlink_to(mpich))
    return target


def _replace(path: Path, make: Callable[[Path], object]) -> None:
    """Make ``path`` through a private temporary name, then rename it into place (concurrent builds are safe)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        make(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def main_config(what: str, prefix: str | None) -> str:
    """The text ``insitu config --cflags|--libs|--libdir|--fortran|--prefix|--data`` prints.

    ``--fortran`` and ``--data`` name files shipped in the package; the others build the
    library first if needed.
    """
    if what == "fortran":
        return str(data_path("fortran", "insitu.f90"))
    if what == "data":
        return str(data_path())
    out = Path(prefix) if prefix else default_prefix()
    build_shim(out)
    if what == "cflags":
        return compile_flags(out)
    if what == "libs":
        return link_flags(out)
    if what == "libdir":
        return str(out / "lib")
    return str(out)
