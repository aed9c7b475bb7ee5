"""Tunnel-aware dispatch: relay work through the head when the caller may not reach where it lands.

In Ray the submitter of a task owns it and talks to the target node directly. A node
reachable only through a reverse tunnel to the head (a *remote* node) cannot talk to the
LAN nodes and they cannot talk to it; such work would wait in PENDING_NODE_ASSIGNMENT
forever. The head reaches every node, so work whose landing nodes are not all provably
reachable from the caller is submitted by a relay actor pinned to the head.

Roles come from the live node table: ``head`` (Ray's head resource), ``remote`` (the
custom resource :data:`REMOTE_RESOURCE` that the launch scripts give tunneled nodes; the
variable ``INSITU_NODE_ROLE=remote`` in the raylet's environment is the fallback for
nodes started by hand, read by :func:`node_role_from_env`), ``lan`` (the rest).

Examples
--------
>>> reachable(NodeRole.LAN, NodeRole.HEAD), reachable(NodeRole.REMOTE, NodeRole.LAN)
(True, False)
>>> snap = Snapshot((NodeView("a", NodeRole.HEAD, frozenset()), NodeView("b", NodeRole.REMOTE, frozenset({"gpu"}))),
...                 taken_at=0.0)
>>> decide("b", Placement(resources=frozenset({"gpu"})), snap, now=1.0).name
'DIRECT'
>>> decide("b", Placement(), snap, now=1.0).name
'RELAY'
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from insitu.errors import ConfigError, RelayLostError, UnreachableRefError

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

HEAD_RESOURCE = "node:__internal_head__"
REMOTE_RESOURCE = "insitu_remote"


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


class NodeRole(Enum):
    """Who can reach whom."""

    HEAD = "head"
    LAN = "lan"
    REMOTE = "remote"


class Route(Enum):
    """How a dispatch is submitted."""

    DIRECT = "direct"
    RELAY = "relay"


def reachable(src: NodeRole, dst: NodeRole, same_node: bool = False) -> bool:
    """Whether a process on a ``src`` node can talk to a ``dst`` node directly.

    The head reaches every node and every node reaches the head; LAN nodes reach each
    other; a remote node reaches only itself and the head.
    """
    if same_node or src == NodeRole.HEAD or dst == NodeRole.HEAD:
        return True
    return src == NodeRole.LAN and dst == NodeRole.LAN


def node_role_from_env(environ: Mapping[str, str] | None = None) -> NodeRole | None:
    """Fallback marker: ``INSITU_NODE_ROLE`` (``head``, ``lan`` or ``remote``) in a process's environment."""
    value = (os.environ if environ is None else environ).get("INSITU_NODE_ROLE", "").strip().lower()
    if not value:
        return None
    try:
        return NodeRole(value)
    except ValueError:
        raise ConfigError(f"INSITU_NODE_ROLE must be head, lan or remote; got {value!r}") from None


@dataclass(frozen=True)
class NodeView:
    """One alive node of the snapshot."""

    node_id: str
    role: NodeRole
    resources: frozenset[str]


@dataclass(frozen=True)
class Snapshot:
    """The live node table at ``taken_at`` (monotonic seconds)."""

    nodes: tuple[NodeView, ...]
    taken_at: float
    autoscaler: bool = False

    def node(self, node_id: str) -> NodeView | None:
        """The node with this id, or None if it is not (or no longer) in the table."""
        return next((n for n in self.nodes if n.node_id == node_id), None)


@dataclass(frozen=True)
class Placement:
    """Where work may land, as far as dispatch needs to know.

    ``node_id`` with ``soft=False``: hard node affinity. ``resources``: custom resources
    the work asks for. ``strategy``: ``"SPREAD"``, a placement group, or any other
    strategy makes the landing node unknown.
    """

    node_id: str | None = None
    soft: bool = False
    resources: frozenset[str] = frozenset()
    strategy: str | None = None


_STANDARD = {"CPU", "GPU", "memory", "object_store_memory"}


