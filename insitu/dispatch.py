"""Tunnel-aware dispatch: relay work through the head when the caller may not reach where it lands.

In Ray the submitter of a task owns it and talks to the target node directly. A node
reachable only through a reverse tunnel to the head (a *remote* node) cannot talk to the
LAN nodes and they cannot talk to it; such work would wait in PENDING_NODE_ASSIGNMENT
forever. The head reaches every node, so work whose landing nodes are not all provably
reachable from the caller is submitted by a relay actor pinned to the head.

The relay belongs to the :class:`Dispatcher` that made it (a named, non-detached actor owned
by the caller's process, ``insitu-relay-<run>-<tag>-<n>``): the actors it creates and the
tasks it submits are its own, so when the caller's process dies (even by SIGKILL) Ray ends
the relay and, with it, all of them; :meth:`Dispatcher.close` ends them when the run ends.
Every wait inside the relay has the dispatcher's ``deadline``; a caller whose
:meth:`Dispatched.get` times out cancels the relayed work.

Roles come from the live node table: ``head`` (Ray's head resource), ``remote`` (the
custom resource :data:`REMOTE_RESOURCE` that the launch scripts give tunneled nodes; the
variable ``INSITU_NODE_ROLE=remote`` in the raylet's environment is the fallback for
nodes started by hand, read by :func:`node_role_from_env`), ``lan`` (the rest).

The reachability rule itself is pure and lives in :mod:`insitu.reach`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from insitu.bypass import Bypass, for_call
from insitu.errors import ConfigError, RelayLostError, StepTimeoutError, UnreachableRefError
from insitu.reach import (
    HEAD_RESOURCE,
    REMOTE_RESOURCE,
    NodeRole,
    NodeView,
    Placement,
    Route,
    Snapshot,
    decide,
    node_role_from_env,
    reachable,
    snapshot_from_ray,
)

__all__ = [
    "HEAD_RESOURCE",
    "ByRef",
    "REMOTE_RESOURCE",
    "Dispatcher",
    "NodeRole",
    "NodeView",
    "Placement",
    "RelayLostError",
    "Route",
    "Snapshot",
    "UnreachableRefError",
    "decide",
    "node_role_from_env",
    "reachable",
    "snapshot_from_ray",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ByRef:
    """An object ref the caller knows the landing node reaches: passed on as a ref, not a value.

    Without it, refs in the arguments of relayed work are resolved on the head and passed by
    value (safe, but the data crosses the head). insitu's Dask execution wraps the chunks of a
    node with it: they are read zero-copy on the node that holds them.
    """

    ref: Any


def _unwrap(value: Any) -> Any:
    """Arguments with every :class:`ByRef` replaced by its ref (the direct path)."""
    if isinstance(value, ByRef):
        return value.ref
    if isinstance(value, (list, tuple)):
        items = [_unwrap(v) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        return {k: _unwrap(v) for k, v in value.items()}
    return value


def placement_of(options: Mapping[str, Any]) -> Placement:
    """The :class:`Placement` of Ray ``.options(...)`` keywords."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

    strategy = options.get("scheduling_strategy")
    resources = frozenset(k for k, v in (options.get("resources") or {}).items() if v)
    if isinstance(strategy, NodeAffinitySchedulingStrategy):
        return Placement(node_id=strategy.node_id, soft=bool(strategy.soft), resources=resources)
    if isinstance(strategy, PlacementGroupSchedulingStrategy) or options.get("placement_group") is not None:
        return Placement(resources=resources, strategy="PLACEMENT_GROUP")
    if strategy is not None:
        return Placement(resources=resources, strategy=str(strategy))
    return Placement(resources=resources)


