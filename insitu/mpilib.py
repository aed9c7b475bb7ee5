"""One MPI per process: which MPI library a C or Fortran program runs, and which one mpi4py would load.

A C or Fortran simulation coupled through ``libinsitu`` runs the MPI library it was linked
with; the embedded mpi4py must use that very library. If importing ``mpi4py.MPI`` loaded a
second ``libmpi`` into the process, its symbols would be interposed by the program's
(the extension's ``MPI_*`` references bind to the first definition in the global scope),
so ``MPI.Get_library_version()`` reports the program's library whatever was loaded, and
calls cross two implementations: with two ABIs (MPICH handles are integers, Open MPI's
are pointers) the process crashes. The check therefore never imports ``mpi4py.MPI``:

1. the program's library is the object that defines ``MPI_Get_library_version`` in the
   process's global scope (``libinsitu`` finds it with ``dlsym(RTLD_DEFAULT)`` and
   ``dladdr``), and its implementation family comes from the version string the program's
   ``MPI_Get_library_version`` returned;
2. mpi4py's extension is the file ``importlib.util.find_spec("mpi4py.MPI")`` names (mpi4py
   >= 4 selects one per MPI ABI, ``MPI.mpich.*.so`` or ``MPI.openmpi.*.so``, by looking at
   the libraries already in the process, or ``MPI4PY_MPIABI``); the library it will load is
   its ``DT_NEEDED`` ``libmpi`` entry, read from the ELF file (:func:`elf_dynamic`);
3. ``libinsitu`` asks the dynamic loader whether that name already denotes a loaded object
   (``dlopen(name, RTLD_NOLOAD)`` from ``libinsitu``, whose run path starts with the shim
   directory holding the ``libmpi.so.12`` link to the MPICH it was built for): glibc matches
   a needed name against the names of loaded objects before searching, and records the name
   under which a loaded file was found, so a success pins the name to that object for the
   later ``import mpi4py.MPI``; a failure means the import would load a new library.

**Rule** (:func:`verdict`): supported iff the program's MPI is of the MPICH ABI family
(MPICH, Intel MPI, MVAPICH, Cray MPICH: ``libmpi.so.12``/``libmpich.so.12``) and the
library mpi4py's extension needs is the program's very object. Everything else is refused
with ``INSITU_ERR_MPI_MISMATCH`` naming both libraries: a second library of the same
family (two MPICH builds), a different family, and Open MPI programs (not supported by the
C/Fortran shim, even though mpi4py >= 4 would select Open MPI's extension).

Examples
--------
>>> family_of_version("MPICH Version:      4.0.2\\nMPICH Release date: ...").name
'MPICH'
>>> family_of_version("Open MPI v4.1.4, package: Debian OpenMPI").name
'OPEN_MPI'
>>> family_of_soname("libmpi.so.40").name
'OPEN_MPI'
"""

from __future__ import annotations

import os
import re
import struct
import sys
import sysconfig
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

__all__ = ["ElfDynamic", "MpiFamily", "elf_dynamic", "family_of_soname", "family_of_version", "locate",
           "mpi4py_extension", "verdict"]  # fmt: skip

_SHT_DYNAMIC = 6
_DT_NEEDED, _DT_SONAME, _DT_RPATH, _DT_RUNPATH = 1, 14, 15, 29


class MpiFamily(Enum):
    """Implementation family, i.e. the binary interface of the ``MPI_*`` symbols."""

    MPICH = "the MPICH ABI"
    OPEN_MPI = "Open MPI"
    MPI_ABI = "the MPI standard ABI"
    UNKNOWN = "an MPI of unknown family"


def family_of_version(version: str) -> MpiFamily:
    """Family of the library whose ``MPI_Get_library_version`` string is ``version``.

    Parameters
    ----------
    version
        The string, as the program's MPI returned it.
    """
    if re.search(r"Open MPI", version, re.IGNORECASE):
        return MpiFamily.OPEN_MPI
    if re.search(r"MPICH|MVAPICH|Intel\(R\) MPI", version, re.IGNORECASE):
        return MpiFamily.MPICH
    return MpiFamily.UNKNOWN


