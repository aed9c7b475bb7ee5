"""Replay a recording through a real :class:`~insitu.Bridge` under ``mpiexec``: analytics run unchanged.

``insitu replay PATH --run RUN [--ranks N] [--pace recorded|max] [--steps A:B]`` starts
``mpiexec -n N python -m insitu.replay ...``; each rank reads its own block of every recorded
array for each step from the store (a rank reads only its region) and sends it.

* ``--ranks`` omitted or equal to the recorded size: the recorded decomposition (each rank the
  block it owned) and the recorded rank-to-node mapping (``INSITU_NODE`` per rank, when those
  nodes are in the cluster), so a reduction groups its blocks as in the live run.
* Another ``N``: a fresh Cartesian split (``MPI.Compute_dims``, uneven blocks allowed).
* ``--pace recorded`` sleeps the recorded intervals between steps; ``max`` sends back to back.
* The steering value ``stop`` ends the replay at that step, as a simulation would.

Examples
--------
>>> parse_steps("10:20"), parse_steps(":5"), parse_steps(None)
((10, 20), (None, 5), (None, None))
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from insitu.errors import ConfigError
from insitu.interrupt import end_processes

__all__ = ["parse_steps", "replay_command"]


def parse_steps(text: str | None) -> tuple[int | None, int | None]:
    """``"A:B"`` (either end optional) as the half-open range of step numbers to replay."""
    if not text:
        return None, None
    lo, sep, hi = text.partition(":")
    if not sep:
        raise ConfigError(f"--steps takes A:B (either may be empty); got {text!r}")
    return (int(lo) if lo else None), (int(hi) if hi else None)


def _split(n: int, parts: int, index: int) -> tuple[int, int]:
    base, extra = divmod(n, parts)
    return index * base + min(index, extra), base + (1 if index < extra else 0)


def replay_command(path: str, run: str, ranks: int | None, pace: str, steps: str | None,
                   node_ips: dict[str, str] | None = None) -> list[str]:  # fmt: skip
    """The ``mpiexec`` command line of a replay (MPMD: one ``INSITU_NODE`` per rank when mapped).

    ``node_ips`` maps this cluster's node ids to their addresses. With the recorded number of ranks
    and every recorded node present, rank ``r`` gets its recorded node; otherwise ranks go in
    contiguous blocks over the cluster's nodes.
    """
    import zarr

    from insitu.resources import executable

    meta = zarr.open_group(path, mode="r").attrs["insitu"]
    size = int(meta["size"])
    n = size if ranks is None else int(ranks)
    if n < 1:
        raise ConfigError(f"--ranks must be >= 1; got {n}")
    # never a lone ":" in the arguments: mpiexec reads it as the separator of MPMD segments
    argv = [sys.executable, "-m", "insitu.replay", path, f"--run={run}", f"--pace={pace}", f"--steps={steps or ''}"]
    exe = executable("mpiexec", "INSITU_MPIEXEC")
    if not node_ips:
        return [exe, "-n", str(n), *argv]
    if n != size or not set(meta["rank_nodes"]) <= set(node_ips):
        from insitu.cli import mpiexec_mpmd  # contiguous blocks of ranks per node, as a launcher places them

        return mpiexec_mpmd(n, sorted(set(node_ips.values())), argv)
    cmd = [exe]
    for node in meta["rank_nodes"]:
        if len(cmd) > 1:
            cmd.append(":")
        cmd += ["-n", "1", "-env", "INSITU_NODE", node_ips[node], *argv]
    return cmd


def _specs(meta: dict[str, Any], comm: Any) -> tuple[Any, list[Any], dict[str, tuple[slice, ...]]]:
    """The communicator to send on, this rank's ArraySpecs and the region of each array it reads."""
    from mpi4py import MPI

    from insitu.layout import ArraySpec

    rank, size = comm.Get_rank(), comm.Get_size()
    specs, regions = [], {}
    if size == int(meta["size"]):
        for name, a in meta["arrays"].items():
            owned = [tuple(b) for b, r in a["owners"] if r == rank]
            offsets = [[sum(axis[:i]) for i in range(len(axis))] for axis in a["chunks"]]
            (block,) = owned  # insitu declares one block per rank and array
            start = tuple(offsets[d][k] for d, k in enumerate(block))
            shape = tuple(a["chunks"][d][k] for d, k in enumerate(block))
            specs.append(ArraySpec(name, tuple(a["global_shape"]), a["dtype"], start=start, shape=shape))
            regions[name] = tuple(slice(s, s + n) for s, n in zip(start, shape, strict=True))
        return comm, specs, regions
    ndim = {len(a["global_shape"]) for a in meta["arrays"].values()}
    if len(ndim) != 1:
        raise ConfigError("a replay on another number of ranks needs arrays of one dimensionality")
    dims = MPI.Compute_dims(size, ndim.pop())
    cart = comm.Create_cart(dims, periods=[False] * len(dims))
    coords = cart.Get_coords(cart.Get_rank())
    for name, a in meta["arrays"].items():
        parts = [_split(n, d, c) for n, d, c in zip(a["global_shape"], dims, coords, strict=True)]
        specs.append(ArraySpec.from_cart(name, cart, tuple(n for _, n in parts), a["dtype"]))
        regions[name] = tuple(slice(s, s + n) for s, n in parts)
    return cart, specs, regions


