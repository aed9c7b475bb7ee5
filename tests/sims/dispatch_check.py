"""Dispatch on a real 3-raylet cluster whose raylet 2 carries the remote marker (run by test_dispatch.py).

Prints one JSON object of observations; the test asserts on them.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from harness import progress as _progress
from harness import run_on_cluster

RESULTS: dict[str, object] = {}


def progress(what: str) -> None:
    _progress("dispatch_check", what)


def main() -> int:
    def observe(cluster: Any, _base: str) -> dict[str, object]:
        checks(cluster)
        return RESULTS

    return run_on_cluster("dispatch_check", observe, nodes=3, cpus_per_node=2, resources={2: {"insitu_remote": 1}})


def checks(cluster: Any) -> None:
    """Every observation, on the running cluster."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as Affinity

    from insitu.dispatch import Dispatcher, RelayLostError, Route, UnreachableRefError

    end = time.monotonic() + 60
    while len([n for n in ray.nodes() if n["Alive"]]) < 3 and time.monotonic() < end:
        time.sleep(0.2)
    ids = {}
    for n in ray.nodes():
        if n["Alive"]:
            ids[n["NodeManagerAddress"]] = n["NodeID"]
    head, lan, remote = (ids[ip] for ip in cluster.node_ips)
    on = {"head": head, "lan": lan, "remote": remote}

    def pin(node: str) -> dict:
        return {"scheduling_strategy": Affinity(node_id=node, soft=False), "num_cpus": 0}

    @ray.remote(num_cpus=0)
    def routes_from_here(run: str, targets: dict) -> dict:
        d = Dispatcher(run)
        out = {name: d.route(pin(node)).value for name, node in targets.items()}
        out["spread"] = d.route({"scheduling_strategy": "SPREAD"}).value
        out["remote-resource"] = d.route({"resources": {"insitu_remote": 0.01}}).value
        return out

    progress("routes")
    RESULTS["routes"] = {
        src: ray.get(routes_from_here.options(**pin(node)).remote("chk", on), timeout=120) for src, node in on.items()
    }

    def where(x: int) -> tuple[int, str]:
        return 2 * x, ray.get_runtime_context().get_node_id()

    class Counter:
        def __init__(self, start: int) -> None:
            self.n = start

        def add(self, k: int) -> tuple[int, str]:
            self.n += k
            return self.n, ray.get_runtime_context().get_node_id()

    @ray.remote(num_cpus=0)
    def from_remote(run: str, lan_node: str) -> dict:
        d = Dispatcher(run, relay_concurrency=4)
        t = d.task(where, 21, options=pin(lan_node))
        value, node = t.get(120)
        ref = ray.put(5)  # owned by the remote caller, nested: resolved on the head
        nested = d.task(lambda xs: sum(xs), [ref, 6], options=pin(lan_node)).get(120)
        a = d.actor(Counter, 10, options=pin(lan_node))
        c1 = a.call("add", 1).get(120)
        c2 = a.call("add", 2).get(120)
        many = [d.task(time.sleep, 0.5, options=pin(lan_node)) for _ in range(16)]  # 4 x concurrency

        def nest(x: int) -> int:
            return Dispatcher(run).task(where, x, options=pin(lan_node)).get(120)[0]

        inner = d.task(nest, 4, options=pin(head)).get(180)
        for m in many:
            m.get(180)
        # functions are pickled and exported once: the same one again, and look-alike lambdas that differ
        again = [d.task(where, k, options=pin(lan_node)).get(120)[0] for k in range(3)]
        lambdas = [d.task(lambda k=k: 10 * k, options=pin(lan_node)).get(120) for k in range(3)]
        return {
            "task": [value, node == lan_node, t.route.value],
            "nested_ref": nested,
            "actor": [c1[0], c2[0], c2[1] == lan_node, a.route.value],
            "many": len(many),
            "inner": inner,
            "again": again,
            "lambdas": lambdas,
        }

    progress("from remote")
    RESULTS["from_remote"] = ray.get(from_remote.options(**pin(remote)).remote("chk", lan), timeout=300)

    @ray.remote(num_cpus=0)
    def relay_lost(run: str, lan_node: str) -> dict:
        d = Dispatcher(run)
        slow = d.task(time.sleep, 30, options=pin(lan_node))
        time.sleep(2)
        ray.kill(d.relay())
        try:
            slow.get(60)
            lost = "no error"
        except RelayLostError as exc:
            lost = f"RelayLostError: {exc}"[:200]
        again = d.task(where, 1, options=pin(lan_node)).get(120)[0]
        retried = d.task(where, 3, options=pin(lan_node), retriable=True).get(120)[0]
        # a nested ref whose owner is gone cannot be read even from the head
        holder = ray.remote(Counter).options(**pin(lan_node)).remote(0)
        orphan = ray.get(holder.__ray_call__.remote(lambda self: [ray.put(7)]), timeout=60)
        ray.kill(holder)
        time.sleep(1)
        try:
            d.task(lambda xs: xs[0], orphan, options=pin(lan_node)).get(60)
            unreadable = "no error"
        except UnreachableRefError as exc:
            unreadable = f"UnreachableRefError: {str(exc).strip().splitlines()[-1]}"[:300]
        ray.kill(d.relay())
        return {"lost": lost, "again": again, "retried": retried, "route": slow.route == Route.RELAY,
                "unreadable": unreadable}  # fmt: skip

    progress("relay lost")
    RESULTS["relay_lost"] = ray.get(relay_lost.options(**pin(remote)).remote("chk2", lan), timeout=300)
    Dispatcher("never-relayed").close()  # nothing to end
    # every relay belonged to a Dispatcher of a task that returned: it ended with its last handle
    end = time.monotonic() + 20
    while True:
        alive = [a for a in ray.util.list_named_actors(all_namespaces=True) if "relay" in str(a)]
        if not alive or time.monotonic() > end:
            break
        time.sleep(0.5)
    RESULTS["relays_left"] = alive


if __name__ == "__main__":
    sys.exit(main())
