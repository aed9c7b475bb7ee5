"""Long-run soak (issue 17 item 6): a run whose node processes are SIGKILLed and restarted.

``python -m benchmarks.soak [--steps 10000] [--kill-every 2000] [--sample-every 500] [--chunk 65536]
[--pace 0.01] [--out benchmarks/results/soak-DATE.json]`` runs 4 ranks (2 per raylet, 2 raylets of a private
cluster) sending ``--chunk`` bytes per rank and step, and an analytics in this process checking
every value. At every multiple of ``--kill-every`` steps but the last (as the analytics sees
them) the node process of the other node than the last time is SIGKILLed; it is restarted
(``INSITU_NODE_RESTARTS``) and the run goes on. Every ``--sample-every`` steps it samples, per
process of the run (ranks, node processes, head, this consumer): RSS and open file
descriptors, and the store bytes per node (insitu's own accounting, as ``insitu status``). Verdicts, all in the JSON:

* ``loss_equals_gaps``: the steps the analytics did not get are exactly those inside the gaps it
  was told of (``Gap.missing``, plus steps whose blocks died with a process), and every rank's
  dropped steps lie inside those gaps;
* ``flat``: from the second sample on, no process role's RSS grows by more than 25 MiB + 10 %,
  its descriptors by more than 8, and the store stays within (in flight + 2) steps per node;
* ``nothing_left``: after the run, no process with the run in its environment and no staging file.

:func:`soak` is what the test suite runs in a short form (1,000 steps, two kills).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _rss_fds(pid: int) -> tuple[float, int] | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return None
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return rss / 1024, fds


def _run_processes(run: str) -> list[int]:
    """Processes carrying the run in their environment (ranks, mpiexec)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if f"INSITU_RUN={run}".encode() in (proc / "environ").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "(gone)"


