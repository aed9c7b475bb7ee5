"""insitu: hand MPI simulation arrays to Dask analytics on Ray while the simulation runs.

Simulation side: :class:`ArraySpec` and :class:`Bridge`. Analytics side:
:class:`Analytics`. Configuration: :class:`Config` (``INSITU_*`` variables).
Nothing here imports Ray or mpi4py, configures logging or reads the
environment at import time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from insitu.actors.consumers import ConsumerKind
from insitu.config import Backpressure, Config, FailurePolicy, Scheduler, When
from insitu.layout import ArrayLayout, ArraySpec
from insitu.messages import Gap

if TYPE_CHECKING:
    from insitu.analytics import Analytics, RunSummary
    from insitu.bridge import Bridge, BridgeStats

__version__ = "0.1.0"

__all__ = [
    "Analytics",
    "ArrayLayout",
    "ArraySpec",
    "Backpressure",
    "BlockRef",
    "Bridge",
    "BridgeStats",
    "ByRef",
    "Bypass",
    "Config",
    "ConsumerKind",
    "Dispatcher",
    "FailurePolicy",
    "Gap",
    "RunSummary",
    "Scheduler",
    "SlicePool",
    "SliceSpec",
    "When",
    "__version__",
    "open_recording",
    "print_debug_info",
    "record",
]

_LAZY = {
    "Analytics": "insitu.analytics",
    "RunSummary": "insitu.analytics",
    "BlockRef": "insitu.analytics",
    "SlicePool": "insitu.pool",
    "SliceSpec": "insitu.pool",
    "Bridge": "insitu.bridge",
    "BridgeStats": "insitu.bridge",
    "ByRef": "insitu.dispatch",
    "Dispatcher": "insitu.dispatch",
    "Bypass": "insitu.bypass",
    "record": "insitu.record",
    "open_recording": "insitu.record",
}


def __getattr__(name: str) -> Any:
    # Bridge pulls in mpi4py only, Analytics pulls in ray and dask: import them on first use
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'insitu' has no attribute {name!r}")


def print_debug_info() -> None:
    """Print the versions of Python, insitu and its dependencies, for bug reports."""
    import importlib.metadata as md
    import platform

    print(f"python  {platform.python_version()} ({platform.platform()})")
    print(f"insitu  {__version__}")
    for dist in ("ray", "dask", "numpy", "mpi4py", "mpich"):
        try:
            print(f"{dist:7} {md.version(dist)}")
        except md.PackageNotFoundError:
            print(f"{dist:7} not installed")
    try:
        from mpi4py import MPI

        print("MPI     " + MPI.Get_library_version().splitlines()[0])
    except Exception as exc:  # report, the function is diagnostic
        print(f"MPI     unavailable ({exc})")
