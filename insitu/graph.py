"""Chunks to Dask arrays, and insitu's Dask scheduler.

The arrays handed to analytics callbacks have the chunks' object refs as their
graph leaves: no task per chunk and no copy through the driver. Their
``.compute()`` inside a callback runs on :class:`NodeScheduler`, which:

1. finds the object refs a task uses (also inside fused tasks) with a pickler's
   ``persistent_id`` hook, and so the node(s) its data lives on;
2. sends every group of tasks whose data lives on one node to that node as one
   Ray task, with the refs as top-level arguments (zero-copy reads there);
3. runs what combines several nodes (small partial results) in the driver.

Executors are created and called through :class:`insitu.dispatch.Dispatcher`: from an
analytics process on a node that cannot reach the data's node (a tunneled node, or a LAN node
when the data is on a tunneled one) they go through the run's relay on the head, and the
chunks still travel as refs (:class:`insitu.dispatch.ByRef`), read where they lie.
"""

from __future__ import annotations

import functools
import io
import operator
import pickle
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import cloudpickle
import dask
import dask.array as da
import dask.core
import dask.local
import numpy as np
import ray
from dask.highlevelgraph import HighLevelGraph
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from insitu.dispatch import ActorProxy, ByRef, Dispatcher
from insitu.errors import StepTimeoutError
from insitu.layout import ArrayLayout
from insitu.messages import ChunkRef

__all__ = ["NodeExecutor", "NodeScheduler", "block_order", "executor_on", "expand_parts", "make_array"]


def block_order(
    layouts: Sequence[ArrayLayout], rank_nodes: Sequence[str]
) -> dict[tuple[str, str], tuple[tuple[int, ...], ...]]:
    """For each (array, node), the blocks the node actor stores, in its object's order (rank order).

    Computed once per run from what the simulation registered, so per-step messages carry
    one ref per node and array, never per-block records.

    Examples
    --------
    >>> from insitu.layout import ArraySpec, validate_layout
    >>> lay = validate_layout([{"u": ArraySpec("u", (4,), "f8", start=(2 * r,), shape=(2,))} for r in range(2)])
    >>> block_order(list(lay.values()), ["b", "a"])
    {('u', 'a'): ((1,),), ('u', 'b'): ((0,),)}
    """
    out: dict[tuple[str, str], list[tuple[int, tuple[int, ...]]]] = {}
    for lay in layouts:
        for block, rank in lay.owners:
            out.setdefault((lay.name, rank_nodes[rank]), []).append((rank, tuple(block)))
    return {key: tuple(b for _, b in sorted(v)) for key, v in sorted(out.items())}


def expand_parts(
    parts: Sequence[tuple[str, str, Any]], order: Mapping[tuple[str, str], tuple[tuple[int, ...], ...]]
) -> dict[str, list[ChunkRef]]:
    """The :class:`ChunkRef` of every block of a step's ``(array, node, ref)`` parts, per array."""
    out: dict[str, list[ChunkRef]] = {}
    for array, node, ref in parts:
        chunks = out.setdefault(array, [])
        chunks += [ChunkRef(array, block, ref, node, i) for i, block in enumerate(order[(array, node)])]
    return out


def make_array(layout: ArrayLayout, step: int, chunks: Sequence[ChunkRef], run: str) -> da.Array:
    """The Dask array of one array at one step; graph values are the chunks' object refs.

    The returned array has a ``step`` attribute.
    """
    name = f"insitu-{run}-{layout.name}-{step}"
    graph = {(name, *c.block): (operator.getitem, c.ref, c.index) for c in chunks}
    dtype = np.dtype(layout.dtype)
    arr = da.Array(
        HighLevelGraph.from_collections(name, graph, dependencies=[]),  # type: ignore[arg-type]
        name,
        layout.chunks,
        dtype=dtype,
        meta=np.empty((0,) * len(layout.global_shape), dtype=dtype),
    )
    arr.step = step  # type: ignore[attr-defined]  # Array instances have a __dict__
    return arr


class _RefPickler(cloudpickle.Pickler):
    def __init__(self, file: io.BytesIO, refs: list[Any]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.refs = refs

    def persistent_id(self, obj: Any) -> int | None:  # noqa: D102 - pickle hook
        if isinstance(obj, ray.ObjectRef):
            self.refs.append(obj)
            return len(self.refs) - 1
        return None


class _ValueUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, values: Sequence[Any]) -> None:
        super().__init__(file)
        self.values = values

    def persistent_load(self, pid: Any) -> Any:  # noqa: D102 - pickle hook
        return self.values[pid]


def _dump(obj: Any) -> tuple[bytes, list[Any]]:
    buf = io.BytesIO()
    refs: list[Any] = []
    _RefPickler(buf, refs).dump(obj)
    return buf.getvalue(), refs


def _load(payload: bytes, values: Sequence[Any]) -> Any:
    return _ValueUnpickler(io.BytesIO(payload), values).load()


def _identity(value: Any) -> Any:
    return value


# A node-local subgraph travels as (key, pickled task, indices into the call's object refs):
# the per-task pickles made to find the refs are reused, never pickled a second time.
_Subgraph = list[tuple[Hashable, bytes, tuple[int, ...]]]


