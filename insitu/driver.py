"""The run driver: the one Ray driver of a run's simulation side, outside the ranks.

No simulation process (Python, C or Fortran rank) imports Ray. Registering a run
(creating its head actor, resolving every rank's node, creating the node actors)
needs a Ray driver, so one separate process per run and host does it:

* under SLURM the batch script starts it (``python -m insitu.driver --run RUN
  --create-head``) on the batch host as soon as the Ray cluster is up, long before
  ``srun``-ing the simulation. It then creates the head and has it start a node process
  on every alive node (:mod:`insitu.actors.warm`; ``--no-prewarm`` to not), so the
  simulation's set-up does not wait for Ray to start worker processes;
* for plain ``mpiexec`` runs, rank 0 of the :class:`~insitu.bridge.Bridge` (the only
  rank that ever talks to it) spawns it on its own host when no driver of the run
  listens there (:func:`connect_driver`). It runs in its own session with its output
  in a log file, so it outlives the ``mpiexec``/``srun`` step of the simulation.

Rank 0 reaches it through an abstract-namespace Unix socket named after the run
(:func:`driver_address`) with the frame codec of :mod:`insitu.transport`. The driver
exits once the run's head actor is gone (the run was reclaimed), after a failed
registration, or when nobody connected within its idle deadline: it is reclaimed with
the run and owns nothing (the head actor is detached).

Examples
--------
>>> driver_address("demo", "insitu")
'\\x00insitu-driver-insitu-demo'
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from insitu.config import Config, FailurePolicy
from insitu.errors import ContractError, InsituError
from insitu.layout import ArraySpec, validate_layout
from insitu.messages import AbortRun, DriverHello, DriverRefused, RegisterRun, RunRegistered, SimInfo
from insitu.reach import listens
from insitu.transport import RankChannel

__all__ = ["connect_driver", "driver_address", "main", "register_run", "serve"]

log = logging.getLogger(__name__)

_SCRUB = ("PMI_", "PMIX_", "OMPI_", "HYDRA_", "MPIR_", "SLURM_STEP_", "SLURM_PROCID", "SLURM_LOCALID")
_HEAD_CHECK = 2.0  # seconds between two checks that the run's head is still alive


def driver_address(run: str, namespace: str) -> str:
    """The abstract Unix socket name of the driver of ``run`` (unique per host and run)."""
    name = f"insitu-driver-{namespace}-{run}"
    if len(name) > 100:  # sun_path holds 108 bytes
        name = "insitu-driver-" + hashlib.sha256(name.encode()).hexdigest()[:40]
    return "\0" + name


def listening(run: str, namespace: str) -> bool:
    """Whether a driver of ``run`` listens on this host (its abstract socket is bound; Linux)."""
    name = "@" + driver_address(run, namespace)[1:]
    try:
        table = Path("/proc/net/unix").read_text()
    except OSError:
        return False
    return any(line.split()[-1] == name for line in table.splitlines()[1:] if len(line.split()) >= 8)


def _spawn(run: str, config: Config, idle: float) -> tuple[int, Path]:
    """Start the driver through a short-lived intermediate (``--detach``), which starts it in
    a new session and exits at once: the rank keeps no child process, so nothing of the
    driver (no zombie, no ``Popen`` still running) is tied to the rank's lifetime."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUB)}
    fd, name = tempfile.mkstemp(prefix=f"insitu-driver-{run[:40]}-", suffix=".log")
    logfile = Path(name)
    args = ["--run", run, "--namespace", config.namespace, "--idle", str(idle), "--log", str(logfile)]
    try:
        done = subprocess.run([sys.executable, "-m", "insitu.driver", "--detach", *args], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=fd, env=env, timeout=60, check=False)  # fmt: skip
    finally:
        os.close(fd)
    if done.returncode != 0 or not done.stdout.strip().isdigit():
        raise ContractError(f"could not start the run driver of run {run!r}: {_tail(logfile)} (log {logfile})")
    return int(done.stdout), logfile


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def connect_driver(run: str, config: Config) -> tuple[RankChannel, DriverHello]:
    """Connect to the driver of ``run`` on this host, spawning it if none listens.

    Called by rank 0 of a bridge only. Raises :class:`ContractError` naming the
    driver's log when it cannot be started within the start-up deadline.
    """
    address = driver_address(run, config.namespace)
    setup = max(config.deadline, config.startup_deadline)
    end = time.monotonic() + setup
    pid: int | None = None
    logfile: Path | None = None
    while True:
        try:
            channel = RankChannel(address, min(10.0, setup))
            break
        except (ConnectionRefusedError, FileNotFoundError):
            pass
        if pid is None:
            pid, logfile = _spawn(run, config, setup)
        elif not _alive(pid):
            # it may have lost a race against another driver of the run that now listens
            try:
                channel = RankChannel(address, min(10.0, setup))
                break
            except (ConnectionRefusedError, FileNotFoundError):
                raise ContractError(
                    f"the run driver of run {run!r} (pid {pid}) exited before listening: {_tail(logfile)} "
                    f"(log {logfile})"
                ) from None
        if time.monotonic() > end:
            raise ContractError(
                f"the run driver of run {run!r} did not listen within {setup:.0f} s"
                + (f" (log {logfile}: {_tail(logfile)})" if logfile else "")
            )
        time.sleep(0.02)
    got = channel.wait_for(lambda ms: bool(ms), end)
    if not got or not isinstance(got[0], DriverHello):
        channel.close()
        raise ContractError(f"the run driver of run {run!r} did not greet within {setup:.0f} s")
    return channel, got[0]