def family_of_soname(soname: str) -> MpiFamily:
    """Family of a ``libmpi`` named ``soname`` (``libmpi.so.12`` MPICH, ``libmpi.so.40`` Open MPI)."""
    if re.fullmatch(r"libmpi(ch)?\.so\.12(\..*)?", soname):
        return MpiFamily.MPICH
    if re.fullmatch(r"libmpi\.so\.(40|80)(\..*)?", soname):
        return MpiFamily.OPEN_MPI
    if soname.startswith("libmpi_abi."):
        return MpiFamily.MPI_ABI
    return MpiFamily.UNKNOWN


@dataclass(frozen=True, slots=True)
class ElfDynamic:
    """The dynamic-linking entries of an ELF shared object or executable."""

    needed: tuple[str, ...]
    soname: str | None
    rpath: tuple[str, ...]
    runpath: tuple[str, ...]


def elf_dynamic(path: str | Path) -> ElfDynamic:
    """Read ``DT_NEEDED``, ``DT_SONAME``, ``DT_RPATH`` and ``DT_RUNPATH`` of an ELF file.

    Parameters
    ----------
    path
        The file (32- or 64-bit, either byte order).

    Raises
    ------
    ValueError
        The file is not ELF or has no dynamic section.
    """
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF":
        raise ValueError(f"{path} is not an ELF file")
    wide, order = data[4] == 2, "<" if data[5] == 1 else ">"
    shoff, shentsize, shnum = (struct.unpack_from(order + "Q", data, 0x28)[0] if wide else
                               struct.unpack_from(order + "I", data, 0x20)[0],
                               *struct.unpack_from(order + "HH", data, 0x3A if wide else 0x2E))  # fmt: skip
    section = order + ("IIQQQQIIQQ" if wide else "IIIIIIIIII")

    def header(i: int) -> tuple[int, ...]:
        return struct.unpack_from(section, data, shoff + i * shentsize)

    for i in range(shnum):
        _, kind, _, _, offset, size, link, _, _, entsize = header(i)
        if kind != _SHT_DYNAMIC:
            continue
        strtab = header(link)[4]
        entry = order + ("qQ" if wide else "iI")
        values: dict[int, list[str]] = {}
        for at in range(offset, offset + size, entsize or struct.calcsize(entry)):
            tag, value = struct.unpack_from(entry, data, at)
            if tag == 0:
                break
            if tag in (_DT_NEEDED, _DT_SONAME, _DT_RPATH, _DT_RUNPATH):
                end = data.index(b"\0", strtab + value)
                values.setdefault(tag, []).append(data[strtab + value : end].decode(errors="replace"))
        paths = {t: tuple(p for v in values.get(t, []) for p in v.split(":") if p) for t in (_DT_RPATH, _DT_RUNPATH)}
        soname = values[_DT_SONAME][0] if _DT_SONAME in values else None
        return ElfDynamic(tuple(values.get(_DT_NEEDED, [])), soname, paths[_DT_RPATH], paths[_DT_RUNPATH])
    raise ValueError(f"{path} has no dynamic section")


def mpi4py_extension() -> tuple[Path, str]:
    """mpi4py's ``MPI`` extension for this process and the ``libmpi`` it needs; never imports it.

    Returns
    -------
    tuple[Path, str]
        The extension file and its ``DT_NEEDED`` MPI library name.

    Raises
    ------
    LookupError
        mpi4py is not installed, has no extension for this MPI or needs no ``libmpi``.
    """
    import importlib.util

    if "mpi4py.MPI" in sys.modules:
        spec = sys.modules["mpi4py.MPI"].__spec__
    else:
        try:
            spec = importlib.util.find_spec("mpi4py.MPI")  # runs mpi4py's MPI ABI selection, loads nothing
        except ImportError as exc:
            raise LookupError(f"mpi4py is not importable: {exc}") from None
    if spec is None or not spec.origin:
        raise LookupError("mpi4py has no MPI extension for the MPI library of this process")
    origin = Path(spec.origin)
    needed = [n for n in elf_dynamic(origin).needed if n.startswith(("libmpi.", "libmpich.", "libmpi_abi."))]
    if not needed:
        raise LookupError(f"{origin} needs no libmpi (a statically linked MPI?)")
    return origin, needed[0]


