"""Accelerator slice pools on Ray placement groups.

A *slice* is a group of hosts that must be used together (a multi-host TPU slice, a set of
GPU nodes forming one ``torch.distributed`` group). Every host of a slice carries the slice's
own custom resource, ``<prefix><name>`` (TPU hosts carry their pod name the same way; the
launch scripts give GPU or emulated CPU slices such a resource). A :class:`SlicePool`:

* reserves each slice as one placement group, one bundle per host, ``STRICT_SPREAD``, every
  bundle asking for the slice's resource (and its CPUs/GPUs/TPUs);
* gives each slice a *slice actor* on the head that owns one *host actor* per bundle and fans
  work out to them (created through :class:`insitu.dispatch.Dispatcher`, so a pool driven from a
  tunneled node works: the head reaches every host);
* scales to the largest feasible of several allowed sizes (a size is feasible when every new
  placement group is ready within ``pool_ready_deadline``; otherwise the new ones are removed);
* checks health with deadlines (host actors answer; an optional preemption probe runs on
  every host) and replaces a slice with any bad host *whole*, under a new slice id; work that
  ran on it fails with :class:`~insitu.errors.SliceLostError`;
* runs a function on every host with a :class:`HostEnv` (host index, slice, devices), cancels
  it (:class:`~insitu.errors.TaskCancelledError`; a slice whose hosts do not stop within
  ``pool_cancel_deadline`` is replaced), and drains (graceful, then forced), leaving no actor
  and no placement group.

The pieces live in :mod:`insitu.slices` (specs, host environment, discovery, probes) and
:mod:`insitu.pool_actors` (the slice and host actors); their public names are re-exported here.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from insitu.bypass import Bypass, for_call
from insitu.config import Config
from insitu.dispatch import HEAD_RESOURCE, ActorProxy, Dispatcher
from insitu.errors import ConfigError, InsufficientSlicesError, SliceLostError, StepTimeoutError, TaskCancelledError
from insitu.pool_actors import _Slice
from insitu.slices import (
    DeviceKind,
    Grouping,
    HostEnv,
    Probe,
    SliceInfo,
    SliceSpec,
    file_probe,
    metadata_probe,
    request_slices,
    slice_names,
)

__all__ = [
    "DeviceKind",
    "Grouping",
    "HostEnv",
    "PoolCall",
    "SliceInfo",
    "SlicePool",
    "SliceSpec",
    "file_probe",
    "metadata_probe",
    "request_slices",
    "slice_names",
]

log = logging.getLogger(__name__)

_LONGEST_CALL = 3600.0  # seconds a pool call may run by default (plus pool_ready_deadline)


# -- the pool -------------------------------------------------------------------------------------
@dataclass
class _Reserved:
    info: SliceInfo
    pg: Any
    actor: ActorProxy


@dataclass
class PoolCall:
    """Work running on every host of the pool's slices; :meth:`result` waits for it."""

    pool: SlicePool
    call_id: int
    parts: dict[str, Any]  # slice id -> Dispatched
    grouping: Grouping
    cancelled: bool = False

    def result(self, timeout: float | None = None) -> dict[str, list[Any]] | list[Any]:
        """Per-host results, grouped as asked.

        Raises
        ------
        SliceLostError
            A slice lost a host while the work ran (the pool replaces it).
        TaskCancelledError
            :meth:`cancel` was called.
        StepTimeoutError
            Not done within ``timeout`` (default ``pool_ready_deadline`` plus an hour).
        """
        import ray

        wait = timeout if timeout is not None else _LONGEST_CALL + self.pool.config.pool_ready_deadline
        end = time.monotonic() + wait
        out: dict[str, list[Any]] = {}
        for slice_id, part in self.parts.items():
            try:
                out[slice_id] = part.get(max(0.0, end - time.monotonic()))
            except StepTimeoutError:  # cancelled on every host
                raise StepTimeoutError(f"slice {slice_id}: call {self.call_id} not done within {wait:.0f} s") from None
            except (ray.exceptions.TaskCancelledError, ray.exceptions.RayError) as exc:
                if self.cancelled:
                    raise TaskCancelledError(f"call {self.call_id} on slice {slice_id} was cancelled") from None
                if isinstance(exc, ray.exceptions.RayActorError) or slice_id in self.pool.lost:
                    self.pool.lost.add(slice_id)
                    raise SliceLostError(
                        f"slice {slice_id} lost a host while call {self.call_id} ran on it: {type(exc).__name__}"
                    ) from exc
                raise
        if self.grouping == Grouping.SLICE:
            return out
        return [r for part in out.values() for r in part]

    def cancel(self) -> list[str]:
        """Interrupt the call on every host; slices whose hosts do not stop in time are replaced.

        Returns the ids of the replaced slices. :meth:`result` then raises ``TaskCancelledError``.
        """
        import ray

        self.cancelled = True
        deadline = self.pool.config.pool_cancel_deadline
        stuck: list[str] = []
        for slice_id in self.parts:
            reserved = self.pool.reserved(slice_id)
            if reserved is None:
                continue
            try:
                hosts = reserved.actor.call("cancel", self.call_id, deadline).get(deadline + 30)
            except (ray.exceptions.RayError, StepTimeoutError):
                hosts = ["slice actor gone"]
            if hosts:
                log.warning(
                    "slice %s: hosts %s still busy %.0f s after cancel; replacing it", slice_id, hosts, deadline
                )
                stuck.append(slice_id)
        for slice_id in stuck:
            self.pool.replace(slice_id, "cancelled work did not stop")
        return stuck