# -- the driver process ---------------------------------------------------------------------
class _Driver:
    """State of one driver process (see the module docstring)."""

    def __init__(self, run: str, namespace: str) -> None:
        self.run = run
        self.namespace = namespace
        self.config: Config | None = None
        self.head: Any = None
        self.failed = False
        self.registered = False

    def connect(self, config: Config) -> None:
        from insitu.comm import connect_ray

        if self.config is None:
            connect_ray(config)
            self.config = config
        elif config.address != self.config.address:
            raise ContractError(
                f"the run driver of run {self.run!r} is connected to Ray at {self.config.address}, "
                f"the simulation asks for {config.address}: use one address, or another run name"
            )

    def ensure_head(self) -> Any:
        from insitu.actors.head import get_or_create_head

        assert self.config is not None
        if self.head is None:
            self.head = get_or_create_head(self.run, self.config)
        return self.head

    def register(self, msg: RegisterRun) -> RunRegistered | DriverRefused:
        import ray

        from insitu.comm import resolve_nodes

        try:
            try:
                self.connect(msg.config)
            except (ConnectionError, TimeoutError) as exc:
                self.failed = True
                return DriverRefused(f"cannot reach Ray at {msg.config.address}: {exc}")
            assert self.config is not None
            head = self.ensure_head()
            setup = max(self.config.deadline, self.config.startup_deadline)
            end = time.monotonic() + setup
            while True:  # raylets may still be joining when a launcher starts the ranks
                if not listens(self.config.address or ""):
                    self.failed = True
                    return DriverRefused(f"the Ray cluster at {self.config.address} went away during set-up")
                rank_nodes, problems = resolve_nodes(msg.node_settings)
                if not problems or time.monotonic() > end or not any("no live" in p for p in problems):
                    break
                time.sleep(0.5)
            if problems:
                self.failed = True
                self._abort("; ".join(problems), registered=False)
                return DriverRefused("; ".join(problems))
            raising = msg.config.on_analytics_failure == FailurePolicy.RAISE
            info = SimInfo(msg.size, msg.layouts, tuple(rank_nodes), msg.config.in_flight, raising)
            try:
                addresses = ray.get(head.register_simulation.remote(info), timeout=setup)
            except ray.exceptions.GetTimeoutError:
                # it may still complete on the head: ours to abort
                self.failed = True
                self._abort(f"registration did not complete within {setup:.0f} s", registered=True)
                return DriverRefused(f"registering run {self.run!r} did not complete within {setup:.0f} s")
            self.registered = True
            return RunRegistered(tuple(rank_nodes), addresses)
        except InsituError as exc:
            self.failed = True
            return DriverRefused(str(exc))
        except Exception as exc:  # Ray's own errors, reported to rank 0 and from there to every rank
            self.failed = True
            cause = getattr(exc, "cause", None) or exc
            return DriverRefused(f"registering run {self.run!r} failed: {type(cause).__name__}: {cause}")

    def _abort(self, reason: str, registered: bool) -> None:
        import ray

        if self.head is None:
            return
        try:
            ray.get(self.head.abort.remote(reason, registered), timeout=10)
        except Exception as exc:  # best effort: the head's own watchdog reclaims it anyway
            log.warning("could not abort run %s on its head actor: %s", self.run, exc)

    def head_alive(self) -> bool:
        """Whether the run's head answers (a busy head counts as alive; a cluster whose GCS no longer
        accepts connections does not: Ray's own calls would wait for its reconnect timeout)."""
        import ray

        assert self.config is not None
        if self.config.address and not listens(self.config.address):
            return False
        try:
            ray.get(self.head.ping.remote(), timeout=10)
        except ray.exceptions.GetTimeoutError:
            return True  # busy, not gone
        except Exception:
            return False
        return True

    def serve_client(self, channel: RankChannel, deadline: float) -> None:
        """Answer one client's messages until it disconnects."""
        channel.send(DriverHello(os.getpid()))
        while not channel.closed:
            for msg in channel.poll(1.0):
                if isinstance(msg, RegisterRun):
                    channel.send(self.register(msg))
                elif isinstance(msg, AbortRun):
                    self.failed = True
                    self._abort(msg.reason, msg.registered)
                    channel.send(DriverHello(os.getpid()))  # acknowledgement