def _rank_main(argv: Sequence[str] | None = None) -> int:
    """One replay rank (run by ``mpiexec`` from ``insitu replay``)."""
    import numpy as np
    import zarr
    from mpi4py import MPI

    from insitu.bridge import Bridge
    from insitu.mpiwait import wait_gently

    ap = argparse.ArgumentParser(prog="python -m insitu.replay")
    ap.add_argument("path")
    ap.add_argument("--run", required=True)
    ap.add_argument("--pace", choices=("recorded", "max"), default="max")
    ap.add_argument("--steps", default="")
    args = ap.parse_args(argv)
    group = zarr.open_group(args.path, mode="r")
    meta = dict(group.attrs["insitu"])
    lo, hi = parse_steps(args.steps)
    steps, times = group["step"][:], group["time"][:]
    comm, specs, regions = _specs(meta, MPI.COMM_WORLD)
    sent = 0
    # `insitu replay` interrupted: mpiexec forwards the signal; every rank stops before the same step
    # and closes its bridge, so the run ends closed (these ranks are insitu's, their signals too)
    interrupted = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: interrupted.set())
    flag, agreed = np.zeros(1, dtype=np.int8), np.zeros(1, dtype=np.int8)
    with Bridge(specs, comm=comm, run=args.run) as bridge:
        t0, wall0 = None, time.monotonic()
        for i, step in enumerate(steps):
            step = int(step)
            if (lo is not None and step < lo) or (hi is not None and step >= hi):
                continue
            if args.pace == "recorded":
                t0 = times[i] if t0 is None else t0
                interrupted.wait(max(0.0, (times[i] - t0) - (time.monotonic() - wall0)))
            flag[0] = interrupted.is_set()
            wait_gently(comm.Iallreduce(flag, agreed, op=MPI.MAX))
            if agreed[0]:
                break
            bridge.send(step, **{name: group[name][(i, *regions[name])] for name in regions})
            sent += 1
            if bridge.get("stop"):
                break
    if comm.Get_rank() == 0:
        print(json.dumps({"replayed": sent, "ranks": comm.Get_size()}), flush=True)
    if comm is not MPI.COMM_WORLD:
        comm.Free()
    return 0


def main_replay(path: str, run: str, ranks: int | None, pace: str, steps: str | None, address: str | None) -> int:
    """``insitu replay``: map the recorded nodes to this cluster's, run the ranks, return their exit code."""
    from insitu.config import Config

    if not (Path(path) / "zarr.json").exists():
        raise ConfigError(f"{path} is not a recording (no zarr.json); make one with `insitu record`")
    parse_steps(steps)
    node_ips: dict[str, str] = {}
    cfg = Config.from_env()
    addr = address or cfg.address
    if addr:
        import ray

        from insitu.comm import init_ray, shutdown_ray

        init_ray(address=addr, logging_level="ERROR", log_to_driver=False, configure_logging=False)
        try:
            node_ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
        finally:
            shutdown_ray()
    env = {**os.environ, **({"INSITU_ADDRESS": addr} if addr else {})}
    proc = subprocess.Popen(replay_command(path, run, ranks, pace, steps, node_ips), env=env)
    try:
        return proc.wait()
    finally:  # interrupted: the ranks stop before the same step and close the run (SIGKILL after 10 s)
        end_processes([proc])


if __name__ == "__main__":
    sys.exit(_rank_main())
