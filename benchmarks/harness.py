"""Shared machinery of the benchmark harness: the floor, retries, CPU accounting, the runner.

Everything here is used by the ``sections_*`` modules; ``benchmarks/run.py`` is the command.
Nothing runs at import.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
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

from insitu.interrupt import end_processes

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KIB, MIB = 1024, 1024 * 1024
RETRIES = 2  # a failed size is run again at most this many times inside the run


def median_p95(values: list[float]) -> tuple[float, float]:
    """Median and 95th percentile of ``values``."""
    arr = np.asarray(values)
    return float(np.median(arr)), float(np.percentile(arr, 95))


def spread(values: list[float]) -> dict[str, float]:
    """``{"min", "median", "max"}`` of ``values``."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def timeit(fn: Callable[[], Any], repeat: int) -> list[float]:
    """Wall times of ``repeat`` calls of ``fn``."""
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def fmt_ms(x: float | None) -> str:
    """Seconds as a right-aligned millisecond figure (``n/a`` for ``None``)."""
    return "    n/a" if x is None else f"{x * 1e3:8.3f}"


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (the machine is shared)."""
    return [round(x, 2) for x in os.getloadavg()]


def with_retries(what: str, fn: Callable[[], dict[str, Any]], retries: int = RETRIES) -> dict[str, Any]:
    """Run one size of a section, running it again (at most ``retries`` times) when it fails.

    Returns the row of the first attempt that succeeded, with ``attempts`` (1 when it
    succeeded at once) and the earlier attempts' errors in ``retry_errors``; when every
    attempt failed, a row with ``error`` (the last error) instead of numbers.
    """
    errors: list[str] = []
    for attempt in range(1, retries + 2):
        try:
            row = fn()
        except Exception as exc:  # noqa: BLE001 - recorded in the JSON, retried, and reported
            errors.append(f"{type(exc).__name__}: {str(exc)[-600:]}")
            print(f"{what} attempt {attempt} FAILED: {errors[-1][:300]}", flush=True)
            continue
        row["attempts"] = attempt
        if errors:
            row["retry_errors"] = errors
        return row
    return {"error": errors[-1], "attempts": retries + 1, "retry_errors": errors}


# -- floor -----------------------------------------------------------------------------------------
def floor(size: int, repeat: int, ranks: int = 4) -> dict[str, Any]:
    """The one-copy floor of ``size`` bytes per rank, each figure as min/median/max over ``repeat``.

    * ``copy_fresh``: one numpy copy into fresh pages (a new anonymous mapping per copy);
    * ``copy_warm``: the same copy into reused memory;
    * ``e2e_floor``: the end-to-end floor of a step of ``ranks`` ranks, the ranks' fresh copies
      one after the other plus one read of all of them (a mean), in one process.

    The medians are also stored flat (``copy_fresh_s``, ``copy_warm_s``, ``e2e_floor_s``).
    """
    src = np.random.default_rng(0).random(max(1, size // 8))
    warm = np.empty_like(src)

    def copies(n: int, read: bool) -> None:
        maps = [mmap.mmap(-1, src.nbytes) for _ in range(n)]
        dsts = [np.frombuffer(m, dtype=src.dtype) for m in maps]
        for i in range(n):
            np.copyto(dsts[i], src)
        if read:
            float(sum(d.mean() for d in dsts))
        dsts.clear()  # no view may outlive its mapping
        for m in maps:
            m.close()

    fresh_t = spread(timeit(lambda: copies(1, False), repeat))
    warm_t = spread(timeit(lambda: np.copyto(warm, src), repeat))
    e2e_t = spread(timeit(lambda: copies(ranks, True), max(5, repeat // 2)))
    return {"size": size, "copy_fresh": fresh_t, "copy_warm": warm_t, "e2e_floor": e2e_t,
            "e2e_floor_ranks": ranks, "copy_fresh_s": fresh_t["median"], "copy_warm_s": warm_t["median"],
            "e2e_floor_s": e2e_t["median"]}  # fmt: skip


def empty_actor_call(repeat: int) -> dict[str, float]:
    """Round trip of an empty call to an idle Ray actor, min/median/max over ``repeat``."""
    import ray

    @ray.remote(num_cpus=0)
    class Empty:
        def ping(self) -> None:
            return None

    actor = Empty.remote()
    ray.get(actor.ping.remote())
    times = timeit(lambda: ray.get(actor.ping.remote()), repeat)
    ray.kill(actor)
    return spread(times)


# -- CPU of the control path -------------------------------------------------------------------------
def _stat(pid: int) -> tuple[int, float] | None:
    """(session id, utime + stime in seconds) of ``pid``, or ``None`` once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[3]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def classify(cmd: str, run: str) -> str | None:
    """The control-path role of a process from its command line, or ``None`` if not ours.

    Ray workers name themselves ``ray::<ActorClass>``; the run's ranks and run driver carry
    the run name in their arguments.
    """
    exe = Path(cmd.split()[0]).name if cmd else ""
    if exe.startswith("python") and run in cmd:  # not mpiexec, whose arguments name the run too
        if "sim_bench.py" in cmd:
            return "rank"
        if "insitu.driver" in cmd:
            return "run driver"
    if cmd.startswith("ray::"):
        name = cmd[5:].split()[0].split(".")[0]
        return {"NodeActor": "node actor", "HeadActor": "head actor", "IDLE": "idle worker"}.get(name, f"ray::{name}")
    if exe in ("raylet", "gcs_server"):
        return exe
    return None