def decide(caller: str, placement: Placement, snap: Snapshot, now: float, ttl: float = 5.0) -> Route:
    """DIRECT only when every node the work could land on is provably reachable from ``caller``.

    Fail-safe: an unknown caller, a node missing from the snapshot, a stale snapshot, an
    autoscaler that could add nodes, soft affinity, SPREAD or a placement group, and no
    constraint at all, all give RELAY. A caller on the head never relays.
    """
    me = snap.node(caller)
    if me is None:
        return Route.RELAY
    if me.role == NodeRole.HEAD:
        return Route.DIRECT
    if placement.node_id is not None and not placement.soft:
        target = snap.node(placement.node_id)
        if target is None:
            return Route.RELAY
        return Route.DIRECT if reachable(me.role, target.role, target.node_id == me.node_id) else Route.RELAY
    if placement.node_id is not None or placement.strategy is not None:
        return Route.RELAY
    custom = placement.resources - _STANDARD
    if not custom or snap.autoscaler or now - snap.taken_at > ttl:
        return Route.RELAY
    landing = [n for n in snap.nodes if custom <= n.resources]
    if not landing:
        return Route.RELAY
    ok = all(reachable(me.role, n.role, n.node_id == me.node_id) for n in landing)
    return Route.DIRECT if ok else Route.RELAY


