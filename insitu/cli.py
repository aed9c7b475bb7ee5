"""The ``insitu`` command (also ``python -m insitu``): demo, config, launch, steer, status, record, replay, analytics,
build-shim, debug-info.

A user error (an :mod:`insitu.errors` exception, a missing file, a bad option, a cluster that
cannot be reached) prints one line to stderr and exits non-zero; ``--debug`` shows its
traceback. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

from insitu.config import Config
from insitu.errors import ConfigError, InsituError
from insitu.interrupt import Interrupted, end_processes, terminated_cleanly
from insitu.resources import data_path, executable

__all__ = ["USER_ERRORS", "main", "mpiexec_mpmd"]

#: Exceptions reported as one line (the user can fix them); anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (InsituError, FileNotFoundError, PermissionError, NotADirectoryError,
                                                IsADirectoryError, ConnectionError)  # fmt: skip


def mpiexec_mpmd(ranks: int, node_ips: list[str], argv: list[str]) -> list[str]:
    """An ``mpiexec`` command line that gives each block of ranks its node's ``INSITU_NODE``.

    Ranks are spread in contiguous blocks over ``node_ips`` (as a launcher places them).

    Examples
    --------
    >>> mpiexec_mpmd(3, ["127.0.0.2", "127.0.0.3"], ["python", "sim.py"])[1:6]
    ['-n', '2', '-env', 'INSITU_NODE', '127.0.0.2']
    """
    try:
        exe = executable("mpiexec", "INSITU_MPIEXEC")
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{exc}: pip install 'insitu[mpich]' or load your site MPI") from None
    cmd = [exe]
    per, extra = divmod(ranks, len(node_ips))
    for i, ip in enumerate(node_ips):
        n = per + (1 if i < extra else 0)
        if n == 0:
            continue
        if len(cmd) > 1:
            cmd.append(":")
        cmd += ["-n", str(n), "-env", "INSITU_NODE", ip, *argv]
    return cmd


def _demo(args: argparse.Namespace) -> int:
    from insitu.cluster.local import LocalCluster

    heat_stats, heat2d = data_path("analytics", "heat_stats.py"), data_path("examples", "python", "heat2d.py")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    run = f"demo-{secrets.token_hex(3)}"
    print(f"insitu demo: run {run}, {args.ranks} ranks on {args.nodes} raylets, output in {out}", flush=True)
    t0 = time.monotonic()
    procs: list[subprocess.Popen[bytes]] = []
    with LocalCluster(nodes=args.nodes, cpus_per_node=1) as cluster:
        print(f"insitu demo: private Ray cluster {cluster.address} up in {time.monotonic() - t0:.1f} s "
              f"(token {cluster.token_path})", flush=True)  # fmt: skip
        env = dict(os.environ)
        env.update(cluster.environment())
        env["INSITU_RUN"] = run
        env["INSITU_DEADLINE"] = str(args.deadline)
        env["INSITU_RECLAIM_DEADLINE"] = "30"
        py = sys.executable
        ana = [py, str(heat_stats), "--out", str(out), "--threshold", str(args.threshold),
               "--png-every", str(args.png_every), "--total-steps", str(args.steps),
               "--print-every", str(args.print_every)]  # fmt: skip
        sim = [py, str(heat2d), "--nx", str(args.nx), "--ny", str(args.ny),
               "--steps", str(args.steps)]  # fmt: skip
        # the run driver, started here as the batch script does (not spawned by rank 0 in its own
        # session), so that the demo ends it with everything else
        driver = [py, "-m", "insitu.driver", "--run", run, "--create-head"]
        try:
            with open(out / "driver.log", "wb") as log:
                procs.append(subprocess.Popen(driver, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log))
            _wait_driver(run, env, procs[-1])
            procs.append(subprocess.Popen(ana, env=env))
            procs.append(subprocess.Popen(mpiexec_mpmd(args.ranks, cluster.node_ips, sim), env=env))
            end = time.monotonic() + args.deadline + args.steps
            codes = []
            for p in procs[1:]:  # the analytics and the simulation; the driver waits for the run's end
                codes.append(p.wait(timeout=max(1.0, end - time.monotonic())))
        except subprocess.TimeoutExpired:
            print("insitu demo: timed out waiting for the simulation and analytics", file=sys.stderr)
            codes = [1]
        finally:  # SIGTERM (mpiexec forwards it to the ranks), SIGKILL after 10 s; the driver last
            end_processes(procs[:0:-1])
            end_processes(procs[:1])
    snapshots = sorted(out.glob("temperature_*.png"))
    series = "and timeseries.png" if (out / "timeseries.png").exists() else "(no plots: pip install 'insitu[plot]')"
    ok = all(c == 0 for c in codes)
    print(f"insitu demo: {'done' if ok else 'FAILED'} in {time.monotonic() - t0:.1f} s; {len(snapshots)} snapshots "
          f"{series}, stats in {out / 'stats.json'} (per step: stats.jsonl); cluster torn down",
          flush=True)  # fmt: skip
    return 0 if ok else 1


def _wait_driver(run: str, env: dict[str, str], proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Until the run driver the demo started listens (so that rank 0 finds it, not spawns another)."""
    from insitu.driver import listening

    namespace = Config.from_env(env).namespace
    end = time.monotonic() + timeout
    while not listening(run, namespace):
        if proc.poll() is not None or time.monotonic() > end:
            raise ConfigError(f"the run driver of the demo did not start (exit status {proc.poll()}; see driver.log)")
        time.sleep(0.05)


