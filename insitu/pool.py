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

Examples
--------
>>> spec = SliceSpec(hosts=2, cpus_per_host=1)
>>> spec.bundle("insitu_slice_a")
{'insitu_slice_a': 1.0, 'CPU': 1.0}
>>> slice_names([{"Alive": True, "Resources": {"insitu_slice_a": 1.0}},
...              {"Alive": True, "Resources": {"insitu_slice_a": 1.0}},
...              {"Alive": True, "Resources": {"insitu_slice_b": 1.0}}], spec)
['insitu_slice_a']
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import itertools
import logging
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from insitu.config import Config
from insitu.dispatch import HEAD_RESOURCE, ActorProxy, Dispatcher
from insitu.errors import ConfigError, InsufficientSlicesError, SliceLostError, StepTimeoutError, TaskCancelledError

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

Probe = Callable[[], bool]
"""A preemption probe: runs on a host, returns True when the host is about to go away."""


class DeviceKind(enum.StrEnum):
    """What a host computes on."""

    GPU = "GPU"
    TPU = "TPU"
    CPU = "CPU"


class Grouping(enum.StrEnum):
    """How :meth:`SlicePool.run` returns per-host results."""

    SLICE = "slice"
    """``{slice_id: [host 0 result, host 1 result, ...]}``."""
    FLAT = "flat"
    """One list, slices in pool order, hosts in index order."""


