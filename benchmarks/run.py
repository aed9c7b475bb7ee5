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
import mmap
import os
import platform
import shutil
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
    """One numpy copy of ``size`` bytes into fresh pages (a new anonymous mapping) and into warm memory."""
    src = np.random.default_rng(0).random(max(1, size // 8))
    warm = np.empty_like(src)

    def fresh() -> None:
        buf = mmap.mmap(-1, src.nbytes)
        np.copyto(np.frombuffer(buf, dtype=src.dtype), src)
        buf.close()

    fresh_t = timeit(fresh, repeat)
    warm_t = timeit(lambda: np.copyto(warm, src), repeat)
    return {"copy_fresh_s": statistics.median(fresh_t), "copy_warm_s": statistics.median(warm_t)}


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

    def __init__(self, nodes: int, dashboard: bool = False) -> None:
        from insitu.cluster.local import LocalCluster

        self.base = Path(tempfile.mkdtemp(prefix="insitu-bench-"))
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(self.base / "auth_token")
        # the last raylet carries the tunneled-node marker (only the relay section dispatches from it)
        remote = {nodes - 1: {"insitu_remote": 1.0}} if nodes >= 3 else {}
        self.cluster = LocalCluster(nodes=nodes, cpus_per_node=1, base_dir=str(self.base), object_store_bytes=1 << 30,
                                    dashboard=dashboard, resources=remote)  # fmt: skip
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
            window: int = 1, sample: Callable[[int], None] | None = None,
            cwd: str | None = None) -> dict[str, Any]:  # fmt: skip
        """Run ``sim_bench.py`` on ``ranks`` ranks over ``nodes`` raylets, with an in-process analytics.

        ``options["insitu"] = False`` runs the same loop without insitu (baseline, post hoc).
        """
        import ray

        import insitu
        from insitu.actors.head import head_name
        from insitu.cli import mpiexec_mpmd

        self.count += 1
        run = f"bench-{self.count}-{os.getpid()}"
        out = self.base / run
        out.mkdir()
        opts = {**options, "run": run, "out": str(out)}
        argv = [sys.executable, str(HERE / "sim_bench.py"), json.dumps(opts)]
        cmd = mpiexec_mpmd(ranks, self.cluster.node_ips[:nodes], argv)
        env = {**os.environ, "INSITU_DEADLINE": "300"}
        total_steps = opts["steps"] + opts.get("warmup", 10)
        done: dict[str, Any] = {}
        thread = None
        if opts.get("insitu", True):
            ana = insitu.Analytics(run=run, deadline=300)

            @ana.on_step("u", window=window)
            def analyse(step: int, u: list) -> None:
                done["last"] = analytics(u) if analytics else None
                done["t_end"] = time.time()
                if sample is not None:
                    sample(step)
                if step == total_steps - 1:
                    done["head"] = ray.get(ray.get_actor(head_name(run), namespace="insitu").stats.remote())

            thread = threading.Thread(target=lambda: done.update(summary=ana.run()))
            thread.start()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, check=False, cwd=cwd)
        if thread is not None:
            thread.join(600)
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark simulation failed:\n{proc.stderr[-3000:]}")
        per_rank = [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]
        shutil.rmtree(out, ignore_errors=True)
        sends = [x for r in per_rank for x in r["send_s"]]
        loops = [x for r in per_rank for x in r["loop_s"]]
        first = per_rank[0]["first_send_wall"]
        res: dict[str, Any] = {
            "ranks": ranks,
            "nodes": nodes,
            "send_median_s": median_p95(sends)[0],
            "send_p95_s": median_p95(sends)[1],
            "loop_median_s": statistics.median(loops),
            "loop_mean_s": statistics.mean(loops),
            "init_rank0_s": per_rank[0]["init_s"],
            "rss_added_rank0_mb": (per_rank[0]["rss_after_init_kb"] - per_rank[0]["rss_before_kb"]) / 1024,
            "rss_added_other_mb": statistics.mean(
                [(r["rss_after_init_kb"] - r["rss_before_kb"]) / 1024 for r in per_rank[1:]] or [0.0]
            ),
            "first_send_wall": first,
        }
        if "t_end" in done and first is not None:
            res["e2e_per_step_s"] = (done["t_end"] - first) / total_steps
        if "head" in done:
            msgs = done["head"]["messages"]
            res["head_messages_per_step"] = sum(msgs.values()) / total_steps
            res["head_messages_per_node_per_step"] = sorted({m / total_steps for m in msgs.values()})
        return res


