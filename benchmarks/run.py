"""insitu against the one-copy floor and its peers, measured side by side in one run.

Usage::

    python -m benchmarks.run                 # everything (minutes)
    python -m benchmarks.run --quick         # smoke: floor + insitu at 64 KiB, 5 steps
    python -m benchmarks.run --sections floor,insitu --sizes 65536,8388608

Prints a table and writes JSON (default ``benchmarks/results/results.json``). The method
is described in ``docs/performance.md``; every ratio is taken against a baseline measured
in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KIB, MIB = 1024, 1024 * 1024


def median_p95(values: list[float]) -> tuple[float, float]:
    """Median and 95th percentile."""
    arr = np.asarray(values)
    return float(np.median(arr)), float(np.percentile(arr, 95))


def timeit(fn: Callable[[], Any], repeat: int) -> list[float]:
    """Wall times of ``repeat`` calls of ``fn``."""
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


# -- floor -------------------------------------------------------------------------------------
def floor(size: int, repeat: int) -> dict[str, float]:
    """One numpy copy of ``size`` bytes into fresh and into warm memory."""
    src = np.random.default_rng(0).random(size // 8)
    warm = np.empty_like(src)
    fresh = timeit(lambda: np.array(src, copy=True), repeat)
    warm_t = timeit(lambda: np.copyto(warm, src), repeat)
    return {"copy_fresh_s": statistics.median(fresh), "copy_warm_s": statistics.median(warm_t)}


def empty_actor_call(repeat: int) -> float:
    """Median round trip of an empty call to an idle Ray actor."""
    import ray

    @ray.remote(num_cpus=0)
    class Empty:
        def ping(self) -> None:
            return None

    actor = Empty.remote()
    ray.get(actor.ping.remote())
    times = timeit(lambda: ray.get(actor.ping.remote()), repeat)
    ray.kill(actor)
    return statistics.median(times)


# -- insitu --------------------------------------------------------------------------------------
class Runner:
    """Holds the private cluster and runs simulations against it."""

    def __init__(self, nodes: int) -> None:
        from insitu.cluster.local import LocalCluster

        self.base = Path(tempfile.mkdtemp(prefix="insitu-bench-"))
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(self.base / "auth_token")
        self.cluster = LocalCluster(nodes=nodes, cpus_per_node=1, base_dir=str(self.base), object_store_bytes=1 << 30)
        self.cluster.start()
        os.environ.update(self.cluster.environment())
        import ray

        ray.init(address=self.cluster.address, namespace="insitu", logging_level="WARNING", log_to_driver=False)
        end = time.monotonic() + 60
        while len([n for n in ray.nodes() if n["Alive"]]) < nodes and time.monotonic() < end:
            time.sleep(0.2)
        self.count = 0

    def close(self) -> None:
        import ray

        ray.shutdown()
        self.cluster.stop()

    def sim(self, ranks: int, options: dict[str, Any], nodes: int = 1, analytics: Callable[..., Any] | None = None,
            window: int = 1) -> dict[str, Any]:  # fmt: skip
        """Run ``sim_bench.py`` on ``ranks`` ranks over ``nodes`` raylets, with an optional analytics."""
        import insitu
        from insitu.cli import mpiexec_mpmd

        self.count += 1
        run = f"bench-{self.count}-{os.getpid()}"
        out = self.base / run
        out.mkdir()
        opts = {**options, "run": run, "out": str(out)}
        cmd = mpiexec_mpmd(ranks, self.cluster.node_ips[:nodes], [sys.executable, str(HERE / "sim_bench.py"),
                                                                  json.dumps(opts)])  # fmt: skip
        env = {**os.environ, "INSITU_DEADLINE": "300"}
        done: dict[str, Any] = {}
        thread = None
        if opts.get("insitu", True):
            ana = insitu.Analytics(run=run, deadline=300)

            @ana.on_step("u", window=window)
            def mean(step: int, u: list) -> None:
                done["last"] = analytics(u) if analytics else None
                done["t_end"] = time.time()

            def go() -> None:
                done["summary"] = ana.run()
                import ray

                done["messages"] = None
                del ray

            thread = threading.Thread(target=go)
            thread.start()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, check=False)
        if thread is not None:
            thread.join(600)
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark simulation failed:\n{proc.stderr[-3000:]}")
        per_rank = [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]
        sends = [s for r in per_rank for s in r["send_s"]]
        loops = [s for r in per_rank for s in r["loop_s"]]
        first = per_rank[0]["first_send_wall"]
        total_steps = opts["steps"] + opts.get("warmup", 10)
        res: dict[str, Any] = {
            "send_median_s": median_p95(sends)[0],
            "send_p95_s": median_p95(sends)[1],
            "loop_median_s": statistics.median(loops),
            "loop_mean_s": statistics.mean(loops),
            "init_s": max(r["init_s"] for r in per_rank),
            "rss_added_mb": [(r["rss_after_init_kb"] - r["rss_before_kb"]) / 1024 for r in per_rank],
        }
        if "t_end" in done and first is not None:
            res["e2e_per_step_s"] = (done["t_end"] - first) / total_steps
        return res


def mean_of_window(u: list) -> float:
    """The analytics of the benchmark: global mean per step (summed over the window)."""
    import dask

    return float(sum(dask.compute(*[a.mean() for a in u])))


def section_insitu(runner: Runner, sizes: list[int], steps: int, results: dict[str, Any], quick: bool) -> None:
    rows = results.setdefault("insitu", [])
    for size in sizes:
        for window in (1,) if quick else (1, 3):
            r = runner.sim(4, {"chunk": size, "steps": steps, "warmup": 2 if quick else 10}, analytics=mean_of_window,
                           window=window)  # fmt: skip
            fl = floor(size, 20 if quick else 50)
            r.update(size=size, window=window, ranks=4, **fl)
            rows.append(r)
            print(f"insitu  {size // KIB:>7} KiB  window {window}: send median {r['send_median_s'] * 1e3:8.3f} ms "
                  f"(p95 {r['send_p95_s'] * 1e3:8.3f}) = {r['send_median_s'] / fl['copy_fresh_s']:5.2f}x fresh copy; "
                  f"e2e/step {r.get('e2e_per_step_s', float('nan')) * 1e3:8.2f} ms", flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: floor and insitu at 64 KiB, 5 steps")
    p.add_argument("--sections", default="floor,insitu")
    p.add_argument("--sizes", default=f"{64 * KIB},{512 * KIB},{8 * MIB},{32 * MIB}")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", default=str(HERE / "results" / "results.json"))
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    steps = args.steps
    if args.quick:
        sizes, steps, args.sections = [64 * KIB], 5, "floor,insitu"
    sections = set(args.sections.split(","))
    results: dict[str, Any] = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                           "platform": platform.platform()}, "steps": steps}  # fmt: skip
    runner = Runner(nodes=1)
    try:
        if "floor" in sections:
            results["floor"] = [{"size": s, **floor(s, 20 if args.quick else 100)} for s in sizes]
            results["empty_actor_call_s"] = empty_actor_call(50 if args.quick else 300)
            for row in results["floor"]:
                print(f"floor   {row['size'] // KIB:>7} KiB  copy fresh {row['copy_fresh_s'] * 1e3:8.3f} ms  "
                      f"warm {row['copy_warm_s'] * 1e3:8.3f} ms", flush=True)  # fmt: skip
            print(f"floor   empty Ray actor call {results['empty_actor_call_s'] * 1e3:.3f} ms", flush=True)
        if "insitu" in sections:
            section_insitu(runner, sizes, steps, results, args.quick)
    finally:
        runner.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