def soak(steps: int, kill_every: int, sample_every: int, chunk: int = 64 * 1024, ranks: int = 4,
         pace: float = 0.0) -> dict[str, Any]:  # fmt: skip
    """Run the soak (see the module docstring) and return its record with the verdicts. ``pace``:
    seconds each rank sleeps per step (the last kill leaves ``kill_every`` steps to recover in)."""
    import numpy as np

    import insitu
    from insitu.cli import mpiexec_mpmd
    from insitu.cluster.local import LocalCluster
    from insitu.comm import connect_ray, shutdown_ray
    from insitu.config import Config

    run = f"soak-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    kills = max(0, steps // kill_every - 1)
    out = Path(tempfile.mkdtemp(prefix="insitu-soak-"))
    record: dict[str, Any] = {"steps": steps, "kill_every": kill_every, "sample_every": sample_every,
                              "chunk": chunk, "ranks": ranks, "pace": pace, "samples": [], "kills": []}  # fmt: skip
    with LocalCluster(nodes=2, cpus_per_node=2) as cluster:
        env = {**os.environ, **cluster.environment(), "INSITU_RUN": run, "INSITU_DEADLINE": "60",
               "INSITU_NODE_RESTARTS": str(kills + 1)}  # fmt: skip
        cfg = Config.from_env(env)
        connect_ray(cfg)  # sets the cluster's token auth before Ray is imported
        import ray

        from insitu.actors.head import head_name
        from insitu.status import collect

        try:
            analytics = insitu.Analytics(run=run, config=cfg)
            seen: set[int] = set()
            wrong: list[int] = []
            gaps: list[Any] = []
            gap_at: list[float] = []

            @analytics.on_gap
            def told(gap: Any) -> None:
                gaps.append(gap)
                gap_at.append(time.monotonic())

            @analytics.on_step("u")
            def check(step: int, u: list) -> None:
                got = u[0].compute()
                expected = step + np.arange(ranks).repeat(got.shape[0] // ranks) / 1000
                if not (got == expected[:, None]).all():
                    wrong.append(step)
                seen.add(step)

            outcome: dict[str, Any] = {}

            def consume() -> None:
                try:
                    outcome["summary"] = analytics.run()
                except Exception as exc:  # noqa: BLE001 - recorded: why the consumer ended
                    outcome["error"] = f"{type(exc).__name__}: {exc}"

            thread = threading.Thread(target=consume, daemon=True)
            thread.start()
            sim_cmd = mpiexec_mpmd(ranks, cluster.node_ips, [sys.executable, str(HERE / "soak_sim.py"), json.dumps(
                {"run": run, "steps": steps, "chunk": chunk, "out": str(out), "pace": pace})])  # fmt: skip
            sim = subprocess.Popen(sim_cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            head = None
            next_sample, next_kill, victim = 0, kill_every, 1
            deadline = time.monotonic() + 600 + steps * 0.1
            while sim.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
                newest = max(seen, default=-1)
                if head is None:
                    try:
                        head = ray.get_actor(head_name(run), namespace=cfg.namespace)
                    except ValueError:
                        continue
                if newest >= next_sample:
                    next_sample = (newest // sample_every + 1) * sample_every
                    record["samples"].append(_sample(ray, head, run, cfg, out, ranks, newest, collect))
                if newest >= next_kill and len(record["kills"]) < kills:
                    next_kill = (newest // kill_every + 1) * kill_every
                    pids = ray.get(head.node_processes.remote(), timeout=30)
                    ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
                    node = next(n for n in pids if ips[n] == cluster.node_ips[victim])
                    os.kill(pids[node], signal.SIGKILL)
                    record["kills"].append({"after_seen": newest, "node": node, "pid": pids[node],
                                            "at": time.monotonic()})  # fmt: skip
                    victim = 1 - victim
            _, err = sim.communicate(timeout=120)
            thread.join(120)
            if head is not None:  # what the head knew at the end: restarts, how the run ended
                try:
                    doc = collect(run, cfg, timeout=10)
                    record["end_status"] = {k: doc.get(k) for k in ("state", "end", "node_restarts", "last_failure")}
                except Exception as exc:  # noqa: BLE001 - the head may be reclaimed already
                    record["end_status"] = f"{type(exc).__name__}: {exc}"
        finally:
            shutdown_ray()
        record["sim_exit"] = sim.returncode
        record["sim_stderr_tail"] = err[-2000:]
    end = time.monotonic() + 30  # the run driver leaves at its next check of the head (every few seconds)
    while _run_processes(run) and time.monotonic() < end:
        time.sleep(0.2)
    left = {pid: _cmdline(pid) for pid in _run_processes(run)}
    left_files = [str(p) for p in Path(cfg.shm_dir).glob(f"insitu-{run}-*")]
    record["left"] = {"processes": left, "files": left_files}
    record["nothing_left"] = not left and not left_files
    summary = outcome.get("summary")
    record["analytics_end"] = outcome.get("error") or (summary.reason.value if summary else "still running")
    files = [out / f"rank{r}.json" for r in range(ranks)]
    per_rank = [json.loads(f.read_text()) for f in files if f.exists()]
    missing = set(range(steps)) - seen
    told_steps: set[int] = set()
    for g in gaps:
        told_steps.update(g.missing)
        told_steps.update(g.lost_retained)
    told_steps.update(summary.lost if summary else ())
    record["gaps"] = [{"node": g.node[:12], "after": g.after, "resume": g.resume, "incomplete": list(g.incomplete),
                       "lost_retained": list(g.lost_retained)} for g in gaps]  # fmt: skip
    for kill, at in zip(record["kills"], gap_at, strict=False):  # kill to the gap's arrival: restart + 1 step
        kill["gap_told_after_s"] = round(at - kill["at"], 2)
    record["ranks_dropped"] = [r["dropped"] for r in per_rank]
    record["ranks_gaps"] = [r["gaps"] for r in per_rank]
    record["steps_seen"], record["steps_missing"], record["wrong_values"] = len(seen), len(missing), wrong
    ranks_dropped = {s for r in per_rank for s in r["dropped_steps"]}
    record["loss_equals_gaps"] = bool(
        summary is not None
        and len(per_rank) == ranks
        and len(gaps) == kills
        and missing == (told_steps & set(range(steps)))
        and ranks_dropped <= told_steps
        and not wrong
    )
    record["flat"] = _flat(record["samples"], chunk * ranks)
    return record


def _sample(ray: Any, head: Any, run: str, cfg: Any, out: Path, ranks: int, step: int, collect: Any) -> dict[str, Any]:
    procs: dict[str, list[int]] = {"rank": [], "node": [], "head": [], "consumer": [os.getpid()]}
    for r in range(ranks):
        path = out / f"pid{r}"
        if path.exists():
            procs["rank"].append(int(path.read_text()))
    try:
        procs["node"] = list(ray.get(head.node_processes.remote(), timeout=30).values())
        procs["head"] = [int(ray.get(head.stats.remote(), timeout=30)["pid"])]
        doc = collect(run, cfg, timeout=10)
        store = {n["id"][:12]: n["store_bytes"] for n in (doc["simulation"] or {}).get("nodes", [])}
    except Exception as exc:  # noqa: BLE001 - a node process being restarted right now: no sample
        return {"step": step, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    roles = {}
    for role, pids in procs.items():
        figures = [f for f in (_rss_fds(p) for p in pids) if f is not None]
        roles[role] = {"rss_mib": round(max((f[0] for f in figures), default=0.0), 1),
                       "fds": max((f[1] for f in figures), default=0)}  # fmt: skip
    return {"step": step, "roles": roles, "store_bytes": store}


def _flat(samples: list[dict[str, Any]], step_bytes: int) -> bool:
    """No growth from the second sample on (see the module docstring)."""
    usable = [s for s in samples if "error" not in s][1:]
    if len(usable) < 2:
        return False
    for role in usable[0]["roles"]:
        first, last = usable[0]["roles"][role], usable[-1]["roles"][role]
        if last["rss_mib"] > first["rss_mib"] * 1.10 + 25 or last["fds"] > first["fds"] + 8:
            return False
    bound = (2 + 2) * step_bytes  # in flight (2) + 2 steps whose release is still travelling, per node
    return all(v <= bound for s in usable for v in s["store_bytes"].values())


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.soak`` (see the module docstring); exit 1 if a verdict fails."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--kill-every", type=int, default=2_000)
    p.add_argument("--sample-every", type=int, default=500)
    p.add_argument("--chunk", type=int, default=64 * 1024)
    p.add_argument("--pace", type=float, default=0.01, help="seconds each rank sleeps per step (its compute)")
    p.add_argument("--out", type=Path, default=HERE / "results" / f"soak-{datetime.date.today()}.json")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    record = soak(args.steps, args.kill_every, args.sample_every, args.chunk, pace=args.pace)
    record["seconds"] = round(time.monotonic() - t0, 1)
    args.out.write_text(json.dumps(record, indent=1))
    for key in ("loss_equals_gaps", "flat", "nothing_left"):
        print(f"{key}: {record[key]}")
    print(
        f"{record['steps_seen']} of {record['steps']} steps seen, {len(record['kills'])} kills, gaps "
        f"{[(g['after'], g['resume']) for g in record['gaps']]}, {record['seconds']} s; record in {args.out}"
    )
    return 0 if record["loss_equals_gaps"] and record["flat"] and record["nothing_left"] else 1


if __name__ == "__main__":
    sys.exit(main())
