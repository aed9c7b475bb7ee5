"""Sections measuring insitu itself: floor, send and end-to-end, paced slowdown, hot-core send,
CPU per step of the control path, start-up and memory per rank, object store, scaling.

Each ``section_*`` returns JSON-ready rows; a failed size is retried (``harness.with_retries``).
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

from benchmarks.harness import (
    KIB,
    Runner,
    control_snapshot,
    cpu_per_step,
    empty_actor_call,
    floor,
    fmt_ms,
    mean_of_window,
    with_retries,
)


def section_floor(sizes: list[int], quick: bool) -> dict[str, Any]:
    """The one-copy floor per size (min/median/max) and the empty Ray actor call."""
    rows = [floor(s, 20 if quick else 100) for s in sizes]
    call = empty_actor_call(50 if quick else 300)
    for r in rows:
        f, w, e = r["copy_fresh"], r["copy_warm"], r["e2e_floor"]
        print(f"floor   {r['size'] // KIB:>7} KiB  copy fresh {fmt_ms(f['median'])} ms [{fmt_ms(f['min'])} -"
              f"{fmt_ms(f['max'])}]  warm {fmt_ms(w['median'])} ms  step floor (4 fresh copies + 1 read) "
              f"{fmt_ms(e['median'])} ms [{fmt_ms(e['min'])} -{fmt_ms(e['max'])}]", flush=True)  # fmt: skip
    print(f"floor   empty Ray actor call {fmt_ms(call['median'])} ms [{fmt_ms(call['min'])} -{fmt_ms(call['max'])}]",
          flush=True)  # fmt: skip
    return {"floor": rows, "empty_actor_call": call, "empty_actor_call_s": call["median"]}


def section_insitu(runner: Runner, sizes: list[int], steps: int, warmup: int, quick: bool) -> list[dict[str, Any]]:
    """Send cost and end-to-end time per step, 4 ranks on one node, back-to-back and paced."""
    rows = []
    # sleep-paced runs with insitu are the paced section's (64 KiB and 8 MiB, next to their baselines)
    modes = [("b2b", 1)] if quick else [("b2b", 1), ("b2b", 3), ("spin", 1)]
    for size in sizes:
        fl = floor(size, 20 if quick else 50)
        for pace, window in modes:
            opts: dict[str, Any] = {"chunk": size, "steps": steps, "warmup": warmup}
            if pace == "spin":
                opts.update(pace="spin", pace_arg=0.02)

            def one(opts: dict[str, Any] = opts, window: int = window) -> dict[str, Any]:
                return runner.sim(4, opts, analytics=mean_of_window, window=window)

            r = with_retries(f"insitu  {size // KIB:>7} KiB {pace:>5} w{window}", one)
            r.update(size=size, window=window, pace=pace, copy_fresh_s=fl["copy_fresh_s"],
                     copy_warm_s=fl["copy_warm_s"], e2e_floor_s=fl["e2e_floor_s"])  # fmt: skip
            rows.append(r)
            if "error" in r:
                continue
            print(f"insitu  {size // KIB:>7} KiB {pace:>5} w{window}: send median {fmt_ms(r['send_median_s'])} ms "
                  f"p95 {fmt_ms(r['send_p95_s'])} ms = {r['send_median_s'] / fl['copy_fresh_s']:6.2f}x fresh copy; "
                  f"e2e/step {fmt_ms(r.get('e2e_per_step_s'))} ms; loop {fmt_ms(r['loop_median_s'])} ms",
                  flush=True)  # fmt: skip
    return rows


def section_paced(runner: Runner, sizes: list[int], steps: int, warmup: int) -> list[dict[str, Any]]:
    """Slowdown: the same loop without insitu (twice, for the noise floor) and with it.

    Sleep-paced (200 ms) on 4 ranks, stencil-paced on ``cores - 1`` ranks.
    """
    rows = []
    cores = os.cpu_count() or 2
    for size in sizes:
        for pace, arg, ranks in (("sleep", 0.2, 4), ("stencil", 300, max(1, cores - 1))):
            opts = {"chunk": size, "steps": steps, "warmup": warmup, "pace": pace, "pace_arg": arg}

            def one(opts: dict[str, Any] = opts, ranks: int = ranks) -> dict[str, Any]:
                b1 = runner.sim(ranks, {**opts, "insitu": False})["loop_mean_s"]
                with_insitu = runner.sim(ranks, opts, analytics=mean_of_window)
                b2 = runner.sim(ranks, {**opts, "insitu": False})["loop_mean_s"]  # before and after: drift shows
                return {"baseline_loop_s": [b1, b2], "noise": abs(b2 - b1) / min(b1, b2),
                        "insitu_loop_s": with_insitu["loop_mean_s"],
                        "slowdown": with_insitu["loop_mean_s"] / statistics.mean([b1, b2]) - 1,
                        "send_median_s": with_insitu["send_median_s"],
                        "send_p95_s": with_insitu["send_p95_s"]}  # fmt: skip

            row = with_retries(f"paced   {size // KIB:>7} KiB {pace}", one)
            row.update(size=size, pace=pace, ranks=ranks)
            rows.append(row)
            if "error" not in row:
                print(f"paced   {size // KIB:>7} KiB {pace:>7} {ranks} rank(s): slowdown "
                      f"{row['slowdown'] * 100:+6.2f} % (noise floor {row['noise'] * 100:5.2f} %), "
                      f"send median {fmt_ms(row['send_median_s'])} ms",
                      flush=True)  # fmt: skip
    return rows


def section_hotcore(runner: Runner, sizes: list[int], steps: int, call_s: float | None) -> list[dict[str, Any]]:
    """The intrinsic cost of ``send``: one rank, a 10 ms busy phase between sends, a no-op analytics."""
    rows = []
    for size in sizes:

        def one(size: int = size) -> dict[str, Any]:
            opts = {"chunk": size, "steps": steps, "warmup": 10, "pace": "spin", "pace_arg": 0.01, "in_flight": 4}
            return runner.sim(1, opts)

        r = with_retries(f"hotcore {size // KIB:>7} KiB", one)
        r.update(size=size, pace="spin 10 ms", empty_actor_call_s=call_s)
        rows.append(r)
        if "error" not in r:
            ratio = f" = {r['send_median_s'] / call_s:5.2f}x an empty actor call" if call_s else ""
            print(f"hotcore {size // KIB:>7} KiB, 1 rank, 10 ms busy phase: send median {fmt_ms(r['send_median_s'])} ms"
                  f" p95 {fmt_ms(r['send_p95_s'])} ms{ratio}", flush=True)  # fmt: skip
    return rows


def section_cpu(runner: Runner, sizes: list[int], steps: int, warmup: int) -> list[dict[str, Any]]:
    """CPU seconds per step of every control-path process over a back-to-back run, 4 ranks, one raylet.

    /proc/<pid>/stat (utime + stime) of every process is read when the analytics finishes
    step ``warmup`` and again when it finishes the last step.
    """
    rows = []
    sids = runner.cluster.pids()
    total = steps + warmup
    snaps: dict[str, Any] = {}
    for size in sizes:

        def on_step(run: str, step: int) -> None:
            if step == warmup:
                snaps["before"] = control_snapshot(sids, run)
            elif step == total - 1:
                snaps["after"] = control_snapshot(sids, run)

        def one(size: int = size) -> dict[str, Any]:
            snaps.clear()
            r = runner.sim(4, {"chunk": size, "steps": steps, "warmup": warmup}, analytics=mean_of_window,
                           on_step=on_step)  # fmt: skip
            roles = cpu_per_step(snaps["before"], snaps["after"], total - 1 - warmup)
            return {"e2e_per_step_s": r.get("e2e_per_step_s"), "roles": roles,
                    "total_per_step_s": sum(v["per_step_s"] for v in roles.values())}  # fmt: skip

        row = with_retries(f"cpu     {size // KIB:>7} KiB", one)
        row.update(size=size, ranks=4, nodes=1)
        rows.append(row)
        if "error" not in row:
            by_cost = sorted(row["roles"].items(), key=lambda kv: -kv[1]["per_step_s"])
            parts = ", ".join(f"{k} ({int(v['processes'])}) {v['per_step_s'] * 1e3:.2f}" for k, v in by_cost)
            print(
                f"cpu     {size // KIB:>7} KiB b2b: ms of CPU per step: {parts}; total "
                f"{row['total_per_step_s'] * 1e3:.2f} ms (e2e {fmt_ms(row['e2e_per_step_s'])} ms)",
                flush=True,
            )
    return rows


def actor_start(runner: Runner) -> float:
    """Seconds to start one empty actor per raylet (a new Ray worker process each) and call it once.

    The node actors of a run cost at least this at its set-up: the floor of Ray's part of it.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as Affinity

    @ray.remote(num_cpus=0)
    class Empty:
        def ping(self) -> int:
            return os.getpid()

    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    t0 = time.perf_counter()
    actors = [Empty.options(scheduling_strategy=Affinity(node_id=n, soft=False)).remote() for n in nodes]
    ray.get([a.ping.remote() for a in actors], timeout=300)
    took = time.perf_counter() - t0
    for a in actors:
        ray.kill(a)
    print(f"startup {len(nodes)} empty actors, one per raylet, started and called in {took:.2f} s", flush=True)
    return took