def mean_of_window(u: list) -> float:
    """The analytics of the benchmark: global mean per step (summed over the window)."""
    import dask

    return float(sum(dask.compute(*[a.mean() for a in u])))


def _fmt_ms(x: float | None) -> str:
    return "    n/a" if x is None else f"{x * 1e3:8.3f}"


def section_insitu(runner: Runner, sizes: list[int], steps: int, warmup: int, quick: bool) -> list[dict[str, Any]]:
    """Send cost and end-to-end time per step, 4 ranks on one node, back-to-back and paced."""
    rows = []
    modes = [("b2b", 1)] if quick else [("b2b", 1), ("b2b", 3), ("spin", 1), ("sleep", 1)]
    for size in sizes:
        fl = floor(size, 20 if quick else 50)
        for pace, window in modes:
            opts: dict[str, Any] = {"chunk": size, "steps": steps, "warmup": warmup}
            if pace == "spin":
                opts.update(pace="spin", pace_arg=0.02)
            elif pace == "sleep":
                opts.update(pace="sleep", pace_arg=0.2)
            r = runner.sim(4, opts, analytics=mean_of_window, window=window)
            r.update(size=size, window=window, pace=pace, **fl)
            rows.append(r)
            print(f"insitu  {size // KIB:>7} KiB {pace:>5} w{window}: send median {_fmt_ms(r['send_median_s'])} ms "
                  f"p95 {_fmt_ms(r['send_p95_s'])} ms = {r['send_median_s'] / fl['copy_fresh_s']:6.2f}x fresh copy; "
                  f"e2e/step {_fmt_ms(r.get('e2e_per_step_s'))} ms; loop {_fmt_ms(r['loop_median_s'])} ms",
                  flush=True)  # fmt: skip
    return rows


def section_baseline(runner: Runner, sizes: list[int], steps: int, warmup: int) -> list[dict[str, Any]]:
    """The same loop without insitu (twice, for the noise floor): sleep-paced 4 ranks, stencil-paced 1 rank."""
    rows = []
    cores = os.cpu_count() or 2
    for size in sizes:
        for pace, arg, ranks in (("sleep", 0.2, 4), ("stencil", 300, max(1, cores - 1))):
            base = [runner.sim(ranks, {"chunk": size, "steps": steps, "warmup": warmup, "pace": pace, "pace_arg": arg,
                                       "insitu": False}) for _ in range(2)]  # fmt: skip
            with_insitu = runner.sim(ranks, {"chunk": size, "steps": steps, "warmup": warmup, "pace": pace,
                                             "pace_arg": arg}, analytics=mean_of_window)  # fmt: skip
            b1, b2 = base[0]["loop_mean_s"], base[1]["loop_mean_s"]
            row = {
                "size": size, "pace": pace, "ranks": ranks,
                "baseline_loop_s": [b1, b2],
                "noise": abs(b2 - b1) / b1,
                "insitu_loop_s": with_insitu["loop_mean_s"],
                "slowdown": with_insitu["loop_mean_s"] / statistics.mean([b1, b2]) - 1,
                "send_median_s": with_insitu["send_median_s"],
                "send_p95_s": with_insitu["send_p95_s"],
            }  # fmt: skip
            rows.append(row)
            print(f"paced   {size // KIB:>7} KiB {pace:>7} {ranks} rank(s): slowdown {row['slowdown'] * 100:+6.2f} % "
                  f"(noise floor {row['noise'] * 100:5.2f} %), send median {_fmt_ms(row['send_median_s'])} ms",
                  flush=True)  # fmt: skip
    return rows


