"""Scale model of the head: the real ``HeadActor`` driven by K impersonated nodes.

1,024 node actors do not fit on a 2-core machine, so one ``Fleet`` actor plays all K
nodes: it answers the head's ``start``/``update`` calls for every node and sends one
``node_step`` per node and step, exactly the messages K ``NodeActor`` s would send
(``ranks_per_node`` chunk refs each). One consumer (this process) attaches like an
analytics, receives each complete step and reports it done, which makes the head push
a status to every node. Steps run one at a time (send, assemble, deliver, done, push),
so nothing overlaps and the CPU per step of each process is that step's cost.

Measured per K: the head's CPU per step (utime + stime of its worker process), the
latency from the fleet's first ``node_step`` to the consumer's receipt, the fleet's and
the consumer's CPU per step (the nodes' and the analytics' share of the control path),
and the calls per step into and out of the head, and the head's CPU per ``status()`` call
(``insitu status``; target ≤ 1 ms). The head's CPU at 10,000 nodes is projected linearly
from the two largest K.

Usage::

    python -m benchmarks.scale_model                      # K = 1, 16, 128, 1024
    python -m benchmarks.scale_model --nodes 1,16 --steps 10 --out /tmp/scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` in seconds (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _fleet_class() -> Any:
    import numpy as np
    import ray

    from insitu.messages import NodeStep

    @ray.remote(num_cpus=0)
    class Fleet:
        """K impersonated node actors in one process (see the module docstring)."""

        def __init__(self, nodes: list[str], parents: list[Any]) -> None:
            self.nodes = nodes
            self.parents = parents  # per node: the head, or its group's relay
            self.updates = 0
            self.sent_at: dict[int, float] = {}
            self.seq = 0

        async def start(self, status: Any, parent: Any = None) -> str:
            return "\0scale-model-fleet"

        async def update(self, status: Any) -> None:
            self.updates += 1

        async def send_step(self, step: int) -> None:
            self.sent_at[step] = time.time()
            for node, parent in zip(self.nodes, self.parents, strict=True):
                ref = ray.put(np.zeros(4))  # each node stores its blocks of the array as one object
                parent.node_step.remote(NodeStep(node, step, ("u",), (ref,), self.seq))
            self.seq += 1

        async def info(self) -> dict[str, Any]:
            return {"pid": os.getpid(), "updates": self.updates, "sent_at": self.sent_at}

    return Fleet


def measure(k: int, steps: int, ranks_per_node: int, fanin: int, warmup: int = 3) -> dict[str, Any]:
    """Drive a fresh head with ``k`` impersonated nodes for ``steps`` steps; return the numbers."""
    import ray

    from insitu.actors.head import HeadActor, relay_name
    from insitu.analytics import _link_class
    from insitu.config import Config
    from insitu.layout import ArraySpec, validate_layout
    from insitu.messages import SimInfo, StepData

    run = f"scale-{k}-{fanin}-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    cfg = Config(address="local", deadline=300.0, reclaim_deadline=600.0, fanin=fanin)
    head = HeadActor.options(name=f"insitu-head-{run}", namespace="insitu").remote(run, cfg)  # type: ignore[attr-defined]
    nodes = [f"{i:08x}" + "0" * 48 for i in range(k)]
    n = k * ranks_per_node
    layouts = validate_layout([{"u": ArraySpec("u", (n,), "f8", start=(r,), shape=(1,))} for r in range(n)])
    rank_nodes = tuple(nodes[r // ranks_per_node] for r in range(n))
    # the head makes one relay per `fanin` sorted nodes when k > fanin; the fleet sends to them by name
    fleet_parents: list[Any] = [head] * k
    info = SimInfo(n, tuple(layouts.values()), rank_nodes, 2)
    fleet_cls = _fleet_class()
    placeholder = fleet_cls.remote(nodes, fleet_parents)
    ray.get(head.register_simulation.remote(info, dict.fromkeys(nodes, placeholder)))
    link = _link_class().remote()
    cid = ray.get(head.attach.remote(link, {"u": 1}, "scale-model")).consumer
    relay_names = set(ray.get(head.run_info.remote(60.0)).relays)
    relays = [ray.get_actor(name, namespace="insitu") for name in sorted(relay_names)]
    if relays:  # nodes send to their level-1 relay (the head tells them at start; the fleet looks it up)
        for i in range(0, k, fanin):
            first = ray.get_actor(relay_name(run, 1, i // fanin), namespace="insitu")
            fleet_parents[i : i + fanin] = [first] * len(nodes[i : i + fanin])
    fleet = placeholder if not relays else fleet_cls.remote(nodes, fleet_parents)
    pids = {"head": ray.get(head.stats.remote())["pid"], "fleet": ray.get(fleet.info.remote())["pid"]}
    if fleet is not placeholder:  # the nodes' status pushes land in the placeholder: nodes' CPU too
        pids["placeholder"] = ray.get(placeholder.info.remote())["pid"]
    relay_pids = [ray.get(r.stats.remote())["pid"] for r in relays]
    received: dict[int, float] = {}

    def updates() -> int:  # status pushes arrive at the placeholder (the nodes' handle the head holds)
        return int(ray.get(placeholder.info.remote())["updates"])

    def one_step(step: int) -> None:
        fleet.send_step.remote(step)
        while step not in received:
            got = ray.get(head.next_steps.remote(cid, 60.0))
            for item in got if isinstance(got, list) else []:
                if isinstance(item, StepData):  # resolved as the analytics does: group objects of relays
                    parts, found = list(item.parts), 0
                    while parts:
                        found += sum(1 for p in parts if p[1] not in relay_names)
                        groups = ray.get([r for _, unit, r in parts if unit in relay_names])
                        parts = [("u", unit, r) for g in groups for unit, r in g]
                    assert found == k
                    received[item.step] = time.time()
        head.next_steps.remote(cid, 0.001, (step, ()))  # the completion rides on the next poll, as in Analytics
        pushes = ray.get(head.stats.remote())["pushes"]  # wait until this step's push reached every node
        while updates() < pushes * k:
            time.sleep(0.001)

    def cpu() -> dict[str, float]:
        out = {name: cpu_seconds(pid) for name, pid in pids.items()}
        out["relays"] = sum(cpu_seconds(p) for p in relay_pids)
        out["consumer"] = time.process_time()
        return out

    for step in range(warmup):
        one_step(step)
    c0, calls0 = cpu(), updates()
    for step in range(warmup, warmup + steps):
        one_step(step)
    c1, calls1 = cpu(), updates()
    sent_at = ray.get(fleet.info.remote())["sent_at"]
    latency = [received[s] - sent_at[s] for s in range(warmup, warmup + steps)]
    # insitu status: the head's CPU per status() call (its whole CPU over the calls, idle share included)
    ray.get(head.status.remote())
    h0, calls = cpu_seconds(pids["head"]), 50
    for _ in range(calls):
        doc = ray.get(head.status.remote())
    status_ms = (cpu_seconds(pids["head"]) - h0) / calls * 1e3
    assert doc["simulation"]["nodes"] == k
    h0 = cpu_seconds(pids["head"])  # ... and per nodes() call (the node list: once per insitu status command)
    for _ in range(calls):
        listed = ray.get(head.nodes.remote())
    nodes_ms = (cpu_seconds(pids["head"]) - h0) / calls * 1e3
    assert len(listed) == k
    per_step = {p: (c1[p] - c0[p]) / steps * 1e3 for p in c0}
    per_step["fleet"] += per_step.pop("placeholder", 0.0)
    head_stats = ray.get(head.stats.remote())
    for actor in (head, fleet, placeholder, link, *relays):
        ray.kill(actor)
    return {
        "nodes": k,
        "fanin": fanin,
        "relays": len(relays),
        "head_units": head_stats["units"],
        "ranks_per_node": ranks_per_node,
        "steps": steps,
        "head_cpu_ms_per_step": per_step["head"],
        "relays_cpu_ms_per_step": per_step["relays"],
        "nodes_cpu_ms_per_step": per_step["fleet"],
        "consumer_cpu_ms_per_step": per_step["consumer"],
        "control_cpu_ms_per_step": sum(per_step.values()),
        "latency_ms_median": statistics.median(latency) * 1e3,
        "head_cpu_ms_per_status_call": status_ms,
        "head_cpu_ms_per_nodes_call": nodes_ms,
        "head_calls_in_per_step": head_stats["units"] + 2,  # one per node or relay, plus next_steps and done
        "head_calls_out_per_step": head_stats["units"],  # one status push per node or relay
        "node_status_deliveries_per_step": (calls1 - calls0) / steps,
    }


def project(rows: list[dict[str, Any]], target: int) -> float:
    """Head CPU per step at ``target`` nodes, linear through the two largest measured K."""
    a, b = sorted(rows, key=lambda r: r["nodes"])[-2:]
    slope = (b["head_cpu_ms_per_step"] - a["head_cpu_ms_per_step"]) / (b["nodes"] - a["nodes"])
    return b["head_cpu_ms_per_step"] + slope * (target - b["nodes"])


def main(argv: list[str] | None = None) -> int:
    """Run the scale model and print one line per K (JSON to ``--out``)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale_model", description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", default="1,16,128,1024", help="comma-separated K")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--ranks-per-node", type=int, default=4)
    p.add_argument("--fanins", default="1000000,32", help="relay fan-in per row (1000000: no relays, the old design)")
    p.add_argument("--out", default=None, help="write the JSON here")
    args = p.parse_args(argv)
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=2, namespace="insitu", include_dashboard=False, logging_level="WARNING",
             configure_logging=False, log_to_driver=False)  # fmt: skip
    try:
        rows = []
        for fanin in (int(x) for x in args.fanins.split(",")):
            for k in (int(x) for x in args.nodes.split(",")):
                row = measure(k, args.steps, args.ranks_per_node, fanin)
                rows.append(row)
                print(f"fanin {fanin:7d} K={k:5d}  head {row['head_cpu_ms_per_step']:7.2f} ms CPU/step  relays "
                      f"{row['relays_cpu_ms_per_step']:7.2f}  nodes {row['nodes_cpu_ms_per_step']:7.2f}  consumer "
                      f"{row['consumer_cpu_ms_per_step']:6.2f}  control total {row['control_cpu_ms_per_step']:7.2f}  "
                      f"latency {row['latency_ms_median']:7.2f} ms  head calls out/step "
                      f"{row['head_calls_out_per_step']}  status call {row['head_cpu_ms_per_status_call']:.3f} ms CPU, "
                      f"nodes call {row['head_cpu_ms_per_nodes_call']:.3f} ms",
                      flush=True)  # fmt: skip
        result: dict[str, Any] = {"rows": rows}
        projected: dict[str, dict[str, float]] = {}
        for fanin in {r["fanin"] for r in rows}:
            mine = [r for r in rows if r["fanin"] == fanin]
            if len(mine) >= 2:
                projected[str(fanin)] = {str(t): project(mine, t) for t in (1024, 10000)}
        result["projected_head_cpu_ms_per_step"] = projected
        print("projected head CPU per step (per fanin, at 1024 and 10000 nodes):", json.dumps(projected))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
