"""Helpers the SLURM launch scripts call (``insitu slurm ...``) and ``insitu launch`` / ``insitu steer``.

Each helper is a small, testable function; the shell scripts shipped in ``insitu/data/launch``
only glue them.

Examples
--------
>>> store_bytes(step_bytes=64 << 20, window=3, in_flight=2) == int(5 * (64 << 20) * 1.25)
True
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from insitu.errors import ConfigError, StepTimeoutError
from insitu.resources import data_path, executable

__all__ = [
    "JobSpec",
    "busy_ports",
    "store_bytes",
    "check_node_memory",
    "check_this_node",
    "job_memory",
    "wait_for_nodes",
    "render_job",
    "steer",
]

RAY_MIN_STORE = 80 << 20  # Ray refuses object stores below 75 MiB


def busy_ports(ip: str, ports: Sequence[int]) -> list[int]:
    """The ports of ``ports`` that cannot be bound on ``ip`` (in use by anyone).

    Ports only in TIME_WAIT (a previous job's closed connections) count as free, as
    they do for Ray's own servers.
    """
    busy = []
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((ip, port))
            except OSError:
                busy.append(port)
    return busy


def store_bytes(step_bytes: int, window: int, in_flight: int) -> int:
    """Object store per node: (window + in-flight steps) × the node's bytes per step × 1.25."""
    return max(RAY_MIN_STORE, int((window + in_flight) * step_bytes * 1.25))


def job_memory(env: Mapping[str, str]) -> int | None:
    """The job's memory on this node in bytes: ``--mem`` (SLURM_MEM_PER_NODE) or ``--mem-per-cpu`` ×
    the node's CPUs (SLURM_MEM_PER_CPU × SLURM_CPUS_ON_NODE); None when the job asked for neither.

    Examples
    --------
    >>> job_memory({"SLURM_MEM_PER_CPU": "1000", "SLURM_CPUS_ON_NODE": "4"}) == 4000 * 2**20
    True
    """
    if env.get("SLURM_MEM_PER_NODE"):
        return int(env["SLURM_MEM_PER_NODE"]) << 20
    if env.get("SLURM_MEM_PER_CPU") and env.get("SLURM_CPUS_ON_NODE"):
        return int(env["SLURM_MEM_PER_CPU"]) * int(env["SLURM_CPUS_ON_NODE"]) << 20
    return None


def _mem_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    match = re.search(r"^MemAvailable:\s+(\d+) kB", meminfo.read_text(), flags=re.MULTILINE)
    return int(match[1]) << 10 if match else None


def check_node_memory(store: int, staging: int, shm: str = "/dev/shm", job_mem: int | None = None,
                      available: int | None = None, node: str = "this node") -> None:  # fmt: skip
    """Fail fast, with the numbers, when a node cannot hold the object store and the ranks' staging files.

    Run on every node of the job (``insitu_node.sh check``): the object store and the staging
    files (slots × the node's bytes per step) both live in ``shm``; together they must fit in
    its free space and in half the job's memory on the node (``--mem`` / ``--mem-per-cpu``; the
    simulation keeps the other half), or in the node's available memory when the job set none.

    Raises
    ------
    ConfigError
        They do not fit; the message names the node and has every number.

    Examples
    --------
    >>> check_node_memory(100 << 20, 20 << 20, job_mem=200 << 20, node="n1")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    insitu.errors.ConfigError: n1: the object store (100 MiB) and staging files (20 MiB) need 120 MiB, ...
    """
    need = store + staging
    what = f"{node}: the object store ({store / 2**20:.0f} MiB) and staging files ({staging / 2**20:.0f} MiB) need " \
           f"{need / 2**20:.0f} MiB"  # fmt: skip
    free = shutil.disk_usage(shm).free
    if need > free:
        raise ConfigError(f"{what} but {shm} has {free / 2**20:.0f} MiB free; lower the window, in-flight steps "
                          "or step size, or ask for nodes with more /dev/shm")  # fmt: skip
    if job_mem is not None and need > job_mem // 2:
        raise ConfigError(f"{what}, more than half of the job's {job_mem / 2**20:.0f} MiB on the node (--mem or "
                          "--mem-per-cpu); ask for more memory or send less per step")  # fmt: skip
    if job_mem is None and available is not None and need > available:
        raise ConfigError(f"{what} but the node has {available / 2**20:.0f} MiB available; send less per step "
                          "or ask for nodes with more memory")  # fmt: skip


def check_this_node(store: int, staging: int) -> None:
    """:func:`check_node_memory` with this node's job memory, available memory and name (from the step's env)."""
    env = os.environ
    check_node_memory(store, staging, job_mem=job_memory(env), available=_mem_available(),
                      node=env.get("SLURMD_NODENAME", socket.gethostname()))  # fmt: skip


START_FAILED = "INSITU-RAY-START-FAILED"  # insitu_node.sh prints it on the Ray step's output


def wait_for_nodes(address: str, names: Sequence[str], deadline: float, failed_log: str | None = None) -> None:
    """Wait until a raylet of every SLURM node in ``names`` has joined (resource ``slurm_node_<name>``).

    ``failed_log`` is the Ray step's output as ``srun`` collects it on the batch host (never a
    file another node wrote): a node that gave up starting Ray prints
    ``INSITU-RAY-START-FAILED <node>: <why>`` there, and the wait then ends at once instead of
    at the deadline.

    Raises
    ------
    StepTimeoutError
        Not all joined within ``deadline`` seconds, or a node gave up; the message names the nodes.
    """
    end = time.monotonic() + deadline

    def check_failed(missing: Sequence[str], joined: str) -> None:
        if failed_log is None or not Path(failed_log).exists():
            return
        text = Path(failed_log).read_text(errors="replace")
        gave_up = dict(re.findall(rf"{START_FAILED} (\S+): (.*)$", text, flags=re.MULTILINE))
        gave_up = {n: why.strip() for n, why in gave_up.items() if n in missing}
        if gave_up:
            raise StepTimeoutError(
                "Ray could not be started on "
                + ", ".join(f"{n} ({why})" for n, why in gave_up.items())
                + f" (joined: {joined or 'none'}); see ray-nodes.log in the job directory, and "
                "INSITU_RAY_START_TRIES to try more often"
            )

    host, port = address.rsplit(":", 1)
    while True:  # the head's GCS first: ray.init on an address nobody serves waits for long
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            break
        except OSError:
            check_failed(names, "")
            if time.monotonic() > end:
                raise StepTimeoutError(
                    f"the Ray head {address} did not come up within {deadline:.0f} s (nodes: {', '.join(names)}); "
                    "see ray-nodes.log in the job directory"
                ) from None
            time.sleep(0.5)

    import ray

    from insitu.comm import init_ray, shutdown_ray

    init_ray(address=address, logging_level="ERROR", log_to_driver=False, configure_logging=False)
    try:
        while True:
            alive = {k.removeprefix("slurm_node_") for n in ray.nodes() if n["Alive"] for k in n["Resources"]
                     if k.startswith("slurm_node_")}  # fmt: skip
            missing = [n for n in names if n not in alive]
            if not missing:
                return
            check_failed(missing, ", ".join(sorted(alive)))
            if time.monotonic() > end:
                raise StepTimeoutError(
                    f"Ray nodes missing after {deadline:.0f} s: {', '.join(missing)} (joined: "
                    f"{', '.join(sorted(alive)) or 'none'}); see ray-nodes.log in the job directory"
                )
            time.sleep(0.5)
    finally:
        shutdown_ray()


def steer(address: str, run: str, key: str, value: object, namespace: str = "insitu") -> None:
    """Set a steering value of ``run`` from outside the analytics (e.g. ``stop`` at end of walltime)."""
    import ray

    from insitu.actors.head import head_name
    from insitu.comm import init_ray, shutdown_ray

    init_ray(address=address, namespace=namespace, logging_level="ERROR", log_to_driver=False,
             configure_logging=False)  # fmt: skip
    try:
        head = ray.get_actor(head_name(run), namespace=namespace)
        ray.get(head.set.remote(key, value, -1), timeout=30)
    finally:
        shutdown_ray()


@dataclass(frozen=True)
class JobSpec:
    """What ``insitu launch`` turns into a batch script."""

    nodes: int
    ranks_per_node: int
    simulation: str
    analytics: str
    placement: str = "colocated"  # or "dedicated": the analytics gets the last node
    ray_cpus: int = 1
    cpus_per_task: int = 1
    time: str = "00:30:00"
    step_bytes: int = 64 << 20
    window: int = 2
    in_flight: int = 2
    mpi: str = "pmi2"
    job_name: str = "insitu"
    supervise: bool = True  # the analytics runs under ``insitu analytics --supervise``
    analytics_restarts: int = 3
    monitor: bool = True  # ``insitu monitor`` on the first node; the job prints the ``ssh -L`` line

    def __post_init__(self) -> None:
        if self.placement not in ("colocated", "dedicated"):
            raise ConfigError(f"placement must be 'colocated' or 'dedicated'; got {self.placement!r}")
        if self.ray_cpus < 1 or self.cpus_per_task < 1:
            raise ConfigError(f"ray_cpus and cpus_per_task must be ≥ 1; got {self.ray_cpus} and {self.cpus_per_task}")
        if self.nodes < (2 if self.placement == "dedicated" else 1) or self.ranks_per_node < 1:
            raise ConfigError(f"need ≥ 1 simulation node and ≥ 1 rank per node; got nodes={self.nodes} "
                              f"ranks_per_node={self.ranks_per_node} with placement {self.placement}")  # fmt: skip


def template_path() -> Path:
    """``insitu.sbatch``, the batch template shipped in the package (beside ``insitu_node.sh``)."""
    return data_path("launch", "insitu.sbatch")


def render_job(spec: JobSpec) -> str:
    """The batch script for ``spec``: the template with its #SBATCH lines and settings filled in."""
    body = template_path().read_text()
    sim_nodes = spec.nodes - (1 if spec.placement == "dedicated" else 0)
    header = [
        "#!/usr/bin/env bash",
        f"#SBATCH --job-name={spec.job_name}",
        f"#SBATCH --nodes={spec.nodes}",
        # Ray's CPUs as whole tasks: ceil(ray_cpus / cpus_per_task) more tasks of cpus_per_task each
        f"#SBATCH --ntasks-per-node={spec.ranks_per_node + -(-spec.ray_cpus // spec.cpus_per_task)}",
        f"#SBATCH --cpus-per-task={spec.cpus_per_task}",
        f"#SBATCH --time={spec.time}",
        "#SBATCH --signal=B:USR1@120",
        "#SBATCH --output=insitu-%j.out",
        f"export INSITU_SIM_CMD={shlex.quote(spec.simulation)}",
        f"export INSITU_ANALYTICS_CMD={shlex.quote(spec.analytics)}",
        f"export INSITU_PLACEMENT={spec.placement}",
        f"export INSITU_SUPERVISE={int(spec.supervise)}",
        f"export INSITU_ANALYTICS_RESTARTS={spec.analytics_restarts}",
        f"export INSITU_MONITOR={int(spec.monitor)}",
        "export INSITU_MONITOR_PORT=${INSITU_MONITOR_PORT:-0}",
        f"export INSITU_SIM_NODES={sim_nodes}",
        f"export INSITU_RANKS_PER_NODE={spec.ranks_per_node}",
        f"export INSITU_RAY_CPUS={spec.ray_cpus}",
        "export INSITU_BIND_CPUS=${INSITU_BIND_CPUS:-1}",
        f"export INSITU_STEP_BYTES={spec.step_bytes}",
        f"export INSITU_WINDOW={spec.window}",
        f"export INSITU_IN_FLIGHT={spec.in_flight}",
        f"export INSITU_SRUN_MPI={spec.mpi}",
        f"export INSITU_LAUNCH_DIR={shlex.quote(str(template_path().parent))}",
        # this environment's interpreter and ray, not whatever PATH holds on the nodes
        f"export INSITU_PYTHON=${{INSITU_PYTHON:-{shlex.quote(executable('python', None))}}}",
        f"export INSITU_RAY=${{INSITU_RAY:-{shlex.quote(_ray())}}}",
    ]
    lines = body.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# ---- settings end"))
    return "\n".join(header + lines[start:]) + "\n"


def _ray() -> str:
    """The ``ray`` command next to this interpreter (``INSITU_RAY`` overrides; ``ray`` if there is none)."""
    try:
        return executable("ray", "INSITU_RAY")
    except FileNotFoundError:
        return "ray"


def submit(spec: JobSpec, script: Path, extra: Sequence[str] = ()) -> str:
    """Write the batch script and ``sbatch`` it; returns sbatch's output (the job id line)."""
    script.write_text(render_job(spec))
    script.chmod(0o755)
    proc = subprocess.run(["sbatch", *extra, str(script)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ConfigError(f"sbatch {script} failed: {proc.stderr.strip()}")
    return proc.stdout.strip()
