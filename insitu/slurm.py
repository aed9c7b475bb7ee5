"""Helpers the SLURM launch scripts call (``insitu slurm ...``) and ``insitu launch`` / ``insitu steer``.

Each helper is a small, testable function; the shell scripts shipped in ``insitu/data/launch``
only glue them.

Examples
--------
>>> store_bytes(step_bytes=64 << 20, window=3, in_flight=2) == int(5 * (64 << 20) * 1.25)
True
"""

from __future__ import annotations

import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from insitu.errors import ConfigError, StepTimeoutError
from insitu.resources import data_path, executable

__all__ = [
    "JobSpec",
    "busy_ports",
    "store_bytes",
    "check_store",
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


def check_store(need: int, shm: str = "/dev/shm", mem_per_node_mb: int | None = None) -> None:
    """Fail fast, with the numbers, when the object store cannot fit in /dev/shm or the job's memory.

    Raises
    ------
    ConfigError
        The store would not fit; the message says how much is needed and available.
    """
    free = shutil.disk_usage(shm).free
    if need > free:
        raise ConfigError(
            f"the object store needs {need / 2**20:.0f} MiB per node but {shm} has {free / 2**20:.0f} MiB free; "
            "lower the window, in-flight steps or step size, or ask for nodes with more /dev/shm"
        )
    if mem_per_node_mb and need > mem_per_node_mb * 2**20 // 2:
        raise ConfigError(
            f"the object store needs {need / 2**20:.0f} MiB per node, more than half of the job's "
            f"{mem_per_node_mb} MiB per node (--mem); ask for more memory or send less per step"
        )


def wait_for_nodes(address: str, names: Sequence[str], deadline: float, failed_dir: str | None = None) -> None:
    """Wait until a raylet of every SLURM node in ``names`` has joined (resource ``slurm_node_<name>``).

    ``failed_dir`` is where ``insitu_node.sh`` leaves ``ray-start-failed-<node>`` when a node gave up
    starting Ray; the wait then ends at once instead of at the deadline.

    Raises
    ------
    StepTimeoutError
        Not all joined within ``deadline`` seconds, or a node gave up; the message names the nodes.
    """
    end = time.monotonic() + deadline

    def check_failed(missing: Sequence[str], joined: str) -> None:
        if failed_dir is None:
            return
        gave_up = {n: (Path(failed_dir) / f"ray-start-failed-{n}") for n in missing}
        gave_up = {n: f.read_text().strip() for n, f in gave_up.items() if f.exists()}
        if gave_up:
            raise StepTimeoutError(
                "Ray could not be started on "
                + ", ".join(f"{n} ({why})" for n, why in gave_up.items())
                + f" (joined: {joined or 'none'}); see ray-node<index>.log in the job directory, and "
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
                    "see ray-node0.log in the job directory"
                ) from None
            time.sleep(0.5)

    import ray

    ray.init(address=address, logging_level="ERROR", log_to_driver=False, configure_logging=False)
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
                    f"{', '.join(sorted(alive)) or 'none'}); see ray-node<index>.log in the job directory"
                )
            time.sleep(0.5)
    finally:
        ray.shutdown()


def steer(address: str, run: str, key: str, value: object, namespace: str = "insitu") -> None:
    """Set a steering value of ``run`` from outside the analytics (e.g. ``stop`` at end of walltime)."""
    import ray

    from insitu.actors.head import head_name

    ray.init(address=address, namespace=namespace, logging_level="ERROR", log_to_driver=False,
             configure_logging=False)  # fmt: skip
    try:
        head = ray.get_actor(head_name(run), namespace=namespace)
        ray.get(head.set.remote(key, value, -1), timeout=30)
    finally:
        ray.shutdown()


@dataclass(frozen=True)
class JobSpec:
    """What ``insitu launch`` turns into a batch script."""

    nodes: int
    ranks_per_node: int
    simulation: str
    analytics: str
    placement: str = "colocated"  # or "dedicated": the analytics gets the last node
    ray_cpus: int = 1
    time: str = "00:30:00"
    step_bytes: int = 64 << 20
    window: int = 2
    in_flight: int = 2
    mpi: str = "pmi2"
    job_name: str = "insitu"

    def __post_init__(self) -> None:
        if self.placement not in ("colocated", "dedicated"):
            raise ConfigError(f"placement must be 'colocated' or 'dedicated'; got {self.placement!r}")
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
        f"#SBATCH --ntasks-per-node={spec.ranks_per_node + spec.ray_cpus}",
        f"#SBATCH --time={spec.time}",
        "#SBATCH --signal=B:USR1@120",
        "#SBATCH --output=insitu-%j.out",
        f"export INSITU_SIM_CMD={shlex.quote(spec.simulation)}",
        f"export INSITU_ANALYTICS_CMD={shlex.quote(spec.analytics)}",
        f"export INSITU_PLACEMENT={spec.placement}",
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
