"""The actors of a slice pool: one slice actor per slice (on the head), one host actor per host.

Internal to :mod:`insitu.pool` (their Ray class names, ``_Slice`` and ``_Host``, are what the
state API shows). The slice actor owns its host actors: killing it ends them.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import Callable
from typing import Any

from insitu.slices import DeviceKind, HostEnv, Probe, SliceSpec

__all__: list[str] = []  # internal: imported by insitu.pool only


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

        self._hosts: list[Any] = []
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

    async def shutdown(self, fn: Callable[..., Any], deadline: float) -> list[str]:
        """Run ``fn(env)`` on every host for at most ``deadline`` s; per host '' or why it did not finish."""

        async def one(h: Any) -> str:
            try:
                await asyncio.wait_for(h.run.remote(fn, (), {}), deadline)
            except TimeoutError:
                return f"not done within {deadline:.0f} s"
            except Exception as exc:  # the hook raised, or the host is gone: reported, the slice ends anyway
                return f"{type(exc).__name__}: {exc}"[:300]
            return ""

        return list(await asyncio.gather(*(one(h) for h in self._hosts)))

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