def snapshot_from_ray(nodes: Iterable[Mapping[str, Any]], now: float, autoscaler: bool = False) -> Snapshot:
    """A snapshot from ``ray.nodes()``: alive nodes only, roles from their resources."""
    views = []
    for n in nodes:
        if not n.get("Alive"):
            continue
        res = frozenset(n.get("Resources", {}))
        role = NodeRole.HEAD if HEAD_RESOURCE in res else NodeRole.REMOTE if REMOTE_RESOURCE in res else NodeRole.LAN
        views.append(NodeView(n["NodeID"], role, res))
    return Snapshot(tuple(views), now, autoscaler)


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
def _relay_class() -> Any:
    import cloudpickle
    import ray

    @ray.remote(num_cpus=0, max_restarts=0)
    class Relay:
        """Submits work for callers that cannot reach where it lands (pinned to the head)."""

        def __init__(self) -> None:
            self._actors: dict[int, Any] = {}
            self._next = 0
            self._fns = _Lru()  # digest -> remote function, exported once

        def _remote_fn(self, fn: _ShippedFn) -> Any:
            return self._fns.use(fn.digest, lambda: ray.remote(_as_function(cloudpickle.loads(fn.blob))))

        async def _resolve(self, value: Any) -> Any:
            if isinstance(value, ByRef):
                return value.ref
            if isinstance(value, ray.ObjectRef):
                try:
                    return await value  # the head reaches every owner and location
                except (ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError) as exc:
                    raise UnreachableRefError(
                        f"object {value.hex()} in the arguments cannot be read even from the head "
                        f"({type(exc).__name__}); pass the value itself or recreate the object"
                    ) from None
            if isinstance(value, (list, tuple)):
                items = [await self._resolve(v) for v in value]
                return type(value)(items) if isinstance(value, list) else tuple(items)
            if isinstance(value, dict):
                return {k: await self._resolve(v) for k, v in value.items()}
            return value

        async def task(self, fn: _ShippedFn, args: tuple[Any, ...], kwargs: dict[str, Any],
                       options: dict[str, Any]) -> Any:  # fmt: skip
            args, kwargs = await self._resolve(args), await self._resolve(kwargs)
            return await self._remote_fn(fn).options(**options).remote(*args, **kwargs)

        async def create(self, cls: type, args: tuple[Any, ...], kwargs: dict[str, Any],
                         options: dict[str, Any]) -> int:  # fmt: skip
            args, kwargs = await self._resolve(args), await self._resolve(kwargs)
            handle = ray.remote(cls).options(**options).remote(*args, **kwargs)
            await handle.__ray_ready__.remote()
            self._next += 1
            self._actors[self._next] = handle
            return self._next

        async def call(self, key: int, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            args, kwargs = await self._resolve(args), await self._resolve(kwargs)
            return await getattr(self._actors[key], method).remote(*args, **kwargs)

        async def fetch(self, refs: list[Any]) -> list[Any]:
            return [await r for r in refs]

        async def drop(self, key: int) -> None:
            handle = self._actors.pop(key, None)
            if handle is not None:
                ray.kill(handle)

        def ping(self) -> str:
            return ray.get_runtime_context().get_node_id()

    return Relay


@dataclass
class Dispatched:
    """A dispatched call; :meth:`get` waits for its result with a deadline."""

    ref: Any
    route: Route
    resubmit: Callable[[], Dispatched] | None = None
    on_lost: Callable[[], None] | None = None  # the dispatcher forgets the dead relay

    def get(self, timeout: float = 120.0) -> Any:
        """The result; ``RelayLostError`` if the relay died carrying it (rerun once if retriable)."""
        import ray

        try:
            return ray.get(self.ref, timeout=timeout)
        except ray.exceptions.RayActorError as exc:
            if self.route != Route.RELAY:
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
        return Dispatched(self.relay.call.remote(self.key, method, args, kwargs), Route.RELAY,
                          on_lost=self.dispatcher._forget_relay)  # fmt: skip

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
        Names the relay actor (``insitu-relay-<run>``), one per run.
    ttl
        Seconds a node-table snapshot may be used for a "direct" answer.
    autoscaler
        Whether an autoscaler may add nodes (then resource constraints prove nothing).

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
    _snap: Snapshot | None = field(default=None, init=False, repr=False)
    _relay: Any = field(default=None, init=False, repr=False)
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

    def relay(self) -> Any:
        """The run's relay actor on the head (created on first use; a relay seen dead is replaced).

        The handle is kept: a call that finds the relay dead makes the next call look it up again.
        """
        import ray

        name = f"insitu-relay-{self.run}"
        if self._relay is not None:
            return self._relay
        self._relay = _relay_class().options(
            name=name, namespace=self.namespace, get_if_exists=True, lifetime="detached",
            resources={HEAD_RESOURCE: 0.001}, max_concurrency=self.relay_concurrency,
        ).remote()  # fmt: skip
        try:
            ray.get(self._relay.ping.remote(), timeout=60)
        except ray.exceptions.RayActorError:  # a dead relay still registered under the name
            self._relay = _relay_class().options(namespace=self.namespace, lifetime="detached",
                                                 resources={HEAD_RESOURCE: 0.001},
                                                 max_concurrency=self.relay_concurrency).remote()  # fmt: skip
            ray.get(self._relay.ping.remote(), timeout=60)
        return self._relay

    def task(self, fn: Callable[..., Any], *args: Any, options: Mapping[str, Any] | None = None,
             retriable: bool = False, **kwargs: Any) -> Dispatched:  # fmt: skip
        """Run ``fn(*args, **kwargs)`` as a Ray task with ``options``."""
        opts = dict(options or {})
        if self.route(opts) == Route.DIRECT:
            fn_remote = self._remote_fn(fn).options(**opts)
            return Dispatched(fn_remote.remote(*_unwrap(args), **_unwrap(kwargs)), Route.DIRECT)
        shipped = self._shipped_fn(fn)

        def submit() -> Dispatched:
            return Dispatched(self.relay().task.remote(shipped, args, kwargs, opts), Route.RELAY,
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
            handle = ray.remote(cls).options(**opts).remote(*_unwrap(args), **_unwrap(kwargs))
            return ActorProxy(self, Route.DIRECT, handle=handle)
        for attempt in (1, 2):  # a relay found dead is replaced once: the actor died with it, if it was made
            relay = self.relay()
            try:
                key = ray.get(relay.create.remote(cls, args, kwargs, opts), timeout=120)
            except ray.exceptions.RayActorError as exc:
                self._forget_relay()
                if attempt == 2:
                    raise RelayLostError(f"the relay actor died while creating a {cls.__name__}: {exc}") from exc
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
            return Dispatched(self.relay().fetch.remote(list(refs)), Route.RELAY, on_lost=self._forget_relay)

        first = submit()
        first.resubmit = submit
        return first.get(timeout)

    def close(self) -> None:
        """Remove the run's relay (and the actors it created), whichever process created it."""
        import ray

        relay, self._relay = self._relay, None
        if relay is None:
            try:
                relay = ray.get_actor(f"insitu-relay-{self.run}", namespace=self.namespace)
            except ValueError:  # no relay was ever needed
                return
        ray.kill(relay)