def _as_function(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``ray.remote`` takes Python functions only: wrap builtins and other callables."""
    import inspect

    if inspect.isfunction(fn):
        return fn

    def call(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    call.__name__ = getattr(fn, "__name__", "call")
    return call


@dataclass(frozen=True)
class _ShippedFn:
    """A function as the relay receives it: pickled once per dispatcher, known by its digest."""

    digest: str
    blob: bytes


_FN_CACHE = 256  # functions a dispatcher or a relay keeps exported


class _Lru(dict[Any, Any]):
    """A dict that keeps the ``_FN_CACHE`` most recently used entries."""

    def use(self, key: Any, make: Callable[[], Any], fresh: Callable[[Any], bool] = lambda v: True) -> Any:
        """The value of ``key`` (``make()`` if absent or not ``fresh``), now the most recently used."""
        value = self.pop(key, None)
        if value is None or not fresh(value):
            if len(self) >= _FN_CACHE:
                del self[next(iter(self))]
            value = make()
        self[key] = value
        return value


def _check_options(options: Mapping[str, Any]) -> None:
    if options.get("num_returns", 1) != 1:
        raise ConfigError(
            f"dispatch supports one return value; got num_returns={options['num_returns']!r} (return a tuple instead)"
        )


# -- the relay ------------------------------------------------------------------------------------
async def _within(ref: Any, deadline: float, what: str, on_give_up: Callable[[], None]) -> Any:
    """Await ``ref`` for at most ``deadline`` seconds; on timeout, or when the awaiting call is
    cancelled (the caller gave up), ``on_give_up()`` ends the work first."""

    async def wait() -> Any:
        return await ref

    try:
        return await asyncio.wait_for(wait(), deadline)
    except TimeoutError:
        on_give_up()
        raise StepTimeoutError(
            f"relayed {what} not done within the dispatcher's deadline of {deadline:.0f} s; it was cancelled "
            "(give the Dispatcher a larger deadline= for longer work)"
        ) from None
    except asyncio.CancelledError:
        on_give_up()
        raise


def _relay_class() -> Any:
    import cloudpickle
    import ray

    @ray.remote(num_cpus=0, max_restarts=0)
    class Relay:
        """Submits work for callers that cannot reach where it lands (pinned to the head, owned by the caller)."""

        def __init__(self) -> None:
            self._actors: dict[int, Any] = {}
            self._next = 0
            self._fns = _Lru()  # digest -> remote function, exported once

        def _remote_fn(self, fn: _ShippedFn) -> Any:
            return self._fns.use(fn.digest, lambda: ray.remote(_as_function(cloudpickle.loads(fn.blob))))

        async def _resolve(self, value: Any, deadline: float) -> Any:
            if isinstance(value, ByRef):
                return value.ref
            if isinstance(value, ray.ObjectRef):
                try:
                    return await _within(value, deadline, f"read of object {value.hex()}", lambda: None)
                except (ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError) as exc:
                    raise UnreachableRefError(
                        f"object {value.hex()} in the arguments cannot be read even from the head "
                        f"({type(exc).__name__}); pass the value itself or recreate the object"
                    ) from None
            if isinstance(value, (list, tuple)):
                items = [await self._resolve(v, deadline) for v in value]
                return type(value)(items) if isinstance(value, list) else tuple(items)
            if isinstance(value, dict):
                return {k: await self._resolve(v, deadline) for k, v in value.items()}
            return value

        async def task(self, fn: _ShippedFn, args: tuple[Any, ...], kwargs: dict[str, Any],
                       options: dict[str, Any], deadline: float) -> Any:  # fmt: skip
            args, kwargs = await self._resolve(args, deadline), await self._resolve(kwargs, deadline)
            ref = self._remote_fn(fn).options(**options).remote(*args, **kwargs)
            return await _within(ref, deadline, f"task {fn.digest[:12]}", lambda: ray.cancel(ref))

        async def create(self, cls: type, args: tuple[Any, ...], kwargs: dict[str, Any],
                         options: dict[str, Any], deadline: float) -> int:  # fmt: skip
            args, kwargs = await self._resolve(args, deadline), await self._resolve(kwargs, deadline)
            handle: Any = ray.remote(cls).options(**options).remote(*args, **kwargs)
            await _within(handle.__ray_ready__.remote(), deadline, f"creation of a {cls.__name__}",
                          lambda: ray.kill(handle))  # fmt: skip
            self._next += 1
            self._actors[self._next] = handle
            return self._next

        async def call(self, key: int, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                       deadline: float) -> Any:  # fmt: skip
            args, kwargs = await self._resolve(args, deadline), await self._resolve(kwargs, deadline)
            ref = getattr(self._actors[key], method).remote(*args, **kwargs)
            return await _within(ref, deadline, f"call {method}", lambda: ray.cancel(ref))

        async def fetch(self, refs: list[Any], deadline: float) -> list[Any]:
            return [await _within(r, deadline, f"read of object {r.hex()}", lambda: None) for r in refs]

        async def drop(self, key: int) -> None:
            handle = self._actors.pop(key, None)
            if handle is not None:
                ray.kill(handle)

        def ping(self) -> str:
            return ray.get_runtime_context().get_node_id()

    return Relay


def _target_failure(exc: BaseException) -> BaseException | None:
    """The target's own failure carried through the relay (the relay's method raised it), if ``exc`` is one.

    A relay that died raises a bare ``RayActorError``; a target actor that died is seen by the relay,
    which raises it from its method: the caller then gets a ``RayTaskError`` whose cause is it.
    """
    import ray

    if isinstance(exc, ray.exceptions.RayTaskError):
        return exc.cause if isinstance(exc.cause, BaseException) else exc
    return None


@dataclass
class Dispatched:
    """A dispatched call; :meth:`get` waits for its result with a deadline."""

    ref: Any
    route: Route
    resubmit: Callable[[], Dispatched] | None = None
    on_lost: Callable[[], None] | None = None  # the dispatcher forgets the dead relay

    def get(self, timeout: float = 120.0) -> Any:
        """The result within ``timeout`` seconds.

        Raises
        ------
        StepTimeoutError
            Not done within ``timeout``: the work (relayed or not) is cancelled.
        RelayLostError
            The relay died while carrying the call (rerun once through a new relay if retriable).
        ray.exceptions.RayActorError
            The *target* actor died (never a ``RelayLostError``, never rerun).
        """
        import ray

        try:
            return ray.get(self.ref, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            ray.cancel(self.ref)  # through the relay: its wait is cancelled, and cancels the work
            raise StepTimeoutError(
                f"{self.route.value} call not done within {timeout:.0f} s; it was cancelled "
                "(pass a larger timeout to get() for longer work)"
            ) from None
        except ray.exceptions.RayActorError as exc:
            target = _target_failure(exc)
            if target is not None and target is not exc:
                raise target from exc  # the target actor's death, as such: never rerun
            if self.route != Route.RELAY or target is not None:
                raise
            if self.on_lost is not None:
                self.on_lost()
            if self.resubmit is not None:
                log.warning("relay lost; rerunning a retriable call through a new relay")
                return self.resubmit().get(timeout)
            raise RelayLostError(f"the relay actor died while carrying this call: {exc}") from exc


@dataclass
class ActorProxy:
    """An actor created through dispatch; ``proxy.call("method", ...)`` routes like its creation."""

    dispatcher: Dispatcher
    route: Route
    handle: Any = None  # direct
    key: int | None = None  # relayed
    relay: Any = None

    def call(self, method: str, *args: Any, **kwargs: Any) -> Dispatched:
        """Call ``method`` on the actor (through the relay that created it, if relayed)."""
        if self.route == Route.DIRECT:
            return Dispatched(getattr(self.handle, method).remote(*_unwrap(args), **_unwrap(kwargs)), Route.DIRECT)
        ref = self.relay.call.remote(self.key, method, args, kwargs, self.dispatcher.deadline)
        return Dispatched(ref, Route.RELAY, on_lost=self.dispatcher._forget_relay)

    def kill(self) -> None:
        """End the actor (directly, or through the relay that holds it)."""
        import ray

        if self.route == Route.DIRECT:
            ray.kill(self.handle)
        else:
            self.relay.drop.remote(self.key)


@dataclass
class Dispatcher:
    """Submit tasks, actors and actor calls directly or through a relay on the head.

    Parameters
    ----------
    run
        Names the relay actor (``insitu-relay-<run>-<tag>-<n>``; ``close`` finds it by that name).
    deadline
        Seconds any relayed work, creation or read may take: the relay cancels it after that.
    ttl
        Seconds a node-table snapshot may be used for a "direct" answer.
    autoscaler
        Whether an autoscaler may add nodes (then resource constraints prove nothing).
    bypass
        Calls to bypass (:class:`insitu.Bypass`, matched by ``fn.__qualname__`` and the call's
        ``bypass_tag``); default: the bypass in force where the dispatcher is used, if any.

    Examples
    --------
    >>> d = Dispatcher("demo")  # doctest: +SKIP
    >>> d.task(sum, [1, 2, 3], options={"resources": {"gpu-box": 1}}).get()  # doctest: +SKIP
    6
    """

    run: str
    ttl: float = 5.0
    autoscaler: bool = False
    namespace: str = "insitu"
    relay_concurrency: int = 1000
    deadline: float = 120.0
    bypass: Bypass | None = None
    _snap: Snapshot | None = field(default=None, init=False, repr=False)
    _relay: Any = field(default=None, init=False, repr=False)
    _tag: str = field(default_factory=lambda: secrets.token_hex(4), init=False, repr=False)
    _made: int = field(default=0, init=False, repr=False)
    # id(fn) -> [fn, its remote function, its shipped form]; fn is kept so that its id stays its own
    _fns: _Lru = field(default_factory=_Lru, init=False, repr=False)

    def snapshot(self) -> Snapshot:
        """The node table, refreshed when older than ``ttl``."""
        import ray

        now = time.monotonic()
        if self._snap is None or now - self._snap.taken_at > self.ttl:
            self._snap = snapshot_from_ray(ray.nodes(), now, self.autoscaler)
        return self._snap

    def route(self, options: Mapping[str, Any]) -> Route:
        """How work with these Ray options would be submitted from here."""
        import ray

        _check_options(options)
        me = ray.get_runtime_context().get_node_id()
        return decide(me, placement_of(options), self.snapshot(), time.monotonic(), self.ttl)

    @property
    def relay_prefix(self) -> str:
        """The names of this dispatcher's relays start with it."""
        return f"insitu-relay-{self.run}-{self._tag}-"

    def relay(self) -> Any:
        """This dispatcher's relay actor on the head (created on first use; a relay seen dead is replaced).

        Every relay is named (``relay_prefix`` and a count) and owned by this process, not
        detached: it, the actors it created and the tasks it submitted end with this process.
        """
        import ray

        if self._relay is not None:
            return self._relay
        self._made += 1
        relay = _relay_class().options(
            name=f"{self.relay_prefix}{self._made}", namespace=self.namespace, resources={HEAD_RESOURCE: 0.001},
            max_concurrency=self.relay_concurrency,
        ).remote()  # fmt: skip
        try:
            ray.get(relay.ping.remote(), timeout=min(60.0, self.deadline))
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
            ray.kill(relay)
            raise RelayLostError(
                f"the relay {self.relay_prefix}{self._made} did not start on the head within "
                f"{min(60.0, self.deadline):.0f} s ({type(exc).__name__}); is the head node alive and not full?"
            ) from exc
        self._relay = relay
        return relay

    def task(self, fn: Callable[..., Any], *args: Any, options: Mapping[str, Any] | None = None,
             retriable: bool = False, bypass_tag: str = "", **kwargs: Any) -> Dispatched:  # fmt: skip
        """Run ``fn(*args, **kwargs)`` as a Ray task with ``options``.

        Under a :class:`insitu.Bypass` that bypasses ``fn`` for ``bypass_tag``, the task runs its
        stub instead, with the same options and route.
        """
        fn = for_call(self.bypass, fn, bypass_tag, args, kwargs)
        opts = dict(options or {})
        if self.route(opts) == Route.DIRECT:
            fn_remote = self._remote_fn(fn).options(**opts)
            return Dispatched(fn_remote.remote(*_unwrap(args), **_unwrap(kwargs)), Route.DIRECT)
        shipped = self._shipped_fn(fn)

        def submit() -> Dispatched:
            return Dispatched(self.relay().task.remote(shipped, args, kwargs, opts, self.deadline), Route.RELAY,
                              on_lost=self._forget_relay)  # fmt: skip

        first = submit()
        first.resubmit = submit if retriable else None
        return first

    def _entry(self, fn: Callable[..., Any]) -> list[Any]:
        import ray

        return self._fns.use(id(fn), lambda: [fn, ray.remote(_as_function(fn)), None], lambda v: v[0] is fn)

    def _remote_fn(self, fn: Callable[..., Any]) -> Any:
        """``ray.remote(fn)``, made (and exported to the cluster) once per function."""
        return self._entry(fn)[1]

    def _shipped_fn(self, fn: Callable[..., Any]) -> _ShippedFn:
        """``fn`` as sent to the relay: pickled once, like ``ray.remote`` does (captured state is
        taken at the first call)."""
        import hashlib

        import cloudpickle

        entry = self._entry(fn)
        if entry[2] is None:
            blob = cloudpickle.dumps(fn)
            entry[2] = _ShippedFn(hashlib.sha256(blob).hexdigest(), blob)
        return entry[2]

    def _forget_relay(self) -> None:
        self._relay = None

    def actor(self, cls: type, *args: Any, options: Mapping[str, Any] | None = None, **kwargs: Any) -> ActorProxy:
        """Create an actor of ``cls`` with ``options``; its calls go the same way."""
        import ray

        opts = dict(options or {})
        if self.route(opts) == Route.DIRECT:
            handle: Any = ray.remote(cls).options(**opts).remote(*_unwrap(args), **_unwrap(kwargs))
            return ActorProxy(self, Route.DIRECT, handle=handle)
        for attempt in (1, 2):  # a relay found dead is replaced once: the actor died with it, if it was made
            relay = self.relay()
            creating = Dispatched(relay.create.remote(cls, args, kwargs, opts, self.deadline), Route.RELAY)
            try:  # the actor's own failure (its __init__ raised) propagates as such, never retried
                key = creating.get(self.deadline + 10)
            except RelayLostError as exc:
                self._forget_relay()
                if attempt == 2:
                    raise RelayLostError(f"the relay actor died twice while creating a {cls.__name__}: {exc}") from exc
                continue
            return ActorProxy(self, Route.RELAY, key=key, relay=relay)
        raise AssertionError("unreachable")

    def fetch(self, refs: list[Any], nodes: Iterable[str], timeout: float = 120.0) -> list[Any]:
        """The values of ``refs`` held on ``nodes``: read directly if every node is reachable from here,
        else through the relay (the data crosses the head)."""
        import ray

        me = ray.get_runtime_context().get_node_id()
        snap, now = self.snapshot(), time.monotonic()
        if all(decide(me, Placement(node_id=n), snap, now, self.ttl) == Route.DIRECT for n in set(nodes)):
            return list(ray.get(refs, timeout=timeout))

        def submit() -> Dispatched:  # reading is idempotent: rerun through a new relay if one dies
            return Dispatched(self.relay().fetch.remote(list(refs), min(timeout, self.deadline)), Route.RELAY,
                              on_lost=self._forget_relay)  # fmt: skip

        first = submit()
        first.resubmit = submit
        return first.get(timeout)

    def close(self) -> None:
        """End every relay this dispatcher made (found by name), the actors they created and their tasks."""
        import ray

        relay, self._relay = self._relay, None
        if relay is not None:
            ray.kill(relay)
        if not self._made:
            return
        for entry in ray.util.list_named_actors(all_namespaces=True):
            name = entry["name"] if isinstance(entry, dict) else str(entry)
            if name.startswith(self.relay_prefix) and (
                not isinstance(entry, dict) or entry["namespace"] == self.namespace
            ):
                try:
                    ray.kill(ray.get_actor(name, namespace=self.namespace))
                except ValueError:  # ended meanwhile
                    continue