def _run_local(tasks: _Subgraph, out_keys: list[Hashable], arrays: Sequence[Any]) -> list[Any]:
    graph = {key: _load(payload, [arrays[i] for i in index]) for key, payload, index in tasks}
    return list(dask.local.get_sync(graph, out_keys))  # type: ignore[arg-type]


class NodeExecutor:
    """Runs node-local subgraphs next to their chunks: one per node, owned by the analytics process.

    An actor call costs less than a task (no worker lease per call); the actor dies
    with the analytics process, and a crash in user code never touches the data path.
    """

    def run(self, tasks: _Subgraph, out_keys: list[Hashable], *arrays: Any) -> list[Any]:
        """Run a subgraph; refs arrive as zero-copy read-only arrays from the local store."""
        return _run_local(tasks, out_keys, arrays)


def executor_on(node: str, cpus: float, dispatcher: Dispatcher) -> ActorProxy:
    """Start a :class:`NodeExecutor` actor pinned to ``node`` (through the relay if needed)."""
    strategy = NodeAffinitySchedulingStrategy(node, soft=False)
    return dispatcher.actor(NodeExecutor, options={"scheduling_strategy": strategy, "num_cpus": cpus})


class NodeScheduler:
    """A Dask ``get`` that runs chunk-local work on the node holding the chunks.

    Parameters
    ----------
    where
        Object-ref hex id to Ray node id, for every chunk the analytics holds.
    executor
        Returns the :class:`NodeExecutor` actor of a node (created on first use).
    dispatcher
        Reads chunks for work that spans nodes (through the relay if needed).
    deadline
        Seconds to wait for a node's partial results.
    """

    def __init__(self, where: Mapping[str, str], executor: Callable[[str], ActorProxy], dispatcher: Dispatcher,
                 deadline: float = 120.0) -> None:  # fmt: skip
        self._where = where
        self._executor = executor
        self._dispatcher = dispatcher
        self._deadline = deadline

    def __call__(self, dsk: Any, keys: Any, **kwargs: Any) -> Any:
        if not isinstance(dsk, Mapping):
            dsk = dsk.__dask_graph__()
        graph = dict(dsk)
        wanted = set(dask.core.flatten(keys)) if isinstance(keys, list) else {keys}
        order = dask.core.toposort(graph)
        deps = {k: dask.core.get_dependencies(graph, k) for k in graph}
        dependents: dict[Hashable, set[Hashable]] = {k: set() for k in graph}
        for k, ds in deps.items():
            for d in ds:
                dependents[d].add(k)
        payloads: dict[Hashable, tuple[bytes, list[Any]]] = {}
        nodes: dict[Hashable, frozenset[str]] = {}
        for key in order:
            payload, refs = _dump(graph[key])
            payloads[key] = (payload, refs)
            own = frozenset(self._where.get(r.hex(), "") for r in refs)
            nodes[key] = own.union(*(nodes[d] for d in deps[key]))
        groups: dict[str, list[Hashable]] = {}
        for key in order:
            if len(nodes[key]) == 1 and "" not in nodes[key]:
                groups.setdefault(next(iter(nodes[key])), []).append(key)
        local_of = {k: n for n, ks in groups.items() for k in ks}
        futures = []
        for node, members in groups.items():
            member_set = set(members)
            needed = set(members)
            stack = list(members)
            while stack:  # node-free helpers (constants) the group depends on
                for d in deps[stack.pop()]:
                    if d not in needed and not nodes[d]:
                        needed.add(d)
                        stack.append(d)
            outputs = [k for k in members if k in wanted or dependents[k] - member_set]
            if not outputs:
                continue
            call_refs: list[Any] = []
            slot: dict[str, int] = {}
            tasks: _Subgraph = []
            for k in needed:
                blob, task_refs = payloads[k]
                for ref in task_refs:
                    if ref.hex() not in slot:
                        slot[ref.hex()] = len(call_refs)
                        call_refs.append(ref)
                tasks.append((k, blob, tuple(slot[ref.hex()] for ref in task_refs)))
            fut = self._executor(node).call("run", tasks, outputs, *(ByRef(r) for r in call_refs))
            futures.append((node, outputs, fut))
        cache: dict[Hashable, Any] = {}
        for node, outputs, fut in futures:
            try:
                values = fut.get(self._deadline)
            except StepTimeoutError:  # the node's work was cancelled
                raise StepTimeoutError(
                    f"node {node} did not return {len(outputs)} partial result(s) within {self._deadline:.0f} s"
                ) from None
            cache.update(zip(outputs, values, strict=True))
        rest: dict[Hashable, Any] = {}
        for key in order:
            if key in local_of:
                continue
            payload, refs = payloads[key]
            if refs:
                values = self._dispatcher.fetch(refs, [self._where.get(r.hex(), "") for r in refs], self._deadline)
                rest[key] = _load(payload, values)
            else:
                rest[key] = graph[key]
        for key, value in cache.items():
            # a zero-argument legacy task hides the value from dask's graph parsing
            rest[key] = (functools.partial(_identity, value),)
        return dask.local.get_sync(rest, keys)