def _config(args: argparse.Namespace) -> int:
    if args.what:
        from insitu.shim import main_config

        print(main_config(args.what, args.prefix))
        return 0
    cfg = Config.from_env()
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        value = value.value if hasattr(value, "value") else value
        print(f"INSITU_{f.name.upper():22} {value}")
    return 0


def _launch(args: argparse.Namespace) -> int:
    from insitu.slurm import JobSpec, render_job, submit

    spec = JobSpec(nodes=args.nodes, ranks_per_node=args.ranks_per_node, simulation=args.simulation,
                   analytics=args.analytics, placement=args.placement, ray_cpus=args.ray_cpus,
                   cpus_per_task=args.cpus_per_task, time=args.time,
                   step_bytes=args.step_bytes, window=args.window, in_flight=args.in_flight, mpi=args.mpi,
                   job_name=args.job_name, supervise=not args.no_supervise, monitor=not args.no_monitor,
                   analytics_restarts=args.analytics_restarts)  # fmt: skip
    if args.dry_run:
        print(render_job(spec), end="")
        return 0
    print(submit(spec, Path(args.script), args.sbatch_args))
    return 0


def _record(args: argparse.Namespace) -> int:
    from insitu.record import main_record

    arrays = [a for a in args.arrays.split(",") if a]
    return main_record(args.run, arrays, args.out, args.every, args.address)


def _replay(args: argparse.Namespace) -> int:
    from insitu.replay import main_replay

    return main_replay(args.path, args.run, args.ranks, args.pace, args.steps, args.address)


def _steer(args: argparse.Namespace) -> int:
    import json

    from insitu.config import Config
    from insitu.slurm import steer

    key, _, raw = args.assignment.partition("=")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    cfg = Config.from_env()
    address = args.address or cfg.address
    if not address:
        raise ConfigError("no Ray address: pass --address host:port or set INSITU_ADDRESS (the job log prints it)")
    _check_reachable(address)
    steer(address, args.run, key, value, namespace=cfg.namespace)
    print(f"run {args.run}: {key} = {value!r}")
    return 0


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Raise ConnectionError, naming ``address``, if nothing accepts connections there."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"the Ray address must be host:port; got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConnectionError(f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); "
                              "is the job running, and is the address right?") from None  # fmt: skip