def locate(soname: str, env: dict[str, str] | None = None) -> Path | None:
    """Where the dynamic loader would most likely find ``soname`` if it is not loaded (for messages only).

    Searches the run paths of the executable, ``LD_LIBRARY_PATH``, the interpreter's library
    directory (where the ``mpich`` wheel installs ``libmpi.so.12``) and the system's directories.
    """
    env = dict(os.environ) if env is None else env
    dirs: list[str] = []
    try:
        exe = elf_dynamic("/proc/self/exe")
        dirs += [*exe.rpath, *exe.runpath]
    except (OSError, ValueError):
        pass
    dirs += [d for d in env.get("LD_LIBRARY_PATH", "").split(":") if d]
    dirs += [str(sysconfig.get_config_var("LIBDIR") or ""), f"{sys.prefix}/lib",
             "/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/lib"]  # fmt: skip
    for d in dirs:
        candidate = Path(d.replace("$ORIGIN", str(Path("/proc/self/exe").resolve().parent))) / soname
        if d and candidate.exists():
            return candidate.resolve()
    return None


def _first_line(version: str) -> str:
    return " ".join(version.strip().splitlines()[:1]).strip() or "(no version string)"


def verdict(program_version: str, program_path: str | None, extension: str, soname: str,
            loaded_path: str | None, same: bool, elsewhere: str | None = None) -> str | None:  # fmt: skip
    """``None`` when the embedded mpi4py will use the program's MPI library, else why not (naming both).

    Parameters
    ----------
    program_version
        The program's ``MPI_Get_library_version`` string.
    program_path
        The file of the object defining ``MPI_Get_library_version`` in the global scope
        (``None``: no MPI visible to the dynamic loader, e.g. a statically linked one).
    extension
        mpi4py's ``MPI`` extension file.
    soname
        The ``libmpi`` it needs.
    loaded_path
        The loaded object that name denotes (``None``: not loaded; the import would load it).
    same
        Whether that object is the program's library.
    elsewhere
        Where the loader would probably find ``soname`` when it is not loaded (:func:`locate`).

    Examples
    --------
    >>> verdict("MPICH Version: 4.0.2", "/usr/lib/libmpich.so.12", "/x/MPI.mpich.so", "libmpi.so.12",
    ...         "/usr/lib/libmpich.so.12", True) is None
    True
    >>> print(verdict("MPICH Version: 4.0.2", "/usr/lib/libmpich.so.12", "/x/MPI.mpich.so", "libmpi.so.12",
    ...               None, False, "/venv/lib/libmpi.so.12"))  # doctest: +ELLIPSIS
    two MPI libraries in one process: the program runs MPICH Version: 4.0.2 (/usr/lib/libmpich.so.12) but ...
    """
    family = family_of_version(program_version)
    theirs = family_of_soname(soname)
    program = f"{_first_line(program_version)} ({program_path or 'not a shared library visible to the loader'})"
    if loaded_path is not None:
        library = f"{soname} = {loaded_path}"
    else:
        library = f"{soname}, not loaded yet: importing mpi4py.MPI would load {elsewhere or 'a new copy'}"
    mpi4py = f"the embedded mpi4py's {Path(extension).name} needs {library} ({theirs.value})"
    fix = ("insitu's C/Fortran coupling supports MPICH-ABI libraries (MPICH, Intel MPI, MVAPICH, Cray MPICH) "
           "used by both the program and mpi4py: link the program with $(insitu config --libs) of a shim built "
           "for its library (insitu build-shim --mpi-library PATH)")  # fmt: skip
    if family != MpiFamily.MPICH:
        return f"the program runs {program}, {family.value}, which is not supported; {mpi4py}. {fix}"
    if program_path is None or not same:
        return f"two MPI libraries in one process: the program runs {program} but {mpi4py}. {fix}"
    return None
