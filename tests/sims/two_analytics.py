"""Two Analytics in one process, on two runs at once, and a third pointed at another cluster.

Usage: ``python two_analytics.py '<json options>'`` with the cluster's ``INSITU_ADDRESS`` in the
environment; options: ``runs`` (two run names), ``steps`` (of each run; the first the shorter),
``shapes``. Prints one JSON line: per run, what its callbacks saw.

Analytics ``a`` uses insitu's scheduler, ``b`` Ray's ``ray_dask_get``. Their callbacks meet at a
barrier at each step both runs have, so both compute at the same time; ``b``'s later steps wait
until ``a`` left (and, had it made it, ended the process's Ray connection). Each callback records
which processes ran its block tasks (``os.getpid()`` per block): insitu's scheduler runs them in
the run's compute actors (``NodeExecutor``), ``ray_dask_get`` in Ray workers, neither here.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

import dask.array as da
import numpy as np
import ray  # the auth variables of the cluster's environment are in place

import insitu
from insitu.errors import InsituError


def pid_block(block: np.ndarray) -> np.ndarray:
    return np.full(block.shape, os.getpid(), dtype=np.int64)


def executor_pids() -> set[int]:
    from ray.util.state import list_actors

    wanted = [("class_name", "=", "NodeExecutor"), ("state", "=", "ALIVE")]
    alive = list_actors(address=os.environ["INSITU_ADDRESS"], filters=wanted, raise_on_missing_output=False)
    return {int(a.pid) for a in alive}


def watch(run: str, scheduler: str, steps: int, shape: tuple[int, ...], meet: threading.Barrier, both: int,
          a_left: threading.Event, out: dict[str, Any]) -> None:  # fmt: skip
    from ray.util.dask import ray_dask_get

    record: dict[str, Any] = {"values_ok": [], "pids": [], "executors": [], "explicit": [], "error": None}
    out[run] = record
    analytics = insitu.Analytics(run=run, deadline=60, scheduler=scheduler)

    @analytics.on_step("u")
    def check(step: int, u: list) -> None:
        if step < both:
            meet.wait()  # the other run's callback is inside too: both compute at once
        elif scheduler == "ray-dask":
            a_left.wait(60)
        expected = 1000 * step + np.arange(int(np.prod(shape))).reshape(shape)
        record["values_ok"].append(bool(np.array_equal(u[0].compute(), expected)))
        record["pids"].append(sorted({int(p) for p in np.unique(u[0].map_blocks(pid_block, dtype=np.int64).compute())}))
        record["executors"].append(sorted(executor_pids()))
        explicit = u[0].map_blocks(pid_block, dtype=np.int64).compute(scheduler=ray_dask_get)  # an explicit choice wins
        record["explicit"].append(sorted({int(p) for p in np.unique(explicit)}))

    try:
        record["steps"] = analytics.run().steps
    except InsituError as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if scheduler == "insitu":
            a_left.set()


def main() -> int:
    opt = json.loads(sys.argv[1])
    (run_a, run_b), (steps_a, steps_b) = opt["runs"], opt["steps"]
    shape_a, shape_b = (tuple(s) for s in opt["shapes"])
    meet, a_left = threading.Barrier(2, timeout=60), threading.Event()
    out: dict[str, Any] = {"driver": os.getpid()}
    threads = [
        threading.Thread(target=watch, args=(run_a, "insitu", steps_a, shape_a, meet, steps_a, a_left, out)),
        threading.Thread(target=watch, args=(run_b, "ray-dask", steps_b, shape_b, meet, steps_a, a_left, out)),
    ]
    for t in threads:
        t.start()
    end = time.monotonic() + 60
    while not ray.is_initialized():  # wait until one of them connected
        if time.monotonic() > end:
            break
        time.sleep(0.1)
    began = time.monotonic()
    try:
        insitu.Analytics(run="elsewhere", address="127.0.0.1:9", deadline=60)
        out["other_cluster"] = None
    except InsituError as exc:
        out["other_cluster"] = f"{type(exc).__name__}: {exc}"
    out["other_cluster_seconds"] = time.monotonic() - began
    for t in threads:
        t.join(180)
    out["connected_after"] = ray.is_initialized()
    out["plain_dask_after"] = int(da.arange(10, chunks=5).sum().compute())
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