def _build_shim(args: argparse.Namespace) -> int:
    from insitu.shim import build_shim

    print(build_shim(args.prefix, mpi_library=args.mpi_library, force=args.force))
    return 0


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    """The ``insitu`` argument parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error")  # fmt: skip
    p = _Parser(prog="insitu", description="in-situ analytics for MPI simulations")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=text)

    d = command("demo", "heat2d on 4 MPI ranks with in-situ statistics on a private local Ray cluster")
    d.add_argument("--ranks", type=int, default=4)
    d.add_argument("--nodes", type=int, default=2, help="raylets of the private cluster")
    d.add_argument("--nx", type=int, default=128)
    d.add_argument("--ny", type=int, default=128)
    d.add_argument("--steps", type=int, default=400)
    d.add_argument("--threshold", type=float, default=50.0, help="stop once the plate's max falls below this")
    d.add_argument("--png-every", type=int, default=25)
    d.add_argument("--print-every", type=int, default=10)
    d.add_argument("--deadline", type=float, default=120.0)
    d.add_argument("--out", default="insitu-demo-output")
    d.set_defaults(fn=_demo)
    c = command("config", "print the effective configuration (INSITU_* variables), or build flags")
    flags = c.add_mutually_exclusive_group()
    built = " (builds libinsitu first if needed)"
    for flag, text in (("cflags", "compiler flags for insitu.h" + built),
                       ("libs", "linker flags for libinsitu" + built),
                       ("libdir", "directory of libinsitu.so (for LD_LIBRARY_PATH)" + built),
                       ("prefix", "the build directory" + built),
                       ("fortran", "path of the Fortran module source insitu.f90"),
                       ("data", "directory of the shipped examples, analytics, scripts and sources")):  # fmt: skip
        flags.add_argument(f"--{flag}", dest="what", action="store_const", const=flag, help=text)
    c.add_argument("--shim-dir", dest="prefix", default=None,
                   help="build directory (default INSITU_SHIM_DIR, else the per-user cache)")  # fmt: skip
    c.set_defaults(fn=_config, what=None)
    la = command("launch", "write a SLURM batch script for a coupled run and submit it")
    la.add_argument("--nodes", type=int, required=True)
    la.add_argument("--ranks-per-node", type=int, required=True)
    la.add_argument("--simulation", required=True, help="simulation command line (run by srun on every rank)")
    la.add_argument("--analytics", required=True, help="analytics command line")
    la.add_argument("--placement", choices=("colocated", "dedicated"), default="colocated",
                    help="analytics next to the simulation, or on the last node alone")  # fmt: skip
    la.add_argument("--ray-cpus", type=int, default=1, help="cores per node reserved for Ray and the analytics")
    la.add_argument("--cpus-per-task", type=int, default=1,
                    help="CPUs of each rank (hybrid MPI+OpenMP: OMP_NUM_THREADS defaults to it)")  # fmt: skip
    la.add_argument("--no-supervise", action="store_true",
                    help="run the analytics as is (default: insitu analytics --supervise restarts it)")  # fmt: skip
    la.add_argument("--analytics-restarts", type=int, default=3, help="restarts of a supervised analytics")
    la.add_argument("--no-monitor", action="store_true",
                    help="no insitu monitor in the job (default: on the first node, the job prints the ssh -L line)")
    la.add_argument("--time", default="00:30:00")
    la.add_argument("--step-bytes", type=int, default=64 << 20, help="bytes one node sends per step")
    la.add_argument("--window", type=int, default=2)
    la.add_argument("--in-flight", type=int, default=2)
    la.add_argument("--mpi", default="pmi2", help="srun --mpi plugin (pmi2 for MPICH, pmix for Open MPI)")
    la.add_argument("--job-name", default="insitu")
    la.add_argument("--script", default="insitu-job.sbatch", help="where to write the batch script")
    la.add_argument("--dry-run", action="store_true", help="print the script, do not submit")
    la.add_argument("sbatch_args", nargs="*", help="extra sbatch options (after --)")
    la.set_defaults(fn=_launch)
    st = command("steer", "set a steering value of a running run (e.g. stop=true)")
    st.add_argument("--run", required=True)
    st.add_argument("--address", default=None, help="Ray address (default INSITU_ADDRESS)")
    st.add_argument("assignment", help="key=value; the value is JSON if it parses, else a string")
    st.set_defaults(fn=_steer)
    r = command("record", "record a run's arrays to a Zarr store, written where the blocks live")
    r.add_argument("--run", default=None, help="run name (default INSITU_RUN)")
    r.add_argument("--arrays", required=True, help="comma-separated array names")
    r.add_argument("--every", type=int, default=1, help="record the steps that are multiples of K")
    r.add_argument("--out", required=True, help="the Zarr v3 store (a directory every node sees)")
    r.add_argument("--address", default=None, help="Ray address (default INSITU_ADDRESS)")
    r.set_defaults(fn=_record)
    rp = command("replay", "play a recording through a real Bridge under mpiexec (analytics run unchanged)")
    rp.add_argument("path", help="a store written by insitu record")
    rp.add_argument("--run", required=True, help="run name the analytics attaches to")
    rp.add_argument("--ranks", type=int, default=None, help="default: the recorded number, decomposition and nodes")
    rp.add_argument("--pace", choices=("recorded", "max"), default="max")
    rp.add_argument("--steps", default=None, help="A:B, the step numbers to replay (half-open, ends optional)")
    rp.add_argument("--address", default=None, help="Ray address (default INSITU_ADDRESS)")
    rp.set_defaults(fn=_replay)
    ss = command("status", "where a live run stands: steps, consumers, lag, store bytes, ranks' send times")
    ss.add_argument("--run", default=None, help="run name (default INSITU_RUN)")
    ss.add_argument("--address", default=None, help="Ray address (default INSITU_ADDRESS)")
    ss.add_argument("--json", action="store_true", help="one JSON document per refresh (docs/status.md)")
    ss.add_argument("--follow", action="store_true", help="refresh every --interval seconds until the run ends")
    ss.add_argument("--interval", type=float, default=1.0)
    ss.set_defaults(fn=lambda a: __import__("insitu.status").status.main_status(a.run, a.address, a.json, a.follow,
                                                                                a.interval))  # fmt: skip
    mo = command("monitor", "a live web page of a run, served by supervised modules (needs insitu[monitor])")
    mo.add_argument("--run", default=None, help="run name (default INSITU_RUN)")
    mo.add_argument("--address", default=None, help="Ray address (default INSITU_ADDRESS)")
    mo.add_argument("--host", default="127.0.0.1", help="address to listen on; off loopback a token is required")
    mo.add_argument("--port", type=int, default=8267, help="port (0: any free one; default 8267)")
    mo.add_argument("--module", action="append", default=[], metavar="NAME=PKG.MOD:FN@/api/ROUTE[,...]",
                    help="one more supervised module serving the given routes (repeatable)")
    mo.set_defaults(fn=_monitor)
    an = command("analytics", "run an analytics script; with --supervise, restart it when it dies or hangs")
    an.add_argument("--supervise", action="store_true", help="restart the analytics when it fails (see --help)")
    an.add_argument("--max-restarts", type=int, default=3, help="restarts after the first start (default 3)")
    an.add_argument("--heartbeat-deadline", type=float, default=300.0,
                    help="seconds without a heartbeat (a poll or a callback starting) before it counts as hung")
    an.add_argument("argv", nargs=argparse.REMAINDER, help="the script (a .py runs with this Python) and its options")
    an.set_defaults(fn=_analytics)
    b = command("build-shim", "build libinsitu.so, the C/Fortran shim, for this Python")
    b.add_argument("--prefix", default=None, help="build directory (default INSITU_SHIM_DIR, else "
                   "$XDG_CACHE_HOME/insitu/shim/<version-python-mpi>, ~/.cache when XDG_CACHE_HOME is unset)")
    b.add_argument("--mpi-library", default=None, help="the simulation's libmpich.so.12 (default: Debian's)")
    b.add_argument("--force", action="store_true")
    b.set_defaults(fn=_build_shim)
    i = command("debug-info", "versions of everything, for bug reports")
    i.set_defaults(fn=lambda _: (__import__("insitu").print_debug_info(), 0)[1])
    return p


def _monitor(args: argparse.Namespace) -> int:
    import asyncio

    from insitu.config import resolve_run

    try:
        from insitu.monitor.server import parse_module, serve
    except ModuleNotFoundError as exc:
        raise ConfigError(f"insitu monitor needs {exc.name}: pip install 'insitu[monitor]'") from None
    config = Config.from_env()
    config = config.replace(address=args.address or config.address)
    run = resolve_run(args.run, config)
    config.require_address()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s insitu monitor %(levelname)s %(message)s")
    extra = [parse_module(m) for m in args.module]
    return asyncio.run(serve(run, config, args.host, args.port, extra))


def _analytics(args: argparse.Namespace) -> int:
    from insitu.supervise import command_of, supervise

    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if args.supervise:
        return supervise(argv, args.max_restarts, args.heartbeat_deadline)
    return subprocess.call(command_of(argv))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``insitu`` command and of ``python -m insitu``.

    Parameters
    ----------
    argv
        Arguments (default ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit code: 0 on success, 1 after a user error, 2 for a bad option.
    """
    args = _parser().parse_args(argv)
    try:
        with terminated_cleanly():
            return int(args.fn(args))
    except USER_ERRORS as exc:
        if args.debug:
            raise
        print(f"insitu {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except Interrupted as exc:
        print(f"insitu {args.command}: {exc}; everything it started was torn down", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