def register_run(
    driver: RankChannel | None, config: Config, run: str, size: int, gathered: list[Any]
) -> tuple[Any, ...]:
    """Rank 0 of a bridge: validate every rank's declarations and register the run through ``driver``.

    ``gathered`` holds each rank's (local error, array summaries, node setting, run name). Returns
    ``("ok", layouts, rank_nodes, addresses)`` or ``("error", message)``, broadcast to every rank.
    """
    errors = [f"rank {r}: {g[0]}" for r, g in enumerate(gathered) if g[0] is not None]
    if errors:
        return ("error", "; ".join(errors))
    names = {g[3] for g in gathered}
    if len(names) > 1:
        return ("error", f"ranks disagree on the run name: {sorted(names)}")
    try:
        per_rank = [{n: ArraySpec(n, s[1], s[2], start=s[3], shape=s[4]) for n, s in g[1].items()} for g in gathered]
        layouts = validate_layout(per_rank)
    except ContractError as exc:
        return ("error", str(exc))
    assert driver is not None  # rank 0 without a local error has connected to its run driver
    # the driver waits up to the set-up deadline for raylets, then for the head: allow both
    setup = max(config.deadline, config.startup_deadline)
    settings = tuple(g[2] for g in gathered)
    try:
        driver.send(RegisterRun(config, size, tuple(layouts.values()), settings))
        got = driver.wait_for(
            lambda ms: any(isinstance(m, RunRegistered | DriverRefused) for m in ms),
            time.monotonic() + 2 * setup + 30,
        )
    except OSError as exc:
        return ("error", f"lost the run driver of run {run!r} during registration: {exc}")
    for m in got:
        if isinstance(m, DriverRefused):
            return ("error", m.message)
        if isinstance(m, RunRegistered):
            return ("ok", layouts, list(m.rank_nodes), m.addresses)
    what = "closed the connection" if driver.closed else f"did not answer within {2 * setup + 30:.0f} s"
    return ("error", f"the run driver of run {run!r} {what} during registration")


