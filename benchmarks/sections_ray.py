"""Sections measuring Ray-side costs next to the data path: the scheduler of the analytics
(insitu's, ``ray_dask_get``, dask threaded) and tunnel-aware dispatch (relayed vs direct)."""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import numpy as np

from benchmarks.harness import MIB, Runner, fmt_ms, timeit


def section_sched(repeat: int) -> dict[str, float]:
    """Per-step scheduling cost of a window-3 computation: insitu's scheduler, dask threaded, ray_dask_get."""
    import dask
    import dask.array as da
    import ray
    from ray.util.dask import ray_dask_get

    from insitu.dispatch import Dispatcher
    from insitu.graph import NodeScheduler, executor_on, make_array
    from insitu.layout import ArrayLayout
    from insitu.messages import ChunkRef

    node = ray.get_runtime_context().get_node_id()
    layout = ArrayLayout("u", (256, 256), "<f8", ((128, 128), (128, 128)),
                         tuple(((i, j), 2 * i + j) for i in range(2) for j in range(2)))  # fmt: skip
    window, where, arrays, local = [], {}, [], []
    for step in range(3):
        blocks = tuple(np.full((128, 128), float(step)) for _ in layout.owners)
        ref = ray.put(blocks)  # one object per node step, as the node actor stores it
        where[ref.hex()] = node
        chunks = [ChunkRef("u", ij, ref, node, k) for k, (ij, _) in enumerate(layout.owners)]
        window.append(make_array(layout, step, chunks, "bench"))
        arrays.append(np.block([[blocks[0], blocks[1]], [blocks[2], blocks[3]]]))
        local.append(da.from_array(arrays[-1], chunks=(128, 128)))
    dispatcher = Dispatcher("bench")
    executor = executor_on(node, 0, dispatcher)
    sched = NodeScheduler(where, lambda _node: executor, dispatcher)

    def expr(w: list) -> Any:
        return ((w[2] - w[0]) / 2).mean() + w[1].max()

    out = {}
    for name, fn in (
        ("insitu_s", lambda: dask.compute(expr(window), scheduler=sched)),
        ("ray_dask_get_s", lambda: dask.compute(expr(window), scheduler=ray_dask_get)),
        ("threaded_s", lambda: dask.compute(expr(local), scheduler="threads")),
    ):
        fn()
        out[name] = statistics.median(timeit(fn, repeat))
    print(f"sched   window-3 graph: insitu {fmt_ms(out['insitu_s'])} ms, "
          f"dask threaded {fmt_ms(out['threaded_s'])} ms,"
          f" ray_dask_get {fmt_ms(out['ray_dask_get_s'])} ms", flush=True)  # fmt: skip
    return out


def section_relay(runner: Runner, sizes: list[int], repeat: int) -> list[dict[str, Any]]:
    """Dispatch from the remote-marked raylet to a LAN raylet: relayed through the head vs direct.

    On this host the direct path exists (no filter), so the same call is timed both ways side by
    side; the relayed result crosses the head twice.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as Affinity

    ips = runner.cluster.node_ips
    if len(ips) < 3:
        raise RuntimeError("the relay section needs at least 3 raylets (head, LAN, remote)")
    ids = {n["NodeManagerAddress"]: n["NodeID"] for n in ray.nodes() if n["Alive"]}
    lan, remote = ids[ips[1]], ids[ips[-1]]

    @ray.remote(num_cpus=0)
    def from_remote(lan_node: str, nbytes: int, repeat: int) -> dict[str, float]:
        from insitu.dispatch import Dispatcher

        pin = {"scheduling_strategy": Affinity(node_id=lan_node, soft=False), "num_cpus": 0}
        d = Dispatcher(f"bench-relay-{os.getpid()}")

        def make(n: int) -> bytes:
            return bytes(n)

        plain = ray.remote(make).options(**pin)
        times: dict[str, list[float]] = {"direct": [], "relay": []}
        for i in range(repeat + 2):
            for way in ("direct", "relay"):  # interleaved, so drift hits both alike
                t = time.perf_counter()
                got = ray.get(plain.remote(nbytes), timeout=120) if way == "direct" else \
                    d.task(make, nbytes, options=pin).get(120)  # fmt: skip
                if i >= 2:  # warm-up: first worker lease, relay start
                    times[way].append(time.perf_counter() - t)
                assert len(got) == nbytes
        d.close()
        return {way: statistics.median(v) for way, v in times.items()}

    rows = []
    for size in [8, *sizes]:
        n = repeat if size <= 1 * MIB else max(5, repeat // 4)
        got = ray.get(from_remote.options(scheduling_strategy=Affinity(node_id=remote, soft=False)).remote(
            lan, size, n), timeout=1200)  # fmt: skip
        rows.append({"size": size, "direct_s": got["direct"], "relay_s": got["relay"],
                     "ratio": got["relay"] / got["direct"]})  # fmt: skip
        print(f"relay   {size:>10} B result: direct task {fmt_ms(got['direct'])} ms, relayed {fmt_ms(got['relay'])} "
              f"ms ({rows[-1]['ratio']:.2f}x)", flush=True)  # fmt: skip
    return rows