_DRIVERS = ("spawned", "prestarted", "no_prewarm")  # how the run driver starts (section_startup)


def section_startup(runner: Runner, ranks: int = 16, repeats: int = 2) -> dict[str, Any]:
    """Start-up and memory per rank at ``ranks`` ranks on every raylet: insitu vs the same processes without it.

    Start-up is the wall time from launching ``mpiexec`` to the barrier after every rank's
    set-up (measured on rank 0). insitu runs with the run driver spawned by rank 0 and with
    it pre-started (``python -m insitu.driver --run RUN --create-head --ready-file F``) as the
    batch script does: started when the cluster is up, it has the head start the node processes
    ahead, and the ranks are launched once it is ready; and, to compare the designs in one
    run, pre-started with ``--no-prewarm`` (node processes started at registration, as before).
    Memory added is each rank's max RSS after the set-up minus before, insitu run minus the
    paired run without insitu.
    """
    nodes = len(runner.cluster.node_ips)
    opts = {"chunk": 64 * KIB, "steps": 5, "warmup": 0}
    runs: dict[str, list[dict[str, Any]]] = {"without": [], "spawned": [], "prestarted": [], "no_prewarm": []}
    for i in range(repeats):  # interleaved, so drift hits all three alike
        for kind in runs:

            def one(kind: str = kind) -> dict[str, Any]:
                if kind == "without":
                    return runner.sim(ranks, {**opts, "insitu": False}, nodes=nodes)
                return runner.sim(ranks, opts, nodes=nodes, analytics=mean_of_window, driver=kind != "spawned",
                                  prewarm=kind == "prestarted")  # fmt: skip

            runs[kind].append(with_retries(f"startup {kind} #{i + 1}", one))
    ok = {k: [r for r in v if "error" not in r] for k, v in runs.items()}
    out: dict[str, Any] = {"ranks": ranks, "nodes": nodes, "repeats": repeats,
                           "errors": [r["error"] for v in runs.values() for r in v if "error" in r],
                           "ray_actor_start_s": actor_start(runner)}  # fmt: skip
    for kind, rs in ok.items():
        if rs:
            out[kind] = {"startup_s": [r["startup_s"] for r in rs],
                         "startup_median_s": statistics.median(r["startup_s"] for r in rs),
                         "init_rank0_s": [r["init_rank0_s"] for r in rs], "init_max_s": [r["init_max_s"] for r in rs],
                         "attempts": [r["attempts"] for r in rs]}  # fmt: skip
    if not ok["without"]:
        return out
    base = out["without"]["startup_median_s"]
    for kind in _DRIVERS:
        if kind in out:
            out[kind]["ratio"] = out[kind]["startup_median_s"] / base
    pairs = list(zip(ok["without"], ok["spawned"] + ok["prestarted"] + ok["no_prewarm"], strict=False))
    if pairs:
        per_rank = [max(b - a for a, b in zip(w["rss_added_mb"], s["rss_added_mb"], strict=True)) for w, s in pairs]
        added = [[b - a for a, b in zip(w["rss_added_mb"], s["rss_added_mb"], strict=True)] for w, s in pairs]
        out["rss_added_mb_per_rank"] = added[0]
        out["rss_added_max_mb"] = max(per_rank)
        out["rss_added_rank0_mb"] = max(a[0] for a in added)
        out["rss_added_others_median_mb"] = statistics.median(x for a in added for x in a[1:])
    drivers = "; ".join(f"{k} driver {out[k]['startup_median_s']:.2f} s ({out[k]['ratio']:.2f}x)"
                        for k in _DRIVERS if k in out)  # fmt: skip
    nan = float("nan")
    print(f"startup {ranks} ranks on {nodes} raylets: without insitu {base:.2f} s; {drivers}; RSS added max "
          f"{out.get('rss_added_max_mb', nan):.1f} MB (rank 0 {out.get('rss_added_rank0_mb', nan):.1f} MB)",
          flush=True)  # fmt: skip
    return out