def serve(run: str, namespace: str, idle: float, config: Config | None = None, prewarm: bool = True,
          ready_file: str | None = None) -> int:  # fmt: skip
    """Run the driver of ``run`` until the run's head is gone; return an exit status.

    With ``config`` (the launcher's case) it connects to Ray and creates the head at once,
    which starts the node processes ahead (``prewarm``); otherwise it waits for rank 0's
    registration, at most ``idle`` seconds. ``ready_file`` is created once the head is up and
    the node processes started ahead answered (or did not within the start-up deadline): a
    launcher waits for it before starting the simulation.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(driver_address(run, namespace))
    except OSError:
        log.info("another driver of run %s listens on this host; exiting", run)
        return 0
    sock.listen(16)
    sock.settimeout(1.0)
    driver = _Driver(run, namespace)
    if config is not None:
        driver.connect(config)
        head = driver.ensure_head()
        if prewarm:  # ranks connecting meanwhile wait in the listen backlog
            _prewarm(run, head, max(config.deadline, config.startup_deadline))
        if ready_file:
            Path(ready_file).parent.mkdir(parents=True, exist_ok=True)
            Path(ready_file).write_text(f"{os.getpid()}\n")
    last = time.monotonic()
    checked = 0.0
    try:
        while True:
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                conn = None
            if conn is not None:
                try:
                    driver.serve_client(RankChannel.from_socket(conn), idle)
                except OSError as exc:  # the rank died (killed, its job cancelled) before the answer
                    log.warning("run %s: the registering rank went away before its answer (%s)", run, exc)
                last = time.monotonic()
                if driver.failed or (config is None and not driver.registered):
                    return 0  # a spawned driver serves one registration; the run's watchdogs do the rest
                continue
            now = time.monotonic()
            if driver.head is None:
                if now - last > idle:
                    log.info("nobody registered run %s within %.0f s; exiting", run, idle)
                    return 0
            elif now - checked > _HEAD_CHECK:
                checked = now
                if not driver.head_alive():
                    log.info("the head of run %s is gone; exiting", run)
                    return 0
    finally:
        sock.close()


def _prewarm(run: str, head: Any, deadline: float) -> None:
    import ray

    t0 = time.monotonic()
    try:
        started = ray.get(head.prewarm.remote(), timeout=deadline)
    except Exception as exc:  # noqa: BLE001 - the node processes are then started at registration
        log.warning("run %s: node processes could not be started ahead: %s: %s", run, type(exc).__name__, exc)
    else:
        log.info("run %s: %d node processes started ahead in %.1f s", run, started, time.monotonic() - t0)


def main(argv: list[str] | None = None) -> int:
    """``python -m insitu.driver --run RUN [--create-head]`` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m insitu.driver", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="run name")
    parser.add_argument("--namespace", default=None, help="Ray namespace (default INSITU_NAMESPACE)")
    parser.add_argument("--idle", type=float, default=None, help="seconds to wait for a registration")
    parser.add_argument("--create-head", action="store_true", help="connect to Ray (INSITU_ADDRESS) now")
    parser.add_argument("--no-prewarm", action="store_true",
                        help="with --create-head: do not start node processes before the simulation registers")
    parser.add_argument("--ready-file", default=None,
                        help="with --create-head: file created once the head and the node processes are up")
    parser.add_argument("--log", default=None, help="log file to remove after a clean exit")
    parser.add_argument("--detach", action="store_true", help="start the driver in a new session, print its pid")
    args = parser.parse_args(argv)
    if args.detach:
        rest = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--detach"]
        log_fd = os.open(args.log, os.O_WRONLY | os.O_APPEND) if args.log else subprocess.DEVNULL
        child = subprocess.Popen([sys.executable, "-m", "insitu.driver", *rest], stdin=subprocess.DEVNULL,
                                 stdout=log_fd, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        print(child.pid, flush=True)
        os._exit(0)  # leave the driver running; no Popen finalizer of ours waits for it
    logging.basicConfig(level=logging.INFO, format="%(asctime)s insitu.driver %(message)s")
    try:
        cfg = Config.from_env()
        namespace = args.namespace or cfg.namespace
        idle = args.idle if args.idle is not None else max(cfg.deadline, cfg.startup_deadline)
        status = serve(args.run, namespace, idle, cfg if args.create_head else None, not args.no_prewarm,
                       args.ready_file)  # fmt: skip
    except InsituError as exc:
        print(f"insitu.driver: {exc}", file=sys.stderr)
        return 2
    if status == 0 and args.log:
        Path(args.log).unlink(missing_ok=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
