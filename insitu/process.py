"""What the :class:`~insitu.analytics.Analytics` of one process share: the Ray connection and the Dask router.

Ray connects a process to one cluster, and Dask's default scheduler is a process-wide
setting. Several ``Analytics`` in one process (threads, or one after the other) must not
step on each other, so both live here, once per process:

* **The Ray connection** (:func:`acquire_ray`, :func:`release_ray`) is counted: insitu
  connects with the first ``Analytics`` that needs it and disconnects, if it made the
  connection, when the last one leaves. An ``Analytics`` pointed at another cluster than
  the one this process is connected to is refused (:func:`check_cluster`).
* **The scheduler router** (:func:`route_graph`) is installed once, as Dask's default
  scheduler, when the first ``Analytics`` runs; nothing else is ever set process-wide.
  It picks the scheduler from the graph's own leaves: a graph holding a chunk of a live
  ``Analytics`` runs on that ``Analytics``'s scheduler (:class:`insitu.graph.NodeScheduler`
  or Ray's ``ray_dask_get``), any other graph on the scheduler configured before the
  router (Dask's threaded scheduler if none). An explicit ``scheduler=`` (argument or
  ``dask.config.set``) wins, as always in Dask.

Nothing here runs at import.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import cloudpickle
import dask
import numpy as np

from insitu.config import Config
from insitu.errors import ConfigError

__all__ = ["Route", "SigtermRequest", "acquire_ray", "check_cluster", "install_router", "register", "release_ray",
           "route_graph", "sigterm_between_steps"]

log = logging.getLogger(__name__)

Get = Callable[..., Any]
"""A Dask scheduler ``get(dsk, keys, **kwargs)``."""

_LOCK = threading.Lock()  # routes and installation
_RAY_LOCK = threading.Lock()  # the connection (held while connecting: never by the router)


@dataclass(frozen=True, eq=False)
class Route:
    """One live owner of chunks: the graphs holding one of its chunks run on its ``get``.

    Parameters
    ----------
    owns
        Whether an object ref (by its hex id) is one of the owner's chunks.
    get
        The owner's scheduler.
    name
        For messages (the run name).
    """

    owns: Callable[[str], bool]
    get: Get
    name: str


@dataclass
class _State:
    routes: list[Route]
    installed: bool = False
    fallback: Get | None = None
    made: bool = False  # insitu made the connection (and so ends it)
    users: int = 0


_STATE = _State(routes=[])

# Dask's documented local schedulers, by the names ``dask.config.set(scheduler=...)`` takes
_NAMED: dict[str, str] = {
    "threads": "dask.threaded",
    "threading": "dask.threaded",
    "processes": "dask.multiprocessing",
    "multiprocessing": "dask.multiprocessing",
    "sync": "dask.local",
    "synchronous": "dask.local",
    "single-threaded": "dask.local",
}


# -- the Ray connection -------------------------------------------------------------------------
def _endpoint(address: str) -> tuple[str, str]:
    host, _, port = address.rpartition(":")
    try:
        host = socket.gethostbyname(host)
    except OSError:  # compared as written
        pass
    return host, port


def _current_address() -> str | None:
    """The GCS address this process's Ray connection uses, or ``None`` when not connected."""
    if "ray" not in sys.modules:
        return None
    import ray

    if not ray.is_initialized():
        return None
    return str(ray.get_runtime_context().gcs_address)


def check_cluster(address: str | None, who: str) -> None:
    """Refuse ``address`` if this process is connected to another Ray cluster.

    Raises
    ------
    ConfigError
        Naming both addresses: Ray connects a process to one cluster only.
    """
    current = _current_address()
    if address is None or current is None or _endpoint(address) == _endpoint(current):
        return
    raise ConfigError(
        f"{who} is pointed at the Ray cluster at {address}, but this process is connected to the one "
        f"at {current}, and Ray connects a process to one cluster only; run it in its own process, "
        f"or give it address={current!r}"
    )


def acquire_ray(config: Config, who: str) -> None:
    """Use this process's Ray connection (made now if there is none); pair with :func:`release_ray`."""
    from insitu.comm import connect_ray

    address = config.require_address()
    with _RAY_LOCK:
        check_cluster(address, who)
        made = connect_ray(config)
        if _STATE.users == 0:
            _STATE.made = made
        _STATE.users += 1


def release_ray() -> None:
    """Stop using the connection; the last user ends it if insitu made it."""
    with _RAY_LOCK:
        _STATE.users = max(0, _STATE.users - 1)
        if _STATE.users or not _STATE.made:
            return
        from insitu.comm import shutdown_ray

        shutdown_ray()
        _STATE.made = False