def section_memory(runner: Runner, steps: int) -> dict[str, Any]:
    """Object-store high-water mark over many steps (window 3) and the bytes left after close."""
    from ray.util.state import list_objects

    chunk = 64 * KIB

    def chunk_bytes() -> int:
        # a node actor stores an array's blocks of a node's step as one object (plus metadata)
        objs = list_objects(address=runner.cluster.address, limit=10000, raise_on_missing_output=False)
        step = 4 * chunk
        sizes = {o.object_id: o.object_size or 0 for o in objs if step <= (o.object_size or 0) < step + 4096}
        return sum(sizes.values())

    samples: list[int] = []

    def one() -> dict[str, Any]:
        samples.clear()
        runner.sim(4, {"chunk": chunk, "steps": steps, "warmup": 0}, analytics=mean_of_window, window=3,
                   on_step=lambda _run, step: samples.append(chunk_bytes()) if step % 100 == 0 else None)  # fmt: skip
        time.sleep(2)
        return {"steps": steps, "max_object_store_bytes": max(samples), "bound_bytes": (3 + 2) * 4 * chunk * 1.25,
                "bytes_after_close": chunk_bytes()}  # fmt: skip

    out = with_retries("memory ", one)
    if "error" not in out:
        print(f"memory  {steps} steps of 4 x 64 KiB, window 3: at most {out['max_object_store_bytes'] / KIB:.0f} KiB "
              f"of chunks (bound {out['bound_bytes'] / KIB:.0f} KiB), {out['bytes_after_close']} bytes left after "
              "close", flush=True)  # fmt: skip
    return out


