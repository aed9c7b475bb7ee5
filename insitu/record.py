"""Record a run's arrays to a Zarr v3 store where the blocks live, and open a recording with xarray.

A recorder is one more consumer of a run (:class:`insitu.Analytics`): it may attach next to any
analytics. Each step, every node that holds blocks of a recorded array writes them itself, in a
zero-CPU Ray task pinned to that node that reads the blocks from the node's object store; no
block travels through the recording process. The recording process only grows the arrays by one
step and appends the step number and its wall-clock time.

Layout of a store (``zarr.open_group(path)``)::

    <array>   (step, <array>_d0, <array>_d1, ...)  one Zarr chunk per block when the split is even
    step      (step,)                             int64, the simulation's step numbers
    time      (step,)                             float64, seconds since the epoch, when received
    attrs["insitu"]: run, size, every, rank_nodes, per array: global shape, dtype, the
                     decomposition (Dask chunks) and each block's owner rank

Chunking: Zarr 3 has a regular chunk grid only; the chunk extent along each axis is the greatest
common divisor of the blocks' extents there, so every block is a whole number of chunks and two
nodes never write the same chunk (an even split gives one chunk per block).

Examples
--------
>>> zarr_chunks(((4, 4, 4), (6, 3)))
(4, 3)
"""

from __future__ import annotations

import math
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from insitu.errors import ConfigError, ContractError

__all__ = ["Recorder", "open_recording", "record", "zarr_chunks"]

FORMAT = 1


