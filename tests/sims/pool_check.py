"""Slice pools on a real 4-raylet cluster emulating two slices of two hosts (run by test_pool.py).

Raylets 0-1 carry ``insitu_slice_a``, raylets 2-3 ``insitu_slice_b``. Prints one JSON object
of observations; the test asserts on them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from typing import Any

from harness import progress as _progress
from harness import run_on_cluster

RESULTS: dict[str, Any] = {}
SLICES = {0: {"insitu_slice_a": 1.0}, 1: {"insitu_slice_a": 1.0}, 2: {"insitu_slice_b": 1.0},
          3: {"insitu_slice_b": 1.0}}  # fmt: skip


def progress(what: str) -> None:
    _progress("pool_check", what)


def main() -> int:
    def observe(_cluster: Any, base: str) -> dict[str, Any]:
        import ray

        end = time.monotonic() + 60
        while len([n for n in ray.nodes() if n["Alive"]]) < 4 and time.monotonic() < end:
            time.sleep(0.2)
        checks(base)
        return RESULTS

    return run_on_cluster("pool_check", observe, nodes=4, cpus_per_node=2, resources=SLICES)


def where(env: Any) -> list:
    return [env.slice_name, env.host_index, env.hosts, env.node_id, env.device_kind.value, env.device_count]


def nap(env: Any, seconds: float) -> int:
    time.sleep(seconds)
    return env.host_index


async def async_nap(env: Any, seconds: float) -> int:
    await asyncio.sleep(seconds)
    return env.host_index


def ids(pool: Any) -> list[str]:
    return [s.slice_id for s in pool.slices()]


def wait_until(cond: Any, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.2)
    return False


def checks(base: str) -> None:
    import ray

    from insitu.config import Config
    from insitu.errors import InsufficientSlicesError, SliceLostError, TaskCancelledError
    from insitu.pool import Grouping, SlicePool, SliceSpec, file_probe

    node_res = {n["NodeID"]: sorted(k for k in n["Resources"] if k.startswith("insitu_slice_"))
                for n in ray.nodes() if n["Alive"]}  # fmt: skip
    cfg = Config(pool_ready_deadline=10, pool_cancel_deadline=2, pool_health_deadline=5, pool_health_interval=1,
                 pool_drain_deadline=5)  # fmt: skip
    flag = os.path.join(base, "preempt")
    pool = SlicePool(SliceSpec(hosts=2), sizes=[3, 2, 1], name="chk", probe=file_probe(flag), config=cfg)
    all_hosts: list[Any] = []

    def remember_hosts() -> None:
        for s in pool.slices():
            all_hosts.extend(pool.reserved(s.slice_id).actor.call("hosts").get(30))

    progress("scale")
    RESULTS["scaled_to"] = pool.scale()
    first = pool.slices()
    RESULTS["first"] = [[s.slice_id, s.name, [node_res[n] for n in s.node_ids]] for s in first]
    RESULTS["distinct_nodes"] = len({n for s in first for n in s.node_ids})
    remember_hosts()

    progress("run on every host")
    by_slice = pool.run(where, timeout=60)
    RESULTS["run_by_slice"] = {sid: [r[:3] for r in rows] for sid, rows in by_slice.items()}
    RESULTS["run_nodes_match"] = all([r[3] for r in rows] == list(next(s for s in first if s.slice_id == sid).node_ids)
                                     for sid, rows in by_slice.items())  # fmt: skip
    RESULTS["run_devices"] = sorted({(r[4], r[5]) for rows in by_slice.values() for r in rows})
    RESULTS["run_flat"] = [r[:2] for r in pool.run(where, grouping=Grouping.FLAT, timeout=60)]

    progress("scale down and up")
    RESULTS["down"] = [pool.scale([1]), pool.size]
    RESULTS["up"] = [pool.scale([2]), pool.size, len(set(ids(pool)) - {s.slice_id for s in first})]
    remember_hosts()

    progress("infeasible sizes")
    big = SlicePool(SliceSpec(hosts=2, cpus_per_host=5), sizes=[1], name="big", config=cfg.replace(
        pool_ready_deadline=3))  # fmt: skip
    t = time.monotonic()
    try:
        big.scale()
        RESULTS["infeasible"] = "scaled"
    except InsufficientSlicesError as exc:
        RESULTS["infeasible"] = f"InsufficientSlicesError: {exc}"[:300]
    RESULTS["infeasible_s"] = round(time.monotonic() - t, 1)
    RESULTS["infeasible_pgs_left"] = [pg for pg in ray.util.placement_group_table().values()
                                      if pg["name"].startswith("insitu-big-") and pg["state"] != "REMOVED"]  # fmt: skip
    big.drain()
    try:
        pool.scale([3])
        RESULTS["three"] = "scaled"
    except InsufficientSlicesError as exc:
        RESULTS["three"] = type(exc).__name__
    RESULTS["after_three"] = pool.size

    progress("a host actor killed")
    before = ids(pool)
    victim = before[0]
    call = pool.submit(nap, 6)
    time.sleep(1)
    ray.kill(pool.reserved(victim).actor.call("hosts").get(30)[1])
    try:
        call.result(timeout=60)
        RESULTS["lost"] = "no error"
    except SliceLostError as exc:
        RESULTS["lost"] = f"SliceLostError: {exc}"[:200]
    pool.start_monitor()
    RESULTS["replaced"] = wait_until(lambda: victim not in ids(pool) and pool.size == 2, 60)
    RESULTS["after_kill"] = [pool.size, victim in ids(pool), len(set(ids(pool)) - set(before))]
    remember_hosts()

    progress("cancel")
    before = ids(pool)
    for name, fn in (("cancel_async", async_nap), ("cancel_sync", nap)):  # a coroutine; a thread that ignores it
        call = pool.submit(fn, 60)
        time.sleep(1)
        t = time.monotonic()
        replaced = call.cancel()
        try:
            call.result(timeout=30)
            RESULTS[name] = "no error"
        except TaskCancelledError:
            RESULTS[name] = "TaskCancelledError"
        RESULTS[f"{name}_s"] = round(time.monotonic() - t, 1)
        RESULTS[f"{name}_replaced"] = sorted(replaced)
    RESULTS["cancel_sync_replaced"] = RESULTS["cancel_sync_replaced"] == sorted(before)
    RESULTS["after_cancel"] = [pool.size, len(set(ids(pool)) & set(before))]
    RESULTS["works_after_cancel"] = pool.run(nap, 0, grouping=Grouping.FLAT, timeout=60)
    remember_hosts()

    progress("preemption probe")
    before = ids(pool)
    with open(flag, "w") as fh:
        fh.write("preempted")
    RESULTS["preempted"] = wait_until(lambda: not set(ids(pool)) & set(before), 60)
    os.unlink(flag)
    RESULTS["preempted_back"] = wait_until(lambda: pool.size == 2, 60)
    remember_hosts()

    progress("an unresponsive host (SIGSTOP)")
    before = ids(pool)
    frozen = pool.run(lambda env: os.getpid(), timeout=60)[before[1]][0]
    os.kill(frozen, signal.SIGSTOP)
    t = time.monotonic()
    RESULTS["unresponsive_replaced"] = wait_until(lambda: before[1] not in ids(pool) and pool.size == 2, 60)
    RESULTS["unresponsive_s"] = round(time.monotonic() - t, 1)
    RESULTS["unresponsive_other_kept"] = before[0] in ids(pool)
    remember_hosts()

    progress("drain")
    pool.submit(nap, 1)
    pool.drain()
    dead = 0
    for h in all_hosts:
        try:
            ray.get(h.busy.remote(), timeout=10)
        except ray.exceptions.RayActorError:
            dead += 1
        except ray.exceptions.GetTimeoutError:
            pass
    RESULTS["hosts_seen"] = len(all_hosts)
    RESULTS["hosts_dead"] = dead
    time.sleep(1)
    RESULTS["pgs_left"] = [pg["name"] for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]
    RESULTS["size_after_drain"] = pool.size


if __name__ == "__main__":
    sys.exit(main())
