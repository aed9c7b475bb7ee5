"""Shared fixtures: one private multi-raylet Ray cluster per session, MPI launch helpers.

Ray reads its auth settings at import, so the token path is fixed here, before
anything imports ray, and the session's cluster writes its token there.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from insitu.resources import data_path

ROOT = Path(__file__).resolve().parent.parent
SIM = ROOT / "tests" / "sims" / "sim.py"
# the files shipped in the package (insitu/data), as an installed insitu sees them
DATA = data_path()
HEAT2D_PY = DATA / "examples" / "python" / "heat2d.py"
HEAT_STATS = DATA / "analytics" / "heat_stats.py"
LAUNCH = DATA / "launch"
_BASE = Path(tempfile.mkdtemp(prefix="insitu-test-"))
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN_PATH"] = str(_BASE / "auth_token")
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
NODES = 2
_STARTED: list[subprocess.Popen[str]] = []


@dataclass
class SimResult:
    """What one mpiexec run printed, parsed."""

    returncode: int
    events: list[dict[str, Any]]
    stdout: str
    stderr: str

    def by_rank(self, event: str) -> dict[int, list[dict[str, Any]]]:
        out: dict[int, list[dict[str, Any]]] = {}
        for e in self.events:
            if e["event"] == event:
                out.setdefault(e["rank"], []).append(e)
        return out

    def one(self, event: str) -> dict[int, dict[str, Any]]:
        got = self.by_rank(event)
        return {r: v[-1] for r, v in got.items()}


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """``tests/mpi`` runs under ``mpiexec ... --with-mpi`` (``tests/test_mpi_inprocess.py`` does it), not here."""
    if collection_path == ROOT / "tests" / "mpi" and not config.getoption("--with-mpi", default=False):
        return True
    return None


@pytest.fixture(scope="session")
def cluster() -> Iterator[Any]:
    """A head raylet and one more on loopback addresses, with the dashboard for the state API."""
    from insitu.cluster.local import LocalCluster

    c = LocalCluster(nodes=NODES, cpus_per_node=2, dashboard=True, base_dir=str(_BASE), object_store_bytes=300 << 20)
    c.start()
    os.environ.update(c.environment())
    import ray

    ray.init(address=c.address, namespace="insitu", logging_level="WARNING", configure_logging=False,
             log_to_driver=False)  # fmt: skip
    end = time.monotonic() + 60
    while len([n for n in ray.nodes() if n["Alive"]]) < NODES:
        if time.monotonic() > end:
            raise TimeoutError(f"only {len(ray.nodes())} of {NODES} raylets joined within 60 s")
        time.sleep(0.2)
    try:
        yield c
    finally:
        ray.shutdown()
        c.stop()


def run_check(script: str, timeout: float) -> dict[str, Any]:
    """Run ``tests/sims/<script>`` (it starts its own cluster) and return the JSON it prints last."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "INSITU_"))}
    proc = subprocess.run([sys.executable, str(ROOT / "tests/sims" / script)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_coupled(sim_cmd: list[str], ana_cmd: list[str], env: dict[str, str], sim_env: dict[str, str] | None = None,
                timeout: float = 180) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Run an analytics next to a simulation (as users do); both must exit 0. The simulation's result.

    ``env`` is the analytics' environment and, unless ``sim_env`` is given, the simulation's.
    """
    ana = subprocess.Popen(ana_cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        sim = subprocess.run(sim_cmd, env=sim_env or env, capture_output=True, text=True, timeout=timeout,
                             check=False)  # fmt: skip
        assert sim.returncode == 0, sim.stdout[-2000:] + sim.stderr[-3000:]
        _, err = ana.communicate(timeout=timeout)
        assert ana.returncode == 0, err[-3000:]
    finally:
        if ana.poll() is None:
            ana.kill()
            ana.wait()
    return sim


def run_name(tag: str) -> str:
    """A fresh run name per test."""
    return f"t-{tag}-{secrets.token_hex(3)}"


def mpi_command(ranks: int, node_ips: list[str], argv: list[str], mpiexec: str | None = None) -> list[str]:
    """mpiexec with contiguous blocks of ranks per raylet (INSITU_NODE set per block).

    ``mpiexec`` replaces this environment's launcher (a compiled code's MPI launches it).
    """
    from insitu.cli import mpiexec_mpmd

    cmd = mpiexec_mpmd(ranks, node_ips, argv)
    return [mpiexec, *cmd[1:]] if mpiexec else cmd


def start_sim(cluster: Any, ranks: int, options: dict[str, Any], env: dict[str, str] | None = None,
              script: Path = SIM, nodes: list[str] | None = None) -> subprocess.Popen[str]:  # fmt: skip
    """Start the test simulation under mpiexec in its own process group."""
    full = dict(os.environ)
    full.update(cluster.environment())
    full.setdefault("INSITU_DEADLINE", "60")
    full.setdefault("INSITU_RECLAIM_DEADLINE", "20")
    full.update(env or {})
    options = {**options, "events": tempfile.mkdtemp(prefix="events-", dir=_BASE)}
    argv = [sys.executable, str(script), json.dumps(options)]
    cmd = mpi_command(ranks, nodes or cluster.node_ips, argv)
    logs = Path(options["events"])
    with open(logs / "stdout.txt", "w") as out, open(logs / "stderr.txt", "w") as err:
        proc = subprocess.Popen(cmd, env=full, stdout=out, stderr=err, text=True, start_new_session=True)
    proc.events_dir = options["events"]  # type: ignore[attr-defined]
    _STARTED.append(proc)
    return proc


def _mapped_shm() -> set[str]:
    """Names of /dev/shm files some live process maps."""
    names = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                names.update(line.rsplit("/", 1)[-1] for line in (proc / "maps").read_text().splitlines()
                             if "/dev/shm/mpich_shm_" in line)  # fmt: skip
    return names


@pytest.fixture(autouse=True)
def _no_simulation_outlives_its_test() -> Iterator[None]:
    """A test that fails before ``finish_sim`` must not leave its mpiexec to the next test; the MPICH
    shared-memory files of ranks a test killed (MPICH cannot unlink them) go too."""
    before = {f.name for f in Path("/dev/shm").glob("mpich_shm_*")}
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    new = [f for f in Path("/dev/shm").glob("mpich_shm_*") if f.name not in before]
    if new:
        in_use = _mapped_shm()
        for f in new:
            if f.name not in in_use:
                f.unlink(missing_ok=True)


def finish_sim(proc: subprocess.Popen[str], timeout: float = 120) -> SimResult:
    """Wait for a simulation; kill its process group if it overruns."""
    logs = Path(proc.events_dir)  # type: ignore[attr-defined]
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        out, err = (logs / "stdout.txt").read_text(), (logs / "stderr.txt").read_text()
        pytest.fail(f"simulation did not finish within {timeout} s\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}")
    out, err = (logs / "stdout.txt").read_text(), (logs / "stderr.txt").read_text()
    events = []
    for path in sorted(Path(proc.events_dir).glob("rank*.jsonl")):  # type: ignore[attr-defined]
        events += [json.loads(line) for line in path.read_text().splitlines() if line]
    return SimResult(proc.returncode, events, out, err)


def run_sim(cluster: Any, ranks: int, options: dict[str, Any], env: dict[str, str] | None = None,
            timeout: float = 120) -> SimResult:  # fmt: skip
    """Start and finish a simulation."""
    return finish_sim(start_sim(cluster, ranks, options, env), timeout)


def expected_field(step: int, shape: tuple[int, ...], dtype: str = "f8") -> Any:
    """The global field the test simulation sends at ``step``."""
    import numpy as np

    return (1000 * step + np.arange(int(np.prod(shape))).reshape(shape)).astype(dtype)


def wait_gone(run: str, timeout: float = 30.0) -> bool:
    """Wait until the head actor of ``run`` no longer exists."""
    from insitu.actors.head import find_head

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if find_head(run, "insitu") is None:
            return True
        time.sleep(0.25)
    return False


def processes_mentioning(text: str, where: str = "cmdline") -> list[str]:
    """Live processes (not this one) whose command line, or ``/proc/<pid>/<where>`` (``environ``,
    say), contains ``text``: what an interrupted command may have left behind."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                seen = (proc / where).read_bytes().replace(b"\0", b" ").decode(errors="replace")
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in seen and cmd:  # a zombie has an empty command line: it holds nothing
                found.append(f"{proc.name}: {cmd[:160]}")
    return found


def wait_nothing_left(texts: dict[str, str], timeout: float) -> dict[str, list[str]]:
    """Wait until no process mentions any of ``texts`` (``text -> where``); what is still left."""
    end = time.monotonic() + timeout
    while True:
        left = {t: p for t, where in texts.items() if (p := processes_mentioning(t, where))}
        if not left or time.monotonic() > end:
            return left
        time.sleep(0.5)
