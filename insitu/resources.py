"""Files shipped inside the package, and the executables of this environment.

Everything a command needs at run time lies under ``insitu/data`` and is found with
:mod:`importlib.resources`, so a wheel installed anywhere works without a checkout:

=========================  ==========================================================
``c/include``              ``insitu.h`` and ``insitu_stub.h``
``c/src``                  ``insitu.c``, the shim ``insitu build-shim`` compiles
``fortran``                ``insitu.f90``, the Fortran module
``launch``                 ``insitu.sbatch`` and the node scripts ``insitu launch`` uses
``examples/{python,c,fortran}``  the heat2d simulation in three languages
``analytics``              ``heat_stats.py`` and ``train_surrogate.py``
=========================  ==========================================================

Executables (``ray``, ``mpiexec``, ``insitu``) are taken from the directory of the running
interpreter first, so ``venv/bin/python -m ...`` works without an activated environment.

Examples
--------
>>> data_path("c", "include", "insitu.h").name
'insitu.h'
>>> executable("python", env_var=None) == sys.executable
True
"""

from __future__ import annotations

import os
import shutil
import sys
from importlib import resources
from pathlib import Path

from insitu.errors import ConfigError

__all__ = ["data_path", "executable"]


def data_path(*parts: str) -> Path:
    """The file or directory ``insitu/data/<parts>`` of the installed package.

    Parameters
    ----------
    *parts
        Path components below ``insitu/data`` (none: the data directory itself).

    Returns
    -------
    Path
        A path on disk.

    Raises
    ------
    ConfigError
        The installation lacks it (a broken wheel) or is not on a file system (a zip).
    """
    node = resources.files("insitu").joinpath("data")
    for part in parts:
        node = node.joinpath(part)
    if not isinstance(node, Path):
        raise ConfigError(f"insitu is installed in an archive ({node}); install it unpacked (pip install insitu)")
    if not node.exists():
        raise ConfigError(f"{node} is missing from the installed insitu package; reinstall it (pip install insitu)")
    return node


def executable(name: str, env_var: str | None) -> str:
    """The command ``name`` of this environment.

    Looked up in order: ``$env_var`` (an override, e.g. a site's ``mpiexec`` or a test's fake),
    the directory of the running interpreter (``Path(sys.executable).parent``), then ``PATH``.
    ``python`` is the running interpreter itself.

    Parameters
    ----------
    name
        Command name (``ray``, ``mpiexec``, ``insitu``, ``python``).
    env_var
        Environment variable that overrides the look-up, or None.

    Returns
    -------
    str
        Absolute path (or the override as given).

    Raises
    ------
    FileNotFoundError
        Not found anywhere; the message lists where it looked.
    """
    if env_var and os.environ.get(env_var):
        return os.environ[env_var]
    if name == "python":
        return sys.executable
    here = Path(sys.executable).parent
    found = shutil.which(name, path=str(here)) or shutil.which(name)
    if found is None:
        hint = f" or set {env_var}" if env_var else ""
        raise FileNotFoundError(f"'{name}' is neither next to {sys.executable} nor on PATH; install it{hint}")
    return found