class SlicePool:
    """A pool of accelerator slices on Ray placement groups.

    Parameters
    ----------
    spec
        Shape of every slice.
    sizes
        Allowed pool sizes (number of slices); :meth:`scale` picks the largest feasible.
    name
        Names the pool's relay (``Dispatcher``) and its log lines.
    probe
        Optional preemption probe run on every host at each health check
        (:func:`metadata_probe`, :func:`file_probe` or your own).
    autoscaler
        Ask an autoscaler for missing slices (:func:`request_slices`) before waiting.
    config
        Deadlines (``pool_*`` fields, ``INSITU_POOL_*``), read when used.
    on_shutdown
        ``fn(env)`` run on every host of a slice before its hosts are killed when the pool scales
        down or drains gracefully (save a checkpoint, leave a process group); not run for a lost,
        unhealthy or forcibly drained slice.
    shutdown_deadline
        Seconds ``on_shutdown`` may take on a slice (default ``pool_drain_deadline``); the hosts are
        killed when it passes.
    bypass
        Calls to bypass (:class:`insitu.Bypass`, by ``fn.__qualname__`` and ``bypass_tag``); default:
        the bypass in force where the pool is used, if any.

    Examples
    --------
    >>> pool = SlicePool(SliceSpec(hosts=2), sizes=[2, 1])  # doctest: +SKIP
    >>> pool.scale()  # doctest: +SKIP
    2
    >>> pool.run(lambda env: (env.slice_name, env.host_index))  # doctest: +SKIP
    {'insitu_slice_a#1': [('insitu_slice_a', 0), ('insitu_slice_a', 1)], ...}
    >>> pool.drain()  # doctest: +SKIP
    """

    def __init__(self, spec: SliceSpec, sizes: Sequence[int], *, name: str = "pool", probe: Probe | None = None,
                 autoscaler: bool = False, config: Config | None = None,
                 on_shutdown: Callable[[HostEnv], Any] | None = None,
                 shutdown_deadline: float | None = None, bypass: Bypass | None = None) -> None:  # fmt: skip
        allowed = sorted({int(s) for s in sizes}, reverse=True)
        if not allowed or allowed[-1] < 0:
            raise ConfigError(f"allowed pool sizes must be a non-empty list of counts >= 0; got {list(sizes)!r}")
        self.spec = spec
        self.sizes = allowed
        self.name = name
        self.probe = probe
        self.autoscaler = autoscaler
        self.config = config or Config.from_env()
        self.lost: set[str] = set()
        self.on_shutdown = on_shutdown
        self.bypass = bypass
        self.shutdown_deadline = float(self.config.pool_drain_deadline if shutdown_deadline is None
                                       else shutdown_deadline)  # fmt: skip
        if self.shutdown_deadline < 0:
            raise ConfigError(f"shutdown_deadline must be >= 0 seconds; got {shutdown_deadline!r}")
        self._dispatcher = Dispatcher(f"pool-{name}", autoscaler=autoscaler, namespace=self.config.namespace,
                                      deadline=_LONGEST_CALL + self.config.pool_ready_deadline)  # fmt: skip
        self._slices: dict[str, _Reserved] = {}
        self._ids = itertools.count(1)
        self._calls = itertools.count(1)
        self._lock = threading.RLock()
        self._monitor: threading.Thread | None = None
        self._stop = threading.Event()

    # -- reading ------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Number of slices reserved now."""
        return len(self._slices)

    def slices(self) -> list[SliceInfo]:
        """The reserved slices, oldest first."""
        with self._lock:
            return [r.info for r in self._slices.values()]

    def reserved(self, slice_id: str) -> _Reserved | None:
        """Internal record of a slice (None once removed)."""
        return self._slices.get(slice_id)

    # -- sizing -------------------------------------------------------------------------------
    def scale(self, sizes: Sequence[int] | None = None) -> int:
        """Scale to the largest feasible allowed size; returns it.

        Raises
        ------
        InsufficientSlicesError
            No allowed size is feasible (every attempt's new placement groups were removed).
        """
        allowed = sorted({int(s) for s in sizes}, reverse=True) if sizes is not None else self.sizes
        tried = []
        with self._lock:
            for n in allowed:
                if n <= self.size:
                    for slice_id in list(self._slices)[n:]:
                        self._remove(slice_id, "scaled down", shutdown=True)
                    return n
                if self._grow(n - self.size):
                    return n
                tried.append(n)
        raise InsufficientSlicesError(
            f"pool {self.name!r}: none of the sizes {tried} is feasible: every slice needs {self.spec.hosts} hosts "
            f"with bundle {self.spec.bundle(self.spec.prefix + '<name>')}, placed within "
            f"{self.config.pool_ready_deadline:.0f} s; free slices now: {self._free_names()}"
        )

    def _free_names(self) -> list[str]:
        import ray

        used = {r.info.name for r in self._slices.values()}
        return [n for n in slice_names(ray.nodes(), self.spec) if n not in used]

    def _grow(self, count: int) -> bool:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        deadline = self.config.pool_ready_deadline
        end = time.monotonic() + deadline
        names = self._free_names()
        if self.autoscaler and len(names) < count:
            request_slices(self.spec, count - len(names))
            while len(names) < count and time.monotonic() < end:
                time.sleep(1.0)
                names = self._free_names()
        if len(names) < count:
            log.info("pool %s: %d slice(s) wanted, %d free (%s)", self.name, count, len(names), names)
            return False
        made = []
        for name in names[:count]:
            pg = placement_group([self.spec.bundle(name)] * self.spec.hosts, strategy="STRICT_SPREAD",
                                 name=f"insitu-{self.name}-{name}")  # fmt: skip
            made.append((name, pg))
        ready, _ = ray.wait([pg.ready() for _, pg in made], num_returns=len(made),
                            timeout=max(0.0, end - time.monotonic()))  # fmt: skip
        if len(ready) < len(made):
            log.info("pool %s: %d of %d placement group(s) ready within %.0f s; removing them", self.name,
                     len(ready), len(made), deadline)  # fmt: skip
            for _, pg in made:
                remove_placement_group(pg)
            return False
        started: list[str] = []
        try:  # all or nothing: a start that fails removes every slice and placement group of this attempt
            for name, pg in made:
                started.append(self._start_slice(name, pg))
        except BaseException:
            failed = len(started)
            log.warning("pool %s: starting slice %s failed; removing the %d placement group(s) of this start",
                        self.name, made[failed][0], len(made))  # fmt: skip
            for slice_id in started:
                self._remove(slice_id, "a slice of the same start failed")
            for _, pg in made[failed:]:
                remove_placement_group(pg)
            raise
        return True

    def _start_slice(self, name: str, pg: Any) -> str:
        """Start the slice actor of a ready placement group; the new slice id. On failure nothing is left
        but the placement group (the caller removes it)."""
        slice_id = f"{name}#{next(self._ids)}"
        options = {"resources": {HEAD_RESOURCE: 0.001}, "num_cpus": 0, "max_concurrency": 1000}
        actor = self._dispatcher.actor(_Slice, slice_id, name, pg, self.spec, self.probe, options=options)
        try:
            where = actor.call("start").get(self.config.pool_ready_deadline)
        except BaseException:
            actor.kill()
            raise
        info = SliceInfo(slice_id, name, tuple(w[0] for w in where), tuple(w[1] for w in where))
        self._slices[slice_id] = _Reserved(info, pg, actor)
        log.info("pool %s: slice %s on %s", self.name, slice_id, ", ".join(info.node_ips))
        return slice_id

    def _remove(self, slice_id: str, why: str, shutdown: bool = False) -> None:
        """Kill a slice's actors and remove its placement group; with ``shutdown``, run the user's
        shutdown hook on every host first (at most ``shutdown_deadline`` seconds)."""
        import ray
        from ray.util.placement_group import remove_placement_group

        reserved = self._slices.pop(slice_id, None)
        if reserved is None:
            return
        log.info("pool %s: removing slice %s (%s)", self.name, slice_id, why)
        if shutdown and self.on_shutdown is not None:
            try:
                late = reserved.actor.call("shutdown", self.on_shutdown, self.shutdown_deadline).get(
                    self.shutdown_deadline + 30
                )
            except (ray.exceptions.RayError, StepTimeoutError) as exc:
                late = [f"slice actor: {type(exc).__name__}"]
            if any(late):
                log.warning("pool %s: shutdown hook on slice %s: %s; killing its hosts", self.name, slice_id,
                            "; ".join(f"host {i}: {why}" for i, why in enumerate(late) if why))  # fmt: skip
        reserved.actor.kill()  # its host actors are owned by it and end with it
        remove_placement_group(reserved.pg)

    def replace(self, slice_id: str, why: str) -> str | None:
        """Remove a slice whole and reserve a new one in its place; the new slice id, or None if none fits."""
        with self._lock:
            if slice_id not in self._slices:
                return None
            self.lost.add(slice_id)
            self._remove(slice_id, why)
            before = set(self._slices)
            try:
                grown = self._grow(1)
            except Exception:  # the replacement failed to start: the pool is one slice short
                log.exception("pool %s: replacing %s failed", self.name, slice_id)
                return None
            if not grown:
                log.error("pool %s: no slice to replace %s; the pool is at %d", self.name, slice_id, self.size)
                return None
            return next(iter(set(self._slices) - before))

    # -- health -------------------------------------------------------------------------------
    def check_health(self) -> dict[str, str]:
        """Check every slice now; replace the bad ones. Returns ``{old slice id: reason}``."""
        import ray

        deadline = self.config.pool_health_deadline
        bad: dict[str, str] = {}
        for slice_id, reserved in list(self._slices.items()):
            try:
                answers = reserved.actor.call("health", deadline).get(deadline + 10)
            except (ray.exceptions.RayError, StepTimeoutError) as exc:
                bad[slice_id] = f"slice actor: {type(exc).__name__}"
                continue
            problems = [f"host {i}: {a}" for i, a in enumerate(answers) if a]
            if problems:
                bad[slice_id] = "; ".join(problems)
        for slice_id, why in bad.items():
            log.warning("pool %s: slice %s unhealthy (%s)", self.name, slice_id, why)
            self.replace(slice_id, why)
        return bad

    def start_monitor(self) -> None:
        """Check health every ``pool_health_interval`` seconds in a background thread until :meth:`drain`."""
        if self._monitor is not None:
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(self.config.pool_health_interval):
                try:
                    self.check_health()
                except Exception:  # keep monitoring; the next round tries again
                    log.exception("pool %s: health check failed", self.name)

        self._monitor = threading.Thread(target=loop, name=f"insitu-pool-{self.name}", daemon=True)
        self._monitor.start()

    # -- work ---------------------------------------------------------------------------------
    def submit(self, fn: Callable[..., Any], *args: Any, grouping: Grouping = Grouping.SLICE,
               bypass_tag: str = "", **kwargs: Any) -> PoolCall:  # fmt: skip
        """Start ``fn(env, *args, **kwargs)`` on every host of every slice; ``env`` is a :class:`HostEnv`.

        Under a :class:`insitu.Bypass` (``bypass=`` of the pool, else the one in force) that bypasses
        ``fn`` for ``bypass_tag``, every host runs its stub instead, on the same slices.
        """
        fn = for_call(self.bypass, fn, bypass_tag, args, kwargs)
        if not self._slices:
            raise InsufficientSlicesError(f"pool {self.name!r} has no slice: call scale() first")
        call_id = next(self._calls)
        with self._lock:
            parts = {sid: r.actor.call("run", call_id, fn, args, kwargs) for sid, r in self._slices.items()}
        return PoolCall(self, call_id, parts, Grouping(grouping))

    def run(self, fn: Callable[..., Any], *args: Any, grouping: Grouping = Grouping.SLICE, timeout: float | None = None,
            bypass_tag: str = "", **kwargs: Any) -> dict[str, list[Any]] | list[Any]:  # fmt: skip
        """:meth:`submit` and wait for the results."""
        return self.submit(fn, *args, grouping=grouping, bypass_tag=bypass_tag, **kwargs).result(timeout)

    # -- ending -------------------------------------------------------------------------------
    def drain(self, graceful: bool = True) -> None:
        """Remove every slice: wait up to ``pool_drain_deadline`` for running work (if graceful), then
        end it. No host actor, slice actor or placement group of the pool is left."""
        import ray

        self._stop.set()
        if self._monitor is not None:
            self._monitor.join(timeout=self.config.pool_health_deadline + 15)
            self._monitor = None
        with self._lock:
            if graceful:
                end = time.monotonic() + self.config.pool_drain_deadline
                for slice_id, reserved in list(self._slices.items()):
                    while time.monotonic() < end:
                        try:
                            if reserved.actor.call("running").get(10) == 0:
                                break
                        except (ray.exceptions.RayError, StepTimeoutError):
                            break
                        time.sleep(0.2)
                    else:
                        log.warning("pool %s: work still running on %s after the drain deadline", self.name, slice_id)
            for slice_id in list(self._slices):
                self._remove(slice_id, "drained", shutdown=graceful)
        self._dispatcher.close()

    def close(self) -> None:
        """Forced drain."""
        self.drain(graceful=False)

    def __enter__(self) -> SlicePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.drain(graceful=False)
