"""A private Ray cluster on this host: one head raylet plus extra raylets.

Used by ``insitu demo`` and the tests. Every raylet gets its own loopback IP,
its own pinned ports, its own temp dir and its own process session, so it never
touches another Ray on the machine and is stopped by PID (never ``ray stop``).

Examples
--------
>>> from insitu.cluster.local import LocalCluster
>>> with LocalCluster(nodes=2) as cluster:  # doctest: +SKIP
...     print(cluster.address, cluster.node_ips)
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from insitu.errors import StepTimeoutError
from insitu.resources import executable
from insitu.site import ephemeral_range

__all__ = ["LocalCluster", "auth_environment", "free_port_block", "kill_session"]

log = logging.getLogger(__name__)

_PORTS_PER_NODE = 10
_LOWEST = 10000


def auth_environment(token_path: str | None) -> dict[str, str]:
    """Environment variables every Ray process of a token-protected cluster needs.

    Examples
    --------
    >>> auth_environment("/tmp/tok")["RAY_AUTH_MODE"]
    'token'
    >>> auth_environment(None)
    {}
    """
    if not token_path:
        return {}
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port_block(size: int, start: int | None = None, host: str = "127.0.0.1", below: int | None = None) -> int:
    """Return the first port of ``size`` consecutive ports that are all free now.

    Parameters
    ----------
    size
        Number of consecutive ports.
    start
        Where to start looking; default a random multiple of 100 from 10000 up, so that
        concurrent users rarely collide.
    below
        Every port of the block stays under this one (default: the kernel's ephemeral range,
        whose ports any outgoing connection may take between this check and the bind).
    """
    top = below if below is not None else ephemeral_range()[0]
    if top - size <= _LOWEST:
        top = 65536  # no room under the ephemeral range: take the chance
    base = start if start is not None else _LOWEST + secrets.randbelow(max(1, (top - size - _LOWEST) // 100)) * 100
    for candidate in [*range(base, top - size, size), *range(_LOWEST, min(base, top - size), size)]:
        if all(_port_free(p, host) for p in range(candidate, candidate + size)):
            return candidate
    raise OSError(f"no block of {size} free ports between {_LOWEST} and {top}")


def kill_session(*sids: int, grace: float = 3.0) -> None:
    """Terminate every live process of the sessions ``sids``: TERM to all at once, then KILL to
    those still running after ``grace`` s. Exited processes not yet reaped (zombies, such as a
    session leader its parent has not waited for) count as gone."""
    wanted = set(sids)

    def members() -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            # fields: state ppid pgrp session ...
            if int(fields[3]) in wanted and fields[0] not in ("Z", "X"):
                pids.append(int(entry.name))
        return pids

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in members():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + grace
        while time.monotonic() < end and members():
            time.sleep(0.05)
        if not members():
            return


@dataclass
class LocalCluster:
    """A private multi-raylet Ray cluster on loopback addresses.

    Parameters
    ----------
    nodes
        Number of raylets (the first is the head).
    cpus_per_node
        ``--num-cpus`` of every raylet.
    object_store_bytes
        ``--object-store-memory`` of every raylet.
    dashboard
        Start the dashboard (needed by ``ray.util.state``).
    token
        Protect the cluster with a fresh auth token in a 0600 file.
    base_dir
        Where temp dirs, logs and the token go (default: a new private dir).
    resources
        Extra custom resources per raylet index (e.g. ``{2: {"insitu_remote": 1}}`` marks
        raylet 2 as a tunneled node for :mod:`insitu.dispatch`).
    ips
        Node IP per raylet index instead of ``127.0.0.<2+index>`` (an address inside a network
        namespace, say).
    wrappers
        Command prefix per raylet index, e.g. ``{2: ["ip", "netns", "exec", "ns1"]}`` to run that
        raylet inside a network namespace.
    deferred
        Raylet indices :meth:`start` leaves out, to be started later with :meth:`start_node`
        (once a tunnel they need is up, say); :meth:`node_ports` gives their ports in advance.
    """

    nodes: int = 2
    cpus_per_node: int = 1
    object_store_bytes: int = 200 * 1024 * 1024
    dashboard: bool = False
    token: bool = True
    base_dir: str | None = None
    startup_deadline: float = 90.0
    resources: dict[int, dict[str, float]] = field(default_factory=dict)
    ips: dict[int, str] = field(default_factory=dict)
    wrappers: dict[int, list[str]] = field(default_factory=dict)
    deferred: frozenset[int] = frozenset()
    node_ips: list[str] = field(default_factory=list, init=False)
    address: str = field(default="", init=False)
    token_path: str | None = field(default=None, init=False)
    dashboard_url: str | None = field(default=None, init=False)
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list, init=False)
    _first: int = field(default=0, init=False)
    _ray_bin: str = field(default="", init=False)
    _env: dict[str, str] = field(default_factory=dict, init=False)
    _owns_dir: bool = field(default=False, init=False)

    def environment(self) -> dict[str, str]:
        """Variables a client of this cluster needs (address, token)."""
        env = {"INSITU_ADDRESS": self.address, "RAY_USAGE_STATS_ENABLED": "0"}
        if self.token_path:
            env["INSITU_AUTH_TOKEN_PATH"] = self.token_path
            env.update(auth_environment(self.token_path))
        return env

    def start(self) -> LocalCluster:
        """Start the head and the extra raylets; return once every raylet listens."""
        if self.base_dir is None:
            self.base_dir = tempfile.mkdtemp(prefix="insitu-ray-")
            self._owns_dir = True
        base = Path(self.base_dir)
        base.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        if self.token:
            tok = base / "auth_token"
            fd = os.open(tok, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32))
            self.token_path = str(tok)
            env.update(auth_environment(self.token_path))
        else:
            env["RAY_AUTH_MODE"] = "disabled"
        ray_bin = executable("ray", "INSITU_RAY")
        self._ray_bin, self._env = ray_bin, env
        self._first = self._pick_ports()
        self.address = f"{self.ips.get(0, '127.0.0.2')}:{self._first}"
        self.node_ips = [self.ips.get(i, f"127.0.0.{2 + i}") for i in range(self.nodes)]
        try:
            for i in range(self.nodes):
                if i not in self.deferred:
                    self.start_node(i)
        except BaseException:
            self.stop()
            raise
        log.info("local Ray cluster %s with %d raylets under %s", self.address, self.nodes, base)
        return self

    def _pick_ports(self) -> int:
        """First port of a layout whose fixed ports and worker port ranges are all free now."""
        start = None
        below = ephemeral_range()[0] - (1000 + 100 * self.nodes)  # worker ports too: first + 1000 + 100 i + k
        for _ in range(50):
            first = free_port_block(_PORTS_PER_NODE * (self.nodes + 1), start=start, below=below)
            workers = [first + 1000 + 100 * i + k for i in range(self.nodes) for k in range(40)]
            if all(_port_free(p) for p in workers):
                return first
            start = first + _PORTS_PER_NODE * (self.nodes + 1)
        raise OSError("no free port layout for the local cluster found")

    def node_ports(self, i: int) -> dict[str, int]:
        """The fixed ports of raylet ``i`` (``gcs`` only for the head)."""
        p = self._first + _PORTS_PER_NODE * (i + 1)
        wmin = self._first + 1000 + 100 * i
        ports = {"node_manager": p, "object_manager": p + 1, "dashboard_agent_listen": p + 2,
                 "dashboard_agent_grpc": p + 3, "runtime_env_agent": p + 4, "metrics": p + 5,
                 "min_worker": wmin, "max_worker": wmin + 39}  # fmt: skip
        if i == 0:
            ports.update(gcs=self._first, client_server=p + 6, dashboard=p + 7)
        return ports

    def start_node(self, i: int) -> None:
        """Start raylet ``i`` (done by :meth:`start` except for the ``deferred`` ones)."""
        assert self.base_dir is not None
        base = Path(self.base_dir)
        ip, ports = self.node_ips[i], self.node_ports(i)
        args = [
            *self.wrappers.get(i, []), self._ray_bin, "start", "--block", "--disable-usage-stats",
            f"--node-ip-address={ip}",
            f"--node-manager-port={ports['node_manager']}", f"--object-manager-port={ports['object_manager']}",
            f"--dashboard-agent-listen-port={ports['dashboard_agent_listen']}",
            f"--dashboard-agent-grpc-port={ports['dashboard_agent_grpc']}",
            f"--runtime-env-agent-port={ports['runtime_env_agent']}", f"--metrics-export-port={ports['metrics']}",
            f"--min-worker-port={ports['min_worker']}", f"--max-worker-port={ports['max_worker']}",
            f"--num-cpus={self.cpus_per_node}",
            f"--object-store-memory={self.object_store_bytes}",
            f"--temp-dir={base / f'ray-node{i}'}",
            "--resources=" + json.dumps({f"insitu_test_node{i}": 1, **self.resources.get(i, {})}),
        ]  # fmt: skip
        if i == 0:
            args += ["--head", f"--port={ports['gcs']}", f"--ray-client-server-port={ports['client_server']}"]
            if self.dashboard:
                args += ["--include-dashboard=true", "--dashboard-host=127.0.0.1",
                         f"--dashboard-port={ports['dashboard']}"]  # fmt: skip
                self.dashboard_url = f"http://127.0.0.1:{ports['dashboard']}"
            else:
                args += ["--include-dashboard=false"]
        else:
            args += [f"--address={self.address}"]
        logf = open(base / f"node{i}.log", "wb")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(
            args, env=self._env, stdout=logf, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        logf.close()
        self._procs.append(proc)
        listen = ports["gcs"] if i == 0 else ports["node_manager"]
        self._wait_port(ip, listen, f"raylet {i} ({ip})", proc, base / f"node{i}.log")
        if i == 0 and self.dashboard:
            self._wait_port("127.0.0.1", ports["dashboard"], "dashboard", proc, base / "node0.log")

    def _wait_port(self, host: str, port: int, what: str, proc: subprocess.Popen[bytes], logfile: Path) -> None:
        end = time.monotonic() + self.startup_deadline
        while time.monotonic() < end:
            if proc.poll() is not None:
                tail = logfile.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{what} exited with code {proc.returncode} during start-up:\n{tail}")
            with socket.socket() as s:
                s.settimeout(0.5)
                if s.connect_ex((host, port)) == 0:
                    return
            time.sleep(0.2)
        raise StepTimeoutError(f"{what} did not listen on {host}:{port} within {self.startup_deadline:.0f} s")

    def stop(self) -> None:
        """Stop every process this cluster started (by session id): all its sessions at once."""
        kill_session(*(proc.pid for proc in self._procs))
        for proc in self._procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log.warning("raylet process %d did not exit", proc.pid)
        self._procs.clear()
        if self._owns_dir and self.base_dir and os.environ.get("INSITU_KEEP_LOGS") != "1":
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def pids(self) -> list[int]:
        """PIDs of the session leaders (one per raylet)."""
        return [p.pid for p in self._procs]

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