def section_scaling(runner: Runner, steps: int) -> list[dict[str, Any]]:
    """Time per step / one-copy floor of the same bytes, and head messages per step, 1-16 ranks on 1-4 raylets."""
    rows = []
    size = 64 * KIB
    for ranks, nodes in ((1, 1), (2, 1), (4, 1), (4, 2), (8, 2), (8, 4), (16, 4)):
        nodes = min(nodes, len(runner.cluster.node_ips))

        def one(ranks: int = ranks, nodes: int = nodes) -> dict[str, Any]:
            opts = {"chunk": size, "steps": steps, "warmup": 5}
            return runner.sim(ranks, opts, nodes=nodes, analytics=mean_of_window)

        r = with_retries(f"scaling {ranks:>2} ranks on {nodes}", one)
        fl = floor(size * ranks, 30)
        row = {"ranks": ranks, "nodes": nodes, "e2e_per_step_s": r.get("e2e_per_step_s"), "attempts": r["attempts"],
               "floor_s": fl["copy_fresh_s"], "ratio": (r.get("e2e_per_step_s") or float("nan")) / fl["copy_fresh_s"],
               "head_messages_per_node_per_step": r.get("head_messages_per_node_per_step"),
               "send_median_s": r.get("send_median_s"), "error": r.get("error")}  # fmt: skip
        rows.append(row)
        print(f"scaling {ranks:>2} ranks on {nodes} raylet(s): e2e/step {fmt_ms(row['e2e_per_step_s'])} ms = "
              f"{row['ratio']:8.1f}x floor; head messages per node per step {row['head_messages_per_node_per_step']}",
              flush=True)  # fmt: skip
    return rows