@dataclass(frozen=True)
class SliceSpec:
    """The shape of every slice of a pool.

    Parameters
    ----------
    hosts
        Hosts per slice (bundles per placement group).
    prefix
        Custom-resource prefix naming slices: a node carrying ``<prefix>a`` is a host of slice ``a``.
    cpus_per_host, gpus_per_host, tpus_per_host
        Reserved in every bundle and given to the host actor.
    """

    hosts: int
    prefix: str = "insitu_slice_"
    cpus_per_host: float = 1.0
    gpus_per_host: float = 0.0
    tpus_per_host: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.hosts, int) or self.hosts < 1:
            raise ConfigError(f"a slice needs hosts >= 1; got {self.hosts!r}")
        if not self.prefix:
            raise ConfigError("the slice resource prefix must not be empty (e.g. 'insitu_slice_')")
        for name in ("cpus_per_host", "gpus_per_host", "tpus_per_host"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0; got {getattr(self, name)!r}")

    def bundle(self, resource: str) -> dict[str, float]:
        """One host's bundle: the slice's resource plus the per-host devices."""
        out = {resource: 1.0}
        for key, amount in (("CPU", self.cpus_per_host), ("GPU", self.gpus_per_host), ("TPU", self.tpus_per_host)):
            if amount:
                out[key] = float(amount)
        return out


@dataclass(frozen=True)
class HostEnv:
    """What a function run on a pool host learns about where it runs.

    ``state`` is a per-host dictionary that lives as long as the host actor: keep a model, a
    process group or a cache there between calls.
    """

    slice_id: str
    slice_name: str
    host_index: int
    hosts: int
    node_id: str
    node_ip: str
    device_kind: DeviceKind
    devices: tuple[str, ...]
    state: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def device_count(self) -> int:
        """Accelerators assigned to this host (0 on a CPU host)."""
        return len(self.devices)


@dataclass(frozen=True)
class SliceInfo:
    """One reserved slice: its id (new for every reservation), resource name and hosts."""

    slice_id: str
    name: str
    node_ids: tuple[str, ...]
    node_ips: tuple[str, ...]


def slice_names(nodes: Iterable[Mapping[str, Any]], spec: SliceSpec) -> list[str]:
    """Slice resources carried by at least ``spec.hosts`` alive nodes (from ``ray.nodes()``)."""
    count: dict[str, int] = {}
    for n in nodes:
        if not n.get("Alive"):
            continue
        for key, amount in n.get("Resources", {}).items():
            if key.startswith(spec.prefix) and amount >= 1:
                count[key] = count.get(key, 0) + 1
    return sorted(k for k, c in count.items() if c >= spec.hosts)


def request_slices(spec: SliceSpec, count: int, resources: Sequence[str] = ()) -> list[dict[str, float]]:
    """Ask an autoscaler for ``count`` slices (``ray.autoscaler.sdk.request_resources``); returns the bundles.

    ``resources`` names the slices wanted; without names the bundles ask for the devices only
    (the autoscaler's node types then decide the slice resource).
    """
    from ray.autoscaler.sdk import request_resources

    names = list(resources) or [""] * count
    bundles = []
    for name in names[:count]:
        b = spec.bundle(name) if name else {k: v for k, v in spec.bundle("x").items() if k != "x"}
        bundles += [b] * spec.hosts
    request_resources(bundles=bundles)
    return bundles


def metadata_probe(url: str, headers: Mapping[str, str] | None = None, expect: str = "TRUE",
                   timeout: float = 2.0) -> Probe:  # fmt: skip
    """A probe reading a cloud metadata endpoint (e.g. GCE's ``.../instance/preempted``).

    Preempted when the body, stripped, equals ``expect``; an unreachable endpoint counts as not
    preempted (the health check's own deadline catches a dead host).
    """

    def probe() -> bool:
        req = urllib.request.Request(url, headers=dict(headers or {}))
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - the site configures the URL
                return resp.read().decode(errors="replace").strip() == expect
        except OSError:
            return False

    return probe


def file_probe(path: str | Path) -> Probe:
    """A probe for a SLURM preemption signal: the batch script's trap creates ``path``.

    For example ``#SBATCH --signal=B:USR2@120`` and ``trap 'touch "$INSITU_PREEMPT_FLAG"' USR2``
    on a shared file system.
    """
    flag = Path(path)
    return flag.exists


# -- actors ---------------------------------------------------------------------------------------
class _Host:
    """One host of a slice: runs the pool's functions (async: a call can be cancelled)."""

    def __init__(self, slice_id: str, slice_name: str, index: int, hosts: int, probe: Probe | None) -> None:
        import ray

        ctx = ray.get_runtime_context()
        ids = ctx.get_accelerator_ids()
        kind = DeviceKind.GPU if ids.get("GPU") else DeviceKind.TPU if ids.get("TPU") else DeviceKind.CPU
        devices = tuple(str(d) for d in ids.get(kind.value, [])) if kind != DeviceKind.CPU else ()
        ip = next((n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == ctx.get_node_id()), "")
        self._env = HostEnv(slice_id, slice_name, index, hosts, ctx.get_node_id(), ip, kind, devices)
        self._probe = probe
        self._busy = 0
        self._lock = threading.Lock()

    def _tracked(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        with self._lock:
            self._busy += 1
        try:
            return fn(self._env, *args, **kwargs)
        finally:
            with self._lock:
                self._busy -= 1

    async def run(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if inspect.iscoroutinefunction(fn):
            return await fn(self._env, *args, **kwargs)
        return await asyncio.to_thread(self._tracked, fn, args, kwargs)

    async def where(self) -> tuple[str, str]:
        return self._env.node_id, self._env.node_ip

    async def busy(self) -> int:
        return self._busy

    async def health(self) -> str:
        """'' when healthy, else why not."""
        if self._probe is not None:
            preempted = await asyncio.to_thread(self._probe)
            if preempted:
                return "preemption probe fired"
        return ""


class _Slice:
    """Owns one host actor per bundle of its placement group; fans work out to them."""

    def __init__(self, slice_id: str, name: str, pg: Any, spec: SliceSpec, probe: Probe | None) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._hosts = []
        for i in range(spec.hosts):
            strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)
            opts: dict[str, Any] = {"scheduling_strategy": strategy, "num_cpus": spec.cpus_per_host,
                                    "resources": {name: 1.0}, "max_concurrency": 64}  # fmt: skip
            if spec.gpus_per_host:
                opts["num_gpus"] = spec.gpus_per_host
            if spec.tpus_per_host:
                opts["resources"]["TPU"] = spec.tpus_per_host
            self._hosts.append(ray.remote(_Host).options(**opts).remote(slice_id, name, i, spec.hosts, probe))
        self._calls: dict[int, list[Any]] = {}

    async def start(self) -> list[tuple[str, str]]:
        return list(await asyncio.gather(*(h.where.remote() for h in self._hosts)))

    async def run(self, call_id: int, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> list:
        refs = [h.run.remote(fn, args, kwargs) for h in self._hosts]
        self._calls[call_id] = refs
        try:
            return list(await asyncio.gather(*refs))
        finally:
            self._calls.pop(call_id, None)

    async def cancel(self, call_id: int, deadline: float) -> list[int]:
        """Cancel a call on every host; the hosts still busy after ``deadline`` s."""
        import ray

        for ref in self._calls.get(call_id, []):
            ray.cancel(ref)
        end = time.monotonic() + deadline
        stuck = list(range(len(self._hosts)))
        while stuck and time.monotonic() < end:
            busy = await asyncio.gather(*(self._hosts[i].busy.remote() for i in stuck), return_exceptions=True)
            stuck = [i for i, b in zip(stuck, busy, strict=True) if not (b == 0)]
            if stuck:
                await asyncio.sleep(0.2)
        return stuck

    async def running(self) -> int:
        return len(self._calls)

    async def health(self, deadline: float) -> list[str]:
        """Per host: '' when healthy, else why not (dead, unresponsive, probe)."""

        async def one(h: Any) -> str:
            try:
                return str(await asyncio.wait_for(h.health.remote(), deadline))
            except TimeoutError:
                return f"no answer within {deadline:.0f} s"
            except Exception as exc:  # a dead host actor: RayActorError
                return f"{type(exc).__name__}"

        return list(await asyncio.gather(*(one(h) for h in self._hosts)))

    def hosts(self) -> list[Any]:
        return list(self._hosts)


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
                 autoscaler: bool = False, config: Config | None = None) -> None:  # fmt: skip
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
                        self._remove(slice_id, "scaled down")
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
        for name, pg in made:
            self._start_slice(name, pg)
        return True

    def _start_slice(self, name: str, pg: Any) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        slice_id = f"{name}#{next(self._ids)}"
        options = {"resources": {HEAD_RESOURCE: 0.001}, "num_cpus": 0, "max_concurrency": 1000}
        actor = self._dispatcher.actor(_Slice, slice_id, name, pg, self.spec, self.probe, options=options)
        try:
            where = actor.call("start").get(self.config.pool_ready_deadline)
        except (ray.exceptions.RayError, StepTimeoutError):
            actor.kill()
            remove_placement_group(pg)
            raise
        info = SliceInfo(slice_id, name, tuple(w[0] for w in where), tuple(w[1] for w in where))
        self._slices[slice_id] = _Reserved(info, pg, actor)
        log.info("pool %s: slice %s on %s", self.name, slice_id, ", ".join(info.node_ips))

    def _remove(self, slice_id: str, why: str) -> None:
        from ray.util.placement_group import remove_placement_group

        reserved = self._slices.pop(slice_id, None)
        if reserved is None:
            return
        log.info("pool %s: removing slice %s (%s)", self.name, slice_id, why)
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
               **kwargs: Any) -> PoolCall:  # fmt: skip
        """Start ``fn(env, *args, **kwargs)`` on every host of every slice; ``env`` is a :class:`HostEnv`."""
        if not self._slices:
            raise InsufficientSlicesError(f"pool {self.name!r} has no slice: call scale() first")
        call_id = next(self._calls)
        with self._lock:
            parts = {sid: r.actor.call("run", call_id, fn, args, kwargs) for sid, r in self._slices.items()}
        return PoolCall(self, call_id, parts, Grouping(grouping))

    def run(self, fn: Callable[..., Any], *args: Any, grouping: Grouping = Grouping.SLICE,
            timeout: float | None = None, **kwargs: Any) -> dict[str, list[Any]] | list[Any]:  # fmt: skip
        """:meth:`submit` and wait for the results."""
        return self.submit(fn, *args, grouping=grouping, **kwargs).result(timeout)

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
                self._remove(slice_id, "drained")
        self._dispatcher.close()

    def close(self) -> None:
        """Forced drain."""
        self.drain(graceful=False)

    def __enter__(self) -> SlicePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.drain(graceful=False)