# -- SIGTERM while an analytics runs ---------------------------------------------------------
class SigtermRequest:
    """Whether a SIGTERM arrived while :func:`sigterm_between_steps` was in force."""

    def __init__(self) -> None:
        self.requested = False

    def check(self) -> None:
        """At a safe point (between steps): end the run with ``SystemExit(128 + SIGTERM)`` if asked."""
        if self.requested:
            raise SystemExit(128 + signal.SIGTERM)


@contextlib.contextmanager
def sigterm_between_steps() -> Iterator[SigtermRequest]:
    """While an ``Analytics`` runs in the main thread of a process that left SIGTERM at its default,
    a SIGTERM ends the run at the next step boundary instead of wherever the program is.

    The analytics then detaches from the run (the simulation goes on under its policy) and
    ``run()`` raises ``SystemExit(143)``, so the program's ``with``/``finally`` blocks close
    its files. A second SIGTERM ends the process at once, as the default would. A program
    that set its own SIGTERM handler keeps it, untouched.
    """
    request = SigtermRequest()
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield request
        return

    def on_sigterm(signum: int, _frame: object) -> None:
        if request.requested:  # the second one: as by default
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        request.requested = True

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield request
    finally:
        if signal.getsignal(signal.SIGTERM) is on_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


# -- the scheduler router -----------------------------------------------------------------------
class _Found(Exception):
    """Stops the scan at the first chunk of a live route."""

    def __init__(self, route: Route) -> None:
        super().__init__(route.name)
        self.route = route


class _Sink:
    def write(self, data: bytes) -> int:
        return len(data)


class _LeafScanner(cloudpickle.Pickler):
    """Walks a graph as pickling does (also into fused tasks) and stops at the first owned chunk."""

    def __init__(self, routes: list[Route]) -> None:
        super().__init__(_Sink(), protocol=pickle.HIGHEST_PROTOCOL)  # type: ignore[arg-type]
        self.routes = routes
        self.refs = 0

    def persistent_id(self, obj: Any) -> int | None:  # noqa: D102 - pickle hook
        import ray

        if isinstance(obj, ray.ObjectRef):
            self.refs += 1
            key = obj.hex()
            for route in self.routes:
                if route.owns(key):
                    raise _Found(route)
            return 0
        if isinstance(obj, np.ndarray):
            return 0  # data, never a leaf: not serialized
        return None


def _owner(dsk: Any, routes: list[Route]) -> Route | None:
    graph = dsk if isinstance(dsk, Mapping) else dsk.__dask_graph__()
    try:
        _LeafScanner(routes).dump(list(graph.values()))
    except _Found as found:
        return found.route
    except Exception as exc:  # noqa: BLE001 - an unpicklable task: not one of ours (ours are pickled)
        log.debug("scheduler router: graph not scanned (%s: %s); default scheduler", type(exc).__name__, exc)
    return None


def _resolve(scheduler: Any) -> Get:
    """The ``get`` function of a configured scheduler (a ``get`` or one of Dask's local names)."""
    import importlib

    if callable(scheduler):
        return scheduler  # type: ignore[no-any-return]
    if scheduler is None:
        scheduler = "threads"
    module = _NAMED.get(str(scheduler).lower())
    if module is None:
        log.warning(
            "Dask's scheduler was set to %r before insitu's router was installed; graphs without insitu "
            "chunks run on Dask's threaded scheduler (pass scheduler= to compute() to choose)",
            scheduler,
        )
        module = "dask.threaded"
    mod = importlib.import_module(module)
    return mod.get_sync if module == "dask.local" else mod.get  # type: ignore[no-any-return]


def route_graph(dsk: Any, keys: Any, **kwargs: Any) -> Any:
    """Dask scheduler ``get``: run a graph on the scheduler of the route owning its leaves.

    Graphs without a chunk of a live :class:`Route` run on the scheduler configured before
    the router was installed (Dask's threaded scheduler if none).
    """
    with _LOCK:
        routes = list(_STATE.routes)
        fallback = _STATE.fallback
    route = _owner(dsk, routes) if routes else None
    if route is not None:
        return route.get(dsk, keys, **kwargs)
    return (fallback or _resolve(None))(dsk, keys, **kwargs)


def install_router() -> None:
    """Make :func:`route_graph` Dask's default scheduler, once per process.

    Later settings win: a ``dask.config.set(scheduler=...)`` made afterwards, or a
    ``scheduler=`` passed to ``compute``, is used instead of the router.
    """
    with _LOCK:
        if _STATE.installed:
            return
        before = dask.config.get("scheduler", None)
        _STATE.fallback = _resolve(before)
        dask.config.set(scheduler=route_graph)
        _STATE.installed = True


def register(route: Route) -> Callable[[], None]:
    """Route the graphs holding ``route``'s chunks to its scheduler; returns the unregistering call."""
    install_router()
    with _LOCK:
        _STATE.routes.append(route)

    def unregister() -> None:
        with _LOCK:
            if route in _STATE.routes:
                _STATE.routes.remove(route)

    return unregister