def section_posthoc(runner: Runner, sizes: list[int], steps: int, warmup: int) -> list[dict[str, Any]]:
    """Peer: .npy files in /dev/shm during the run, global mean per step analysed after it."""
    rows = []
    for size in sizes:
        # every step stays in /dev/shm until the analysis: cap the run at 2 GiB of files
        steps = max(5, min(steps, (2 << 30) // (4 * size) - warmup))
        d = Path(tempfile.mkdtemp(prefix="insitu-posthoc-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
        try:
            t0 = time.time()
            r = runner.sim(4, {"chunk": size, "steps": steps, "warmup": warmup, "insitu": False, "posthoc": str(d)})
            means = {}
            for step in range(steps + warmup):
                blocks = [np.load(f) for f in sorted(d.glob(f"s{step:06d}-r*.npy"))]
                means[step] = float(np.mean(np.concatenate([b.ravel() for b in blocks])))
            total = time.time() - max(t0, r["first_send_wall"] or t0)
        finally:
            shutil.rmtree(d, ignore_errors=True)
        row = {"size": size, "steps": steps, "send_median_s": r["send_median_s"], "send_p95_s": r["send_p95_s"],
               "e2e_per_step_s": total / (steps + warmup)}  # fmt: skip
        rows.append(row)
        print(f"posthoc {size // KIB:>7} KiB: write median {_fmt_ms(row['send_median_s'])} ms; "
              f"e2e/step {_fmt_ms(row['e2e_per_step_s'])} ms", flush=True)  # fmt: skip
    return rows


def section_adios2(runner: Runner, sizes: list[int], steps: int, warmup: int) -> list[dict[str, Any]] | str:
    """Peer: ADIOS2 SST (serial wheel), one stream per rank, one reader process computing the global mean."""
    try:
        import adios2  # noqa: F401
    except ImportError as exc:
        reason = f"skipped: adios2 is not installed ({exc}); pip install adios2"
        print(f"adios2  {reason}", flush=True)
        return reason
    rows = []
    for size in sizes:
        work = Path(tempfile.mkdtemp(prefix="insitu-adios2-"))
        name = f"sst{size}"
        total = steps + warmup
        reader = subprocess.Popen([sys.executable, str(HERE / "peer_adios2.py"),
                                   json.dumps({"name": name, "ranks": 4, "steps": total, "out": str(work / "r.json")})],
                                  cwd=work, env={**os.environ, "CM_INTERFACE": "lo"})  # fmt: skip
        try:
            os.environ["CM_INTERFACE"] = "lo"
            r = runner.sim(4, {"chunk": size, "steps": steps, "warmup": warmup, "insitu": False, "adios2": name},
                           cwd=str(work))  # fmt: skip
            reader.wait(600)
            got = json.loads((work / "r.json").read_text())
        except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as exc:  # keep the other sizes
            rows.append({"size": size, "error": f"{type(exc).__name__}: {str(exc)[-300:]}"})
            print(f"adios2  {size // KIB:>7} KiB FAILED: {rows[-1]['error']}", flush=True)
            continue
        finally:
            if reader.poll() is None:
                reader.kill()
            shutil.rmtree(work, ignore_errors=True)
        row = {"size": size, "send_median_s": r["send_median_s"], "send_p95_s": r["send_p95_s"],
               "e2e_per_step_s": (got["t_end"] - r["first_send_wall"]) / total}  # fmt: skip
        rows.append(row)
        print(f"adios2  {size // KIB:>7} KiB SST: write median {_fmt_ms(row['send_median_s'])} ms; "
              f"e2e/step {_fmt_ms(row['e2e_per_step_s'])} ms", flush=True)  # fmt: skip
    return rows


DEISA_PIN = "deisa-ray==0.1.8"


def deisa_venv() -> Path:
    """Build (once) the deisa-ray virtualenv: it needs Python >= 3.12 and pins its own dask.

    The Python is ``$INSITU_BENCH_PYTHON312``, else ``python3.12`` on PATH, else a pyenv 3.12;
    the virtualenv lives in ``$INSITU_BENCH_CACHE`` (default ``~/.cache/insitu-bench``).
    """
    cache = Path(os.environ.get("INSITU_BENCH_CACHE", Path.home() / ".cache" / "insitu-bench"))
    venv = cache / "deisa-venv"
    py = venv / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", "import deisa.ray, ray.util.client"],
                                      capture_output=True, check=False).returncode == 0:  # fmt: skip
        return py
    candidates = [os.environ.get("INSITU_BENCH_PYTHON312"), shutil.which("python3.12"),
                  *sorted(str(p) for p in (Path.home() / ".pyenv" / "versions").glob("3.12*/bin/python"))]  # fmt: skip
    base = next((c for c in candidates if c and Path(c).exists()), None)
    if base is None:
        raise FileNotFoundError("no Python 3.12 found (deisa-ray needs >= 3.12): set INSITU_BENCH_PYTHON312")
    shutil.rmtree(venv, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=300)
    # ray[client]: LocalCluster pins the client-server port; mpich: the same MPI wheel as insitu's
    pip = subprocess.run([str(py), "-m", "pip", "install", "-q", DEISA_PIN, "ray[client]==2.60.0", "mpich"],
                         capture_output=True, text=True, timeout=1200, check=False)  # fmt: skip
    if pip.returncode != 0:
        raise RuntimeError(f"pip install {DEISA_PIN} failed:\n{pip.stderr[-2000:]}")
    return py


def section_deisa(sizes: list[int], steps: int, warmup: int) -> list[dict[str, Any]] | str:
    """Peer: deisa-ray in its own virtualenv and its own Ray cluster, same simulation and analytics."""
    try:
        py = deisa_venv()
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        reason = f"skipped: could not build the deisa-ray virtualenv ({exc})"
        print(f"deisa   {reason}", flush=True)
        return reason
    cases: list[dict[str, Any]] = [{"size": s, "pace": "none"} for s in sizes]
    cases += [{"size": s, "pace": "sleep", "pace_arg": 0.2} for s in sizes if s in (64 * KIB, 8 * MIB)]
    out = Path(tempfile.mkdtemp(prefix="insitu-deisa-out-")) / "rows.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "INSITU_"))}
    env["PYTHONPATH"] = str(ROOT)
    opt = {"cases": cases, "steps": steps, "warmup": warmup, "ranks": 4, "out": str(out)}
    proc = subprocess.run([str(py), str(HERE / "peer_deisa.py"), "orchestrate", json.dumps(opt)], env=env,
                          capture_output=True, text=True, timeout=3600, check=False)  # fmt: skip
    rows: list[dict[str, Any]] = json.loads(out.read_text()) if out.exists() else []
    shutil.rmtree(out.parent, ignore_errors=True)
    for row in rows:
        print(f"deisa   {row['size'] // KIB:>7} KiB {row['pace']:5}: send median {_fmt_ms(row['send_median_s'])} ms "
              f"p95 {_fmt_ms(row['send_p95_s'])} ms; loop {_fmt_ms(row['loop_median_s'])} ms; "
              f"e2e/step {_fmt_ms(row['e2e_per_step_s'])} ms", flush=True)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"deisa-ray peer failed after {len(rows)} of {len(cases)} cases:\n{proc.stderr[-3000:]}")
    return rows


def section_scaling(runner: Runner, steps: int) -> list[dict[str, Any]]:
    """Time per step / one-copy floor of the same bytes, and head messages per step, 1-16 ranks on 1-4 raylets."""
    rows = []
    size = 64 * KIB
    for ranks, nodes in ((1, 1), (2, 1), (4, 1), (4, 2), (8, 2), (8, 4), (16, 4)):
        nodes = min(nodes, len(runner.cluster.node_ips))
        r = runner.sim(ranks, {"chunk": size, "steps": steps, "warmup": 5}, nodes=nodes, analytics=mean_of_window)
        fl = floor(size * ranks, 30)
        row = {"ranks": ranks, "nodes": nodes, "e2e_per_step_s": r.get("e2e_per_step_s"),
               "floor_s": fl["copy_fresh_s"], "ratio": (r.get("e2e_per_step_s") or float("nan")) / fl["copy_fresh_s"],
               "head_messages_per_node_per_step": r.get("head_messages_per_node_per_step"),
               "send_median_s": r["send_median_s"]}  # fmt: skip
        rows.append(row)
        print(f"scaling {ranks:>2} ranks on {nodes} raylet(s): e2e/step {_fmt_ms(row['e2e_per_step_s'])} ms = "
              f"{row['ratio']:8.1f}x floor; head messages per node per step {row['head_messages_per_node_per_step']}",
              flush=True)  # fmt: skip
    return rows


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
    print(f"sched   window-3 graph: insitu {_fmt_ms(out['insitu_s'])} ms, "
          f"dask threaded {_fmt_ms(out['threaded_s'])} ms,"
          f" ray_dask_get {_fmt_ms(out['ray_dask_get_s'])} ms", flush=True)  # fmt: skip
    return out


def section_memory(runner: Runner, steps: int) -> dict[str, Any]:
    """Object-store high-water mark over many steps, objects left after close, per-rank memory and start-up."""
    from ray.util.state import list_objects

    chunk = 64 * KIB

    def chunk_bytes() -> int:
        # a node actor stores a step's blocks as one object (plus a few hundred bytes of metadata)
        objs = list_objects(address=runner.cluster.address, limit=10000, raise_on_missing_output=False)
        step = 4 * chunk
        sizes = {o.object_id: o.object_size or 0 for o in objs if step <= (o.object_size or 0) < step + 4096}
        return sum(sizes.values())

    samples: list[int] = []
    runner.sim(4, {"chunk": chunk, "steps": steps, "warmup": 0}, analytics=mean_of_window, window=3,
               sample=lambda step: samples.append(chunk_bytes()) if step % 100 == 0 else None)  # fmt: skip
    time.sleep(2)
    left = chunk_bytes()
    out: dict[str, Any] = {"steps": steps, "max_object_store_bytes": max(samples),
                           "bound_bytes": (3 + 2) * 4 * chunk * 1.25, "bytes_after_close": left}  # fmt: skip
    for ranks in (4, 16):
        nodes = min(4, len(runner.cluster.node_ips))
        base = runner.sim(ranks, {"chunk": chunk, "steps": 5, "warmup": 0, "insitu": False}, nodes=nodes)
        r = runner.sim(ranks, {"chunk": chunk, "steps": 5, "warmup": 0}, nodes=nodes, analytics=mean_of_window)
        out[f"ranks{ranks}"] = {
            "rss_added_rank0_mb": r["rss_added_rank0_mb"] - base["rss_added_rank0_mb"],
            "rss_added_other_mb": r["rss_added_other_mb"] - base["rss_added_other_mb"],
            "startup_s": r["init_rank0_s"],
        }
    print(f"memory  {steps} steps of 4 x 64 KiB, window 3: at most {out['max_object_store_bytes'] / KIB:.0f} KiB "
          f"of chunks (bound {out['bound_bytes'] / KIB:.0f} KiB), {left} bytes left after close; per rank at 4/16: "
          f"{out['ranks4']} / {out['ranks16']}", flush=True)  # fmt: skip
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
        print(f"relay   {size:>10} B result: direct task {_fmt_ms(got['direct'])} ms, relayed {_fmt_ms(got['relay'])} "
              f"ms ({rows[-1]['ratio']:.2f}x)", flush=True)  # fmt: skip
    return rows


def compare(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Peers against insitu on the same work (back-to-back, window 1), as ratios from this run."""
    rows = []
    ours = {r["size"]: r for r in results.get("insitu", []) if r["pace"] == "b2b" and r["window"] == 1}
    base = {r["size"]: r for r in results.get("paced", []) if r["pace"] == "sleep"}
    for peer in ("deisa", "adios2", "posthoc"):
        if not isinstance(results.get(peer), list):
            continue
        for row in results[peer]:
            if "error" in row:
                continue
            mine = ours.get(row["size"])
            if row.get("pace", "none") == "sleep":
                b = base.get(row["size"])
                if b is not None:
                    slow = row["loop_median_s"] / statistics.mean(b["baseline_loop_s"]) - 1
                    rows.append({"peer": peer, "size": row["size"], "slowdown_sleep": slow,
                                 "insitu_slowdown_sleep": b["slowdown"]})  # fmt: skip
                    print(f"compare {peer:7} {row['size'] // KIB:>7} KiB sleep-paced slowdown {slow * 100:+7.2f} % "
                          f"(insitu {b['slowdown'] * 100:+6.2f} %)", flush=True)  # fmt: skip
                continue
            if mine is None or not mine.get("e2e_per_step_s"):
                continue
            speedup = row["e2e_per_step_s"] / mine["e2e_per_step_s"]
            rows.append({"peer": peer, "size": row["size"], "e2e_speedup": speedup,
                         "send_ratio": row["send_median_s"] / mine["send_median_s"]})  # fmt: skip
            print(f"compare {peer:7} {row['size'] // KIB:>7} KiB: insitu end-to-end {speedup:7.2f}x faster, "
                  f"send {rows[-1]['send_ratio']:7.2f}x cheaper", flush=True)  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: floor and insitu at 64 KiB, 5 steps")
    p.add_argument("--sections", default="floor,insitu,baseline,posthoc,adios2,deisa,sched,relay,scaling,memory")
    p.add_argument("--sizes", default=f"{64 * KIB},{512 * KIB},{8 * MIB},{32 * MIB}")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", default=str(HERE / "results" / "results.json"))
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    steps, warmup = args.steps, 10
    if args.quick:
        sizes, steps, warmup, args.sections = [64 * KIB], 5, 2, "floor,insitu"
    sections = args.sections.split(",")
    results: dict[str, Any] = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                           "platform": platform.platform()}, "steps": steps}  # fmt: skip
    runner = Runner(nodes=1 if args.quick else 4, dashboard="memory" in sections)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        for section in sections:
            try:
                run_section(section, runner, results, sizes, steps, warmup, args.quick)
            except Exception as exc:  # one broken section must not lose the others' numbers
                results.setdefault("errors", {})[section] = f"{type(exc).__name__}: {exc}"
                print(f"{section:7} FAILED: {type(exc).__name__}: {exc}", flush=True)
            out.write_text(json.dumps(results, indent=1))
        results["compare"] = compare(results)
        out.write_text(json.dumps(results, indent=1))
    finally:
        runner.close()
    print(f"results written to {out}")
    return 1 if results.get("errors") else 0


def run_section(section: str, runner: Runner, results: dict[str, Any], sizes: list[int], steps: int, warmup: int,
                quick: bool) -> None:  # fmt: skip
    """Run one named section and store its numbers in ``results``."""
    if section == "floor":
        results["floor"] = [{"size": s, **floor(s, 20 if quick else 100)} for s in sizes]
        results["empty_actor_call_s"] = empty_actor_call(50 if quick else 300)
        for row in results["floor"]:
            print(f"floor   {row['size'] // KIB:>7} KiB  copy fresh {_fmt_ms(row['copy_fresh_s'])} ms  "
                  f"warm {_fmt_ms(row['copy_warm_s'])} ms", flush=True)  # fmt: skip
        print(f"floor   empty Ray actor call {_fmt_ms(results['empty_actor_call_s'])} ms", flush=True)
    elif section == "insitu":
        results["insitu"] = section_insitu(runner, sizes, steps, warmup, quick)
    elif section == "baseline":
        paced_sizes = [x for x in sizes if x in (64 * KIB, 8 * MIB)] or sizes[:1]
        results["paced"] = section_baseline(runner, paced_sizes, steps, warmup)
    elif section == "posthoc":
        results["posthoc"] = section_posthoc(runner, sizes, steps, warmup)
    elif section == "adios2":
        results["adios2"] = section_adios2(runner, sizes, steps, warmup)
    elif section == "deisa":
        results["deisa"] = section_deisa(sizes, steps, warmup)
    elif section == "relay":
        results["relay"] = section_relay(runner, sizes, 10 if quick else 50)
    elif section == "sched":
        results["sched"] = section_sched(50)
    elif section == "scaling":
        results["scaling"] = section_scaling(runner, min(steps, 50))
    elif section == "memory":
        results["memory"] = section_memory(runner, 1000)
    else:
        raise ValueError(f"unknown section {section!r}")


if __name__ == "__main__":
    sys.exit(main())