def control_snapshot(cluster_sids: list[int], run: str) -> dict[int, tuple[str, float]]:
    """CPU seconds so far of every control-path process of ``run``: ``{pid: (role, seconds)}``.

    The cluster's processes are those of the sessions ``cluster_sids`` (raylets, GCS,
    workers); the ranks and the run driver are found by the run name in their command line;
    the analytics is this process (``"analytics"``).
    """
    sids = set(cluster_sids)
    out: dict[int, tuple[str, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        st = _stat(pid)
        if st is None:
            continue
        cmd = _cmdline(pid)
        role = classify(cmd, run)
        if role is None or (role not in ("rank", "run driver") and st[0] not in sids):
            continue
        out[pid] = (role, st[1])
    me = _stat(os.getpid())
    if me is not None:
        out[os.getpid()] = ("analytics", me[1])
    return out


def cpu_per_step(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
                 steps: int) -> dict[str, dict[str, float]]:  # fmt: skip
    """CPU seconds per step by role between two snapshots: ``{role: {"processes", "per_step_s"}}``."""
    roles: dict[str, dict[str, float]] = {}
    for pid, (role, t1) in after.items():
        t0 = before.get(pid, (role, t1 if role == "idle worker" else 0.0))[1]
        r = roles.setdefault(role, {"processes": 0, "per_step_s": 0.0})
        r["processes"] += 1
        r["per_step_s"] += (t1 - t0) / steps
    return roles


# -- the runner --------------------------------------------------------------------------------------
def prestart_driver(run: str, ready: Path, prewarm: bool = True) -> subprocess.Popen[bytes]:
    """Start ``python -m insitu.driver --run RUN --create-head --ready-file READY`` as the batch
    script does, in its own session: it creates the head, which starts the node processes ahead
    (unless not ``prewarm``: ``--no-prewarm``, the design before)."""
    return subprocess.Popen([sys.executable, "-m", "insitu.driver", "--run", run, "--create-head",
                             "--ready-file", str(ready), *([] if prewarm else ["--no-prewarm"])],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip


class Runner:
    """A private multi-raylet Ray cluster and the benchmark simulation run against it.

    Parameters
    ----------
    nodes
        Raylets of the cluster (each with its own loopback IP).
    dashboard
        Start the dashboard (``ray.util.state`` needs it).
    """

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

        from insitu.comm import init_ray

        # the harness's SIGTERM handler stays (benchmarks.run tears its cluster down on it)
        init_ray(address=self.cluster.address, namespace="insitu", logging_level=logging.WARNING, log_to_driver=False)
        end = time.monotonic() + 60
        while len([n for n in ray.nodes() if n["Alive"]]) < nodes and time.monotonic() < end:
            time.sleep(0.2)
        self.count = 0

    def close(self) -> None:
        """Disconnect and stop the cluster (by session id)."""
        from insitu.comm import shutdown_ray

        shutdown_ray()
        self.cluster.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    @staticmethod
    def _wait_ready(run: str, ready: Path, proc: subprocess.Popen[bytes], deadline: float) -> None:
        end = time.monotonic() + deadline
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > end:
                raise TimeoutError(f"the pre-started run driver of {run} was not ready within {deadline:.0f} s "
                                   f"(exit status {proc.poll()})")  # fmt: skip
            time.sleep(0.05)

    def sim(self, ranks: int, options: dict[str, Any], nodes: int = 1, analytics: Callable[..., Any] | None = None,
            window: int = 1, on_step: Callable[[str, int], None] | None = None, cwd: str | None = None,
            driver: bool = False, prewarm: bool = True) -> dict[str, Any]:  # fmt: skip
        """Run ``sim_bench.py`` on ``ranks`` ranks over ``nodes`` raylets, with an in-process analytics.

        Parameters
        ----------
        options
            ``sim_bench.py`` options; ``options["insitu"] = False`` runs the same loop without insitu.
        analytics
            Called with the window's list of Dask arrays each step (``None``: a no-op callback).
        on_step
            Called with the run name and the step at the end of every callback.
        driver
            Pre-start the run driver (``--create-head``) and launch the ranks once it is
            ready, as the batch script does; otherwise rank 0 spawns it.
        prewarm
            With ``driver``: its head starts the node processes ahead (else ``--no-prewarm``).
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
        # as the batch script does: the driver first (the head, the node processes), then analytics and ranks
        pre = prestart_driver(run, out / "driver.ready", prewarm) if driver else None
        if pre is not None:
            try:
                self._wait_ready(run, out / "driver.ready", pre, 120)
            except TimeoutError:
                pre.kill()
                pre.wait()
                raise
        if opts.get("insitu", True):
            ana = insitu.Analytics(run=run, deadline=300)

            @ana.on_step("u", window=window)
            def analyse(step: int, u: list) -> None:
                done["last"] = analytics(u) if analytics else None
                done["t_end"] = time.time()
                if on_step is not None:
                    on_step(run, step)
                if step == total_steps - 1:
                    done["head"] = ray.get(ray.get_actor(head_name(run), namespace="insitu").stats.remote())

            def consume() -> None:
                try:
                    done["summary"] = ana.run()
                except Exception as exc:  # noqa: BLE001 - reported by the caller, with the simulation's
                    done["error"] = exc

            thread = threading.Thread(target=consume)
            thread.start()
        try:
            launch = time.time()
            sim = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)
            try:
                _, stderr = sim.communicate(timeout=1800)
            finally:  # interrupted (SIGTERM/SIGINT) or timed out: the ranks go first
                end_processes([sim])
            if thread is not None:
                thread.join(600)
        except BaseException:
            # the analytics leaves the run before the cluster goes (ranks killed before they connected
            # are never reported as dead, so it is asked to)
            if thread is not None:
                ana.stop()
                thread.join(60)
            raise
        finally:
            if pre is not None:
                try:
                    pre.wait(30)  # it exits once the run is reclaimed
                except subprocess.TimeoutExpired:
                    pre.kill()
                    pre.wait()
        if sim.returncode != 0:
            raise RuntimeError(f"benchmark simulation failed:\n{stderr[-3000:]}")
        if "error" in done:
            raise RuntimeError(f"benchmark analytics failed: {type(done['error']).__name__}: {done['error']}")
        per_rank = [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]
        shutil.rmtree(out, ignore_errors=True)
        return self._summary(per_rank, launch, total_steps, done)

    @staticmethod
    def _summary(per_rank: list[dict[str, Any]], launch: float, total_steps: int,
                 done: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
        sends = [x for r in per_rank for x in r["send_s"]]
        loops = [x for r in per_rank for x in r["loop_s"]]
        first = per_rank[0]["first_send_wall"]
        rss = [(r["rss_after_init_kb"] - r["rss_before_kb"]) / 1024 for r in per_rank]
        res: dict[str, Any] = {
            "ranks": len(per_rank),
            "send_median_s": median_p95(sends)[0],
            "send_p95_s": median_p95(sends)[1],
            "loop_median_s": statistics.median(loops),
            "loop_mean_s": statistics.mean(loops),
            "init_rank0_s": per_rank[0]["init_s"],
            "init_max_s": max(r["init_s"] for r in per_rank),
            "startup_s": per_rank[0]["ready_wall"] - launch,
            "rss_added_mb": rss,
            "rss_added_rank0_mb": rss[0],
            "rss_added_other_mb": statistics.mean(rss[1:] or [0.0]),
            "rank_loop_cpu_per_step_s": [r["loop_cpu_s"] / max(1, len(r["loop_s"])) for r in per_rank],
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
