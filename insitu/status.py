"""``insitu status --run RUN [--follow] [--json]``: where a live run stands (schema in docs/status.md).

One call asks the run's head for its figures (steps, consumers, retention; plain data from its
memory) and every node actor for its ranks' (send time p50/p95 over the last 200 calls, steps
skipped and dropped with the reason), and adds the store bytes insitu holds per node: for each
array, the steps the head still references (retained for windows, queued for consumers) times
that node's block bytes of the array (from the layouts).

Examples
--------
>>> from insitu.layout import ArrayLayout
>>> lay = ArrayLayout("u", (4, 6), "<f8", ((2, 2), (6,)), (((0, 0), 0), ((1, 0), 1)))
>>> node_bytes([lay], ("a", "b"), {"u": 3})
{'a': 288, 'b': 288}
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from insitu.config import Config
from insitu.errors import ContractError
from insitu.layout import ArrayLayout

__all__ = ["SCHEMA", "collect", "fixed", "main_status", "node_bytes", "render"]

SCHEMA = 1
"""Version of the ``--json`` document (docs/status.md); bumped when a field changes meaning."""


def node_bytes(layouts: Sequence[ArrayLayout], rank_nodes: Sequence[str], held: dict[str, int]) -> dict[str, int]:
    """Store bytes per node: for each array, ``held[array]`` steps × the node's blocks of it."""
    out = dict.fromkeys(rank_nodes, 0)
    for lay in layouts:
        steps = held.get(lay.name, 0)
        if not steps:
            continue
        itemsize = np.dtype(lay.dtype).itemsize
        for block, rank in lay.owners:
            shape = [lay.chunks[d][k] for d, k in enumerate(block)]
            out[rank_nodes[rank]] += steps * itemsize * math.prod(shape)
    return out


def collect(
    run: str, config: Config, timeout: float = 10.0, nodes: list[dict[str, Any]] | None = None,
    info: Any = None,
) -> dict[str, Any]:
    """The status document of ``run`` (this process must be connected to the run's Ray cluster).

    ``nodes`` and ``info``: the head's node list and the run's :class:`~insitu.messages.RunInfo`
    from an earlier call (neither changes once the run is registered; :func:`fixed` gets both).
    Every node actor is asked at once; one that does not answer within ``timeout`` is reported
    as such, so a stuck node costs one ``timeout`` per call, not one each.
    """
    import ray

    from insitu.actors.head import find_head
    from insitu.messages import RunInfo

    head = find_head(run, config.namespace)
    if head is None:
        raise ContractError(
            f"no run {run!r} on the cluster at {config.address} (namespace {config.namespace!r}): it has not "
            "started, or it ended and was reclaimed"
        ) from None
    doc: dict[str, Any] = {"schema": SCHEMA, **ray.get(head.status.remote(), timeout=timeout)}
    if not isinstance(info, RunInfo):
        info = ray.get(head.run_info.remote(0), timeout=timeout)
    if doc["simulation"] and not nodes:
        nodes = ray.get(head.nodes.remote(), timeout=timeout)
    entries = [{k: v for k, v in n.items() if k != "actor"} for n in nodes or []]
    if doc["simulation"]:
        doc["simulation"]["nodes"] = entries
    asked = {n["id"]: n["actor"].status.remote() for n in nodes or []}
    ready, _ = ray.wait(list(asked.values()), num_returns=len(asked), timeout=timeout) if asked else ([], [])
    figures: dict[str, Any] = {}
    for node, ref in asked.items():
        if ref not in ready:
            figures[node] = {"error": f"no answer within {timeout:g} s"}
            continue
        try:
            figures[node] = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - a dead node is part of the answer
            figures[node] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    store = node_bytes(info.layouts, info.rank_nodes, doc["held_steps"]) if isinstance(info, RunInfo) else {}
    ranks: list[dict[str, Any]] = []
    for entry in doc["simulation"]["nodes"] if doc["simulation"] else []:
        node = entry["id"]
        entry["store_bytes"] = store.get(node, 0)
        entry["process"] = {k: v for k, v in figures.get(node, {}).items() if k != "ranks"}
        for rank, fig in figures.get(node, {}).get("ranks", {}).items():
            ranks.append({"rank": int(rank), "node": node, **fig})
    doc["ranks"] = sorted(ranks, key=lambda r: r["rank"])
    doc["skipped"] = max((r["skipped"] for r in ranks), default=0)
    doc["dropped"] = max((r["dropped"] for r in ranks), default=0)
    doc["drop_reasons"] = sorted({r["reason"] for r in ranks if r["reason"]})
    return doc


