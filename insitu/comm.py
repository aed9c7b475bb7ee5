"""MPI helpers: agreement on errors, launcher checks, the Ray connection of rank 0.

Nothing here runs at import: mpi4py and ray are imported by the functions that
need them.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from insitu import errors
from insitu.cluster.local import auth_environment
from insitu.config import Config
from insitu.errors import ConfigError, ContractError, InsituError
from insitu.validate import kept_signals

__all__ = ["agree", "connect_ray", "init_ray", "launcher_mismatch", "raise_common", "resolve_nodes",
           "shutdown_ray"]

log = logging.getLogger(__name__)


def launcher_mismatch(world_size: int, environ: Mapping[str, str] | None = None) -> str | None:
    """Describe a launcher task count that differs from MPI's world size, if any.

    A classic failure: ``srun`` starts 4 tasks but the MPI library does not speak
    the launcher's PMI, so every process is a world of size 1.

    Examples
    --------
    >>> launcher_mismatch(1, {"PMI_SIZE": "4"}) is not None
    True
    >>> launcher_mismatch(4, {"PMI_SIZE": "4"}) is None
    True
    """
    env = os.environ if environ is None else environ
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE"):
        if env.get(var, "").isdigit():
            n = int(env[var])
            break
    else:
        if env.get("SLURM_STEP_ID", "").isdigit() and env.get("SLURM_STEP_NUM_TASKS", "").isdigit():
            var, n = "SLURM_STEP_NUM_TASKS", int(env["SLURM_STEP_NUM_TASKS"])
        else:
            return None
    if n == world_size:
        return None
    return (
        f"the launcher started {n} tasks ({var}={n}) but MPI's COMM_WORLD has {world_size}: the MPI "
        "library does not talk to the launcher (with srun use --mpi=pmi2 for MPICH or --mpi=pmix for "
        "Open MPI; with mpiexec use the one from the same MPI as mpi4py)"
    )


def raise_common(reports: Sequence[tuple[int, str, str] | None]) -> None:
    """Raise one exception, identical on every rank, from the gathered per-rank reports.

    The class is that of the lowest failing rank; the message names every failing rank.
    """
    failing = [r for r in reports if r is not None]
    if not failing:
        return
    cls = getattr(errors, failing[0][1], ContractError)
    if not (isinstance(cls, type) and issubclass(cls, InsituError)):
        cls = ContractError
    seen: dict[str, list[int]] = {}
    for rank, _, message in failing:
        seen.setdefault(message, []).append(rank)
    parts = []
    for message, ranks in seen.items():
        who = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks[:8]))}"
        parts.append(f"{who}: {message}")
    raise cls("; ".join(parts))


def agree(comm: Any, local: InsituError | None) -> None:
    """Collective: raise the same exception on every rank if any rank has a local error."""
    import numpy as np
    from mpi4py import MPI

    flag = np.array([0 if local is None else 1], dtype=np.int64)
    out = np.empty_like(flag)
    comm.Allreduce(flag, out, op=MPI.MAX)
    if out[0]:
        report = None if local is None else (comm.Get_rank(), type(local).__name__, str(local))
        raise_common(comm.allgather(report))


def connect_ray(config: Config) -> bool:
    """Connect this process to the configured Ray cluster; return whether it made the connection.

    Auth variables must be in place before ``ray`` is imported, because Ray reads
    them at import; a process that imported ray earlier must export them itself.
    """
    address = config.require_address()
    env = auth_environment(config.auth_token_path)
    if env and "ray" in sys.modules and os.environ.get("RAY_AUTH_MODE") != "token":
        raise ConfigError(
            "ray was imported before insitu could set RAY_AUTH_MODE=token; export RAY_AUTH_MODE=token "
            "and RAY_AUTH_TOKEN_PATH before starting Python, or import insitu's connection first"
        )
    for key, value in env.items():
        os.environ.setdefault(key, value)
    _wait_reachable(address, config.deadline)
    import ray

    if ray.is_initialized():
        return False
    init_ray(
        address=address,
        namespace=config.namespace,
        logging_level=logging.WARNING,
        configure_logging=False,
        log_to_driver=False,
    )
    return True


def init_ray(**kwargs: Any) -> None:
    """``ray.init(**kwargs)``, leaving this process's signal handlers as they were.

    ``ray.init`` replaces the main thread's SIGTERM handler with ``sys.exit``: a SIGTERM then
    raises ``SystemExit`` wherever the program is (e.g. inside a matplotlib drawing, which turns
    it into an unrelated ``TypeError`` and a traceback), and overrides an ``insitu`` command's
    own handler, which tears down what the command started. A process's handlers are its own:
    the ones in place before the call are put back.
    """
    import ray

    with kept_signals():
        ray.init(**kwargs)


def shutdown_ray() -> None:
    """``ray.shutdown()``, leaving this process's signal handlers as they were (Ray's core worker
    resets the C-level SIGTERM handler to the default as it shuts down: a later SIGTERM would then
    kill an ``insitu`` command without its clean-ups)."""
    import ray

    with kept_signals():
        ray.shutdown()


def _wait_reachable(address: str, deadline: float) -> None:
    """Wait until the GCS port accepts connections (Ray's own connect retries far longer)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"Ray address must be host:port; got {address!r}")
    end = time.monotonic() + deadline
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=min(5.0, deadline)):
                return
        except OSError as exc:
            if time.monotonic() >= end:
                raise ConnectionError(
                    f"nothing accepts connections at {address} after {deadline:.0f} s ({exc}); is the Ray "
                    "cluster up, and is INSITU_ADDRESS its GCS address?"
                ) from None
            time.sleep(0.25)


def resolve_nodes(settings: Sequence[str | None]) -> tuple[list[str], list[str]]:
    """Map every rank's node setting (IP or node id) to a live Ray node id.

    Returns the node ids per rank and a list of problems (empty on success).
    """
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    by_id = {n["NodeID"]: n for n in alive}
    by_ip: dict[str, list[str]] = {}
    for n in alive:
        by_ip.setdefault(n["NodeManagerAddress"], []).append(n["NodeID"])
    known = ", ".join(f"{n['NodeManagerAddress']} ({n['NodeID'][:12]})" for n in alive)
    out: list[str] = []
    bad: dict[str, list[int]] = {}
    for rank, setting in enumerate(settings):
        if setting is None:
            if len(alive) == 1:
                out.append(alive[0]["NodeID"])
                continue
            bad.setdefault(
                f"INSITU_NODE is unset but the cluster has {len(alive)} nodes ({known}); launchers set it "
                "to the raylet IP or node id of each rank's node",
                [],
            ).append(rank)
        elif setting in by_id:
            out.append(setting)
            continue
        elif len(by_ip.get(setting, [])) == 1:
            out.append(by_ip[setting][0])
            continue
        elif len(by_ip.get(setting, [])) > 1:
            bad.setdefault(
                f"INSITU_NODE={setting} matches {len(by_ip[setting])} raylets; use a node id instead", []
            ).append(rank)
        else:
            bad.setdefault(f"INSITU_NODE={setting} matches no live Ray node (live: {known})", []).append(rank)
        out.append("")
    problems = [f"rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r[:8]))}: {m}" for m, r in bad.items()]
    return out, problems