def zarr_chunks(chunks: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """Per axis, the greatest common divisor of the blocks' extents (a grid every block is a union of)."""
    return tuple(math.gcd(*(int(c) for c in axis)) for axis in chunks)


def _offsets(chunks: Sequence[Sequence[int]]) -> list[list[int]]:
    return [[sum(axis[:i]) for i in range(len(axis))] for axis in chunks]


def _write_blocks(path: str, name: str, index: int,
                  items: list[tuple[list[Any], int, tuple[slice, ...]]]) -> tuple[str, int]:  # fmt: skip
    """Ray task on the node holding the blocks: write each block into step ``index`` of ``name``.

    Returns this node's id and the bytes written.
    """
    import ray
    import zarr

    arr = zarr.open_array(os.path.join(path, name), mode="r+")
    written = 0
    for boxed, i, region in items:
        block = ray.get(boxed[0])[i]  # the node's own object store: no transfer
        arr[(index, *region)] = block
        written += block.nbytes
    return ray.get_runtime_context().get_node_id(), written


def _sees(path: str, token: str) -> bool:
    """Ray task: whether this node sees the probe file the recorder wrote."""
    probe = Path(path) / f".insitu-probe-{token}"
    return probe.exists() and probe.read_text() == token


@dataclass
class Recorder:
    """Writes the steps a callback receives; made by :func:`record`.

    Attributes
    ----------
    steps, bytes
        Steps and bytes written so far.
    by_node
        Bytes written by each node (Ray node id): where the blocks lived.
    """

    analytics: Any
    path: str
    arrays: tuple[str, ...]
    every: int = 1
    progress: Callable[[str], None] | None = None
    steps: int = 0
    bytes: int = 0
    by_node: dict[str, int] = field(default_factory=dict)
    _group: Any = field(default=None, repr=False)
    _write: Any = field(default=None, repr=False)
    _strategy: Any = field(default=None, repr=False)

    def _start(self) -> None:
        """Create the store, check every node of the run reaches it, set up the writer task."""
        import ray
        import zarr
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        info = self.analytics.info
        layouts = {lay.name: lay for lay in info.layouts}
        unknown = [a for a in self.arrays if a not in layouts]
        if unknown:
            raise ContractError(f"cannot record {unknown}: the run declares {sorted(layouts)}")
        group = zarr.open_group(self.path, mode="w", zarr_format=3)
        self._check_reachable(sorted({n for n in info.rank_nodes if n}), NodeAffinitySchedulingStrategy)
        for name in self.arrays:
            lay = layouts[name]
            dims = ["step", *(f"{name}_d{i}" for i in range(len(lay.global_shape)))]
            group.create_array(name, shape=(0, *lay.global_shape), chunks=(1, *zarr_chunks(lay.chunks)),
                               dtype=np.dtype(lay.dtype), fill_value=0, dimension_names=dims)  # fmt: skip
        group.create_array("step", shape=(0,), chunks=(4096,), dtype="int64", dimension_names=["step"])
        group.create_array("time", shape=(0,), chunks=(4096,), dtype="float64", dimension_names=["step"],
                           attributes={"units": "seconds since 1970-01-01"})  # fmt: skip
        group.attrs["insitu"] = {
            "format": FORMAT, "run": self.analytics.run_name, "size": info.size, "every": self.every,
            "rank_nodes": list(info.rank_nodes),
            "arrays": {n: {"global_shape": list(layouts[n].global_shape), "dtype": layouts[n].dtype,
                           "chunks": [list(c) for c in layouts[n].chunks],
                           "owners": [[list(b), r] for b, r in layouts[n].owners]} for n in self.arrays},
        }  # fmt: skip
        self._group = group
        self._write = ray.remote(num_cpus=0, max_retries=0)(_write_blocks)
        self._strategy = NodeAffinitySchedulingStrategy

    def _check_reachable(self, nodes: list[str], strategy: Any) -> None:
        import ray

        token = uuid.uuid4().hex
        probe = Path(self.path) / f".insitu-probe-{token}"
        probe.write_text(token)
        try:
            check = ray.remote(num_cpus=0, max_retries=0)(_sees)
            seen = ray.get([check.options(scheduling_strategy=strategy(n, soft=False)).remote(self.path, token)
                            for n in nodes], timeout=self.analytics.config.deadline)  # fmt: skip
        finally:
            probe.unlink(missing_ok=True)
        blind = [n for n, ok in zip(nodes, seen, strict=True) if not ok]
        if blind:
            ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
            raise ConfigError(
                f"the recording store {self.path} is not visible from node(s) "
                f"{', '.join(f'{ips.get(n, n)} ({n[:8]})' for n in blind)} of the {len(nodes)} holding the run's "
                "blocks; record to a file system every node mounts at the same path"
            )

    def write(self, step: int, arrays: dict[str, Any]) -> None:
        """Write ``step`` of every recorded array (the callback's body)."""
        if step % self.every:
            return
        if self._group is None:
            self._start()
        received = time.time()
        index = self.steps
        try:
            written = self._write_step(index, arrays)
        except BaseException:  # interrupted, or a block lost: the recording ends with the last whole step
            for name in self.arrays:
                self._group[name].resize((index, *self._group[name].shape[1:]))
            raise
        # the step coordinate last: a step is in the recording once it is there
        self._group["step"].resize((index + 1,))
        self._group["step"][index] = step
        self._group["time"].resize((index + 1,))
        self._group["time"][index] = received
        self.steps += 1
        self.bytes += written
        if self.progress is not None:
            self.progress(f"recorded {self.steps} steps ({self.bytes / 2**20:.1f} MiB), last step {step}")

    def _write_step(self, index: int, arrays: dict[str, Any]) -> int:
        """Write every recorded array's blocks at ``index``, each on the node holding it; the bytes written."""
        import ray

        for name in self.arrays:
            self._group[name].resize((index + 1, *self._group[name].shape[1:]))
        layouts = {lay.name: lay for lay in self.analytics.info.layouts}
        tasks = []
        for name in self.arrays:
            arr = arrays[name][-1]
            offsets = _offsets(layouts[name].chunks)
            by_node: dict[str, list[tuple[list[Any], int, tuple[slice, ...]]]] = {}
            for block, b in self.analytics.blocks(arr).items():
                region = tuple(slice(offsets[d][k], offsets[d][k] + layouts[name].chunks[d][k])
                               for d, k in enumerate(block))  # fmt: skip
                by_node.setdefault(b.node, []).append(([b.ref], b.index, region))
            for node, items in by_node.items():
                opts = {"scheduling_strategy": self._strategy(node, soft=False)} if node else {}
                tasks.append(self._write.options(**opts).remote(self.path, name, index, items))
        written = 0
        for node, nbytes in ray.get(tasks, timeout=self.analytics.config.deadline):
            self.by_node[node] = self.by_node.get(node, 0) + nbytes
            written += nbytes
        return written


def record(analytics: Any, arrays: Sequence[str], path: str | os.PathLike[str], every: int = 1,
           progress: Callable[[str], None] | None = None) -> Recorder:  # fmt: skip
    """Record ``arrays`` of the run ``analytics`` consumes to the Zarr store ``path`` (created or replaced).

    Registers a callback on ``analytics`` (window 1, so retention stays one step per array); the
    writing happens when ``analytics.run()`` runs. Every node holding blocks must see ``path`` at the
    same place: checked at the first recorded step (:class:`~insitu.errors.ConfigError` naming
    the nodes that do not).

    Parameters
    ----------
    analytics
        An :class:`insitu.Analytics` not yet running.
    arrays
        Names of the arrays to record.
    path
        Directory of the Zarr v3 store.
    every
        Record the steps whose number is a multiple of ``every``.
    progress
        Called with a one-line progress message after each recorded step.

    Examples
    --------
    >>> import insitu  # doctest: +SKIP
    >>> analytics = insitu.Analytics(run="demo")  # doctest: +SKIP
    >>> rec = insitu.record(analytics, ["temperature"], "run.zarr", every=10)  # doctest: +SKIP
    >>> analytics.run(); rec.steps  # doctest: +SKIP
    """
    if not arrays:
        raise ContractError("record needs at least one array name")
    if int(every) < 1:
        raise ContractError(f"every must be >= 1; got {every}")
    rec = Recorder(analytics, os.fspath(path), tuple(arrays), int(every), progress)

    @analytics.on_step(*rec.arrays)
    def insitu_record(step: int, **received: Any) -> None:
        rec.write(step, received)

    @analytics.on_close
    def insitu_record_end(_: Any) -> None:
        if rec._group is not None:  # the bytes each node wrote, for the record
            rec._group.attrs["insitu"] = {**rec._group.attrs["insitu"], "bytes_by_node": rec.by_node}

    return rec


def open_recording(path: str | os.PathLike[str]) -> Any:
    """A recording as an ``xarray.Dataset``, lazily backed by Dask.

    Dimension ``step`` (with the simulation's step numbers as coordinate and a ``time``
    coordinate, datetime64) plus each array's axes (``<array>_d0``, ...); run metadata in
    ``ds.attrs["insitu"]``.

    Examples
    --------
    >>> ds = insitu.open_recording("run.zarr")  # doctest: +SKIP
    >>> ds.temperature.sel(step=100).mean().compute()  # doctest: +SKIP
    """
    import xarray as xr

    if not (Path(path) / "zarr.json").exists():
        raise ConfigError(f"{path} is not a recording (no zarr.json); make one with `insitu record`")
    ds = xr.open_zarr(os.fspath(path), consolidated=False, zarr_format=3)
    return ds.set_coords("time")  # CF-decoded to datetime64 from its "seconds since 1970-01-01" units


def main_record(run: str | None, arrays: Sequence[str], out: str, every: int, address: str | None) -> int:
    """``insitu record``: attach to ``run`` as one more consumer and record until the simulation closes."""
    from insitu.analytics import Analytics

    analytics = Analytics(run=run, address=address)
    interactive = sys.stderr.isatty()

    def show(line: str) -> None:
        print(("\r" if interactive else "") + f"insitu record: {line}", end="" if interactive else "\n",
              file=sys.stderr, flush=True)  # fmt: skip

    rec = record(analytics, arrays, out, every, progress=show)
    summary = analytics.run()
    if interactive:
        print(file=sys.stderr)
    print(f"insitu record: {rec.steps} steps of {', '.join(arrays)} ({rec.bytes / 2**20:.1f} MiB) in {out}; "
          f"run ended after step {summary.last_step}")  # fmt: skip
    return 0