def fixed(run: str, config: Config) -> tuple[list[dict[str, Any]] | None, Any]:
    """The head's node list and the run's ``RunInfo``, once the simulation registered (``(None, None)``
    before, or without the run): what :func:`collect` need not ask again."""
    import ray

    from insitu.actors.head import find_head
    from insitu.messages import RunInfo

    head = find_head(run, config.namespace)
    if head is None:
        return None, None  # collect names the problem
    nodes = ray.get(head.nodes.remote(), timeout=10) or None
    info = ray.get(head.run_info.remote(0), timeout=10)
    return (nodes, info) if nodes and isinstance(info, RunInfo) else (None, None)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def render(doc: dict[str, Any]) -> str:
    """The status document as text for a terminal."""
    steps = doc["steps"]
    lines = [f"run {doc['run']}: {doc['state']}, last complete step {steps['last']}, "
             f"{steps['assembled']} steps assembled, {steps.get('in_flight', 0)} in flight, "
             f"ranks told '{doc['ranks_told']}'"]  # fmt: skip
    if doc["end"]:
        lines.append(f"  ended: {doc['end']['reason']} {doc['end']['message']}".rstrip())
    for a in steps["assembling"]:
        lines.append(f"  assembling step {a['step']} ({a['arrays']}): waiting for {len(a['missing_nodes'])} node(s)")
    if doc["restart_pending_s"] is not None:
        lines.append(f"  a supervised analytics is restarting ({doc['restart_pending_s']:.0f} s of grace left)")
    for r in doc.get("node_restarts", []):
        gap = "down" if r["resume"] is None else f"steps {r['after'] + 1}..{r['resume'] - 1} lost"
        lines.append(f"  node {r['node'][:12]} process restarted (epoch {r['epoch']}): {gap}")
    lines.append(f"  skipped {doc['skipped']}, dropped {doc['dropped']}"
                 + (f" ({'; '.join(doc['drop_reasons'])})" if doc["drop_reasons"] else ""))  # fmt: skip
    lines.append("consumers:")
    for c in doc["consumers"]:
        failure = f", failure: {c['failure'].splitlines()[0]}" if c["failure"] else ""
        lines.append(f"  #{c['incarnation']} {c['kind']}: {c['state']}, completed {c['completed']}, lag {c['lag']}, "
                     f"queued {c['queued']}{failure}")  # fmt: skip
        if c.get("stderr_tail"):  # a failed supervised analytics: its last stderr lines
            lines += [f"      | {line}" for line in c["stderr_tail"].splitlines()]
    for n in (doc["simulation"] or {}).get("nodes", []):
        proc = n["process"]
        where = f"error {proc['error']}" if "error" in proc else f"pid {proc.get('pid')}"
        lines.append(f"node {n['ip'] or n['id'][:12]} ({n['id'][:12]}): ranks {n['ranks']}, route {n['route']}, "
                     f"store {n['store_bytes'] / 2**20:.1f} MiB, node process {where}")  # fmt: skip
    for r in doc["ranks"]:
        lines.append(f"  rank {r['rank']}: send p50 {_ms(r['send_p50_ms'])} ms, p95 {_ms(r['send_p95_ms'])} ms, "
                     f"{r['calls']} calls")  # fmt: skip
    return "\n".join(lines)


def main_status(run: str | None, address: str | None, as_json: bool, follow: bool, interval: float = 1.0) -> int:
    """``insitu status``: print the document once, or refresh it in place until the run ends."""
    from insitu.config import resolve_run
    from insitu.process import acquire_ray, release_ray

    config = Config.from_env()
    config = config.replace(address=address or config.address)
    run = resolve_run(run, config)
    acquire_ray(config, f"insitu status --run {run}")
    try:
        nodes: list[dict[str, Any]] | None = None
        info: Any = None
        while True:
            if nodes is None:
                nodes, info = fixed(run, config)
            doc = collect(run, config, nodes=nodes, info=info)
            text = json.dumps(doc) if as_json else render(doc)
            if follow and not as_json and sys.stdout.isatty():
                text = "\x1b[H\x1b[2J" + text  # refresh in place
            print(text, flush=True)
            if not follow or doc["state"] == "ended":
                return 0
            time.sleep(interval)
    finally:
        release_ray()
