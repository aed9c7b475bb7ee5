"""CPU binding inside the job's allowance: which CPUs Ray, the co-located analytics and each rank get.

The allowance of a job on a node is the list of CPU IDs SLURM gave the *job* there
(``scontrol show job -d``: ``Nodes=... CPU_IDs=...``), not the CPU mask of whatever step a
process happens to run in (an ``srun --overlap`` step's mask is the step's share, and under
``task/affinity`` a one-task-per-node step is bound to one CPU). The plan is made once, in the
batch script, from that allowance:

* Ray (its raylet, workers and the co-located analytics) gets the first ``ray_cpus`` CPUs;
* local rank ``i`` gets the next ``cpus_per_task`` CPUs (a hybrid MPI+OpenMP rank keeps all of
  its CPUs); CPUs left over go to Ray and the analytics;
* a node without enough CPUs is refused with the numbers (:class:`~insitu.errors.ConfigError`),
  so two jobs on one node never end up on one core. Only emulated nodes that advertise more CPUs
  than their host has (several ``slurmd`` on one host) share: there the allowance is the host's
  CPUs and ranks wrap around the CPUs left after Ray's.

SLURM reports *abstract* CPU IDs (socket by socket, core by core, hardware thread fastest), not
the kernel's numbering; :func:`machine_ids` maps them with the node's own topology from
``/sys/devices/system/cpu`` before anything is bound.

The functions are pure and tested on recorded ``scontrol`` outputs; ``python -m insitu.binding``
is what ``insitu.sbatch`` and ``insitu_node.sh`` call.

Examples
--------
>>> text = "JobId=7\\n   Nodes=n1 CPU_IDs=0-3 Mem=0\\n   Nodes=n[2-3] CPU_IDs=4-7 Mem=0\\n"
>>> allowance = job_allowance(text)
>>> allowance["n3"]
(4, 5, 6, 7)
>>> plan = plan_node(allowance["n1"], ray_cpus=1, ranks=1, cpus_per_task=2)
>>> plan.ray, plan.ranks
((0, 3), ((1, 2),))
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from insitu.errors import ConfigError

__all__ = [
    "CpuTopology",
    "NodePlan",
    "expand_hostlist",
    "format_cpu_list",
    "job_allowance",
    "machine_ids",
    "parse_cpu_list",
    "plan_job",
    "plan_node",
    "read_topology",
]


@dataclass(frozen=True)
class NodePlan:
    """The CPUs of one node: Ray's (with the co-located analytics) and each local rank's."""

    ray: tuple[int, ...]
    ranks: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class CpuTopology:
    """One logical CPU as the kernel numbers it, with its package (socket) and core."""

    cpu: int
    package: int
    core: int


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """``"0-3,8,10-11"`` as CPU IDs.

    Examples
    --------
    >>> parse_cpu_list("0-2,8")
    (0, 1, 2, 8)
    """
    cpus: list[int] = []
    for part in filter(None, text.strip().split(",")):
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(cpus)


def format_cpu_list(cpus: Sequence[int]) -> str:
    """CPU IDs as the shortest list of ranges (``taskset -c`` and ``Cpus_allowed_list`` syntax).

    Examples
    --------
    >>> format_cpu_list([3, 0, 1, 2, 8])
    '0-3,8'
    """
    out: list[str] = []
    ids = sorted(set(cpus))
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(out)


def expand_hostlist(text: str) -> list[str]:
    """A SLURM host list (``node[1-3,07],gpu1``) as host names, in order.

    Examples
    --------
    >>> expand_hostlist("n[1-3,07],gpu1")
    ['n1', 'n2', 'n3', 'n07', 'gpu1']
    """
    hosts: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", text):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            width = len(lo)
            hosts.extend(f"{prefix}{i:0{width}d}" for i in range(int(lo), int(hi or lo) + 1))
    return hosts


def job_allowance(scontrol_text: str) -> dict[str, tuple[int, ...]]:
    """The job's abstract CPU IDs per node, from ``scontrol show job -d <id>``.

    Raises
    ------
    ConfigError
        The output has no ``Nodes=... CPU_IDs=...`` line (not ``-d``, or the job is not running).
    """
    allowance: dict[str, tuple[int, ...]] = {}
    for hosts, ids in re.findall(r"^\s*Nodes=(\S+)\s+CPU_IDs=(\S+)", scontrol_text, flags=re.MULTILINE):
        for host in expand_hostlist(hosts):
            allowance[host] = parse_cpu_list(ids)
    if not allowance:
        raise ConfigError("`scontrol show job -d` printed no 'Nodes=... CPU_IDs=...' line: is the job running? "
                          "(CPU binding needs the job's CPU IDs on each node)")  # fmt: skip
    return allowance


def plan_node(allowance: Sequence[int], ray_cpus: int, ranks: int, cpus_per_task: int = 1,
              share: bool = False, node: str = "this node") -> NodePlan:  # fmt: skip
    """Split a node's allowance between Ray (and the co-located analytics) and its ranks.

    Ray gets the first ``ray_cpus`` CPUs and whatever is left over after the ranks; local rank
    ``i`` gets ``cpus_per_task`` CPUs of its own.

    Parameters
    ----------
    allowance
        The job's CPU IDs on the node, in order.
    ray_cpus, ranks, cpus_per_task
        CPUs kept for Ray, ranks on this node, CPUs of each rank (``--cpus-per-task``).
    share
        Emulated nodes only: when the CPUs are too few, ranks wrap around the CPUs after Ray's
        instead of the plan being refused.

    Raises
    ------
    ConfigError
        The node has fewer CPUs than Ray and the ranks need (the message has the numbers).

    Examples
    --------
    >>> plan_node([4, 5, 6, 7], ray_cpus=1, ranks=3).ranks
    ((5,), (6,), (7,))
    >>> plan_node([0, 1], ray_cpus=1, ranks=2, share=True).ranks
    ((1,), (1,))
    """
    cpus = list(dict.fromkeys(allowance))
    need = ray_cpus + ranks * cpus_per_task
    if min(ray_cpus, ranks, cpus_per_task) < 1:
        raise ConfigError(f"ray_cpus, ranks and cpus_per_task must be ≥ 1; got {ray_cpus}, {ranks}, {cpus_per_task}")
    if len(cpus) < need and not (share and len(cpus) > 0):
        raise ConfigError(
            f"{node} gives the job {len(cpus)} CPUs ({format_cpu_list(cpus) or 'none'}) but Ray needs {ray_cpus} and "
            f"{ranks} ranks × {cpus_per_task} CPUs per task need {ranks * cpus_per_task}; ask SLURM for "
            f"{need} CPUs per node (--ntasks-per-node / --cpus-per-task) or lower INSITU_RAY_CPUS"
        )
    if len(cpus) >= need:
        ray = cpus[:ray_cpus] + cpus[need:]
        rank_cpus = tuple(tuple(cpus[ray_cpus + i * cpus_per_task: ray_cpus + (i + 1) * cpus_per_task])
                          for i in range(ranks))  # fmt: skip
        return NodePlan(tuple(ray), rank_cpus)
    ray = cpus[: min(ray_cpus, len(cpus))]
    rest = cpus[len(ray):] or cpus
    rank_cpus = tuple(tuple(rest[(i * cpus_per_task + k) % len(rest)] for k in range(min(cpus_per_task, len(rest))))
                      for i in range(ranks))  # fmt: skip
    return NodePlan(tuple(ray), rank_cpus)


def plan_job(allowance: Mapping[str, Sequence[int]], ray_cpus: int, ranks: int, cpus_per_task: int = 1,
             share: bool = False) -> dict[str, NodePlan]:  # fmt: skip
    """:func:`plan_node` for every node of the job; a node with too few CPUs is named in the error."""
    return {node: plan_node(cpus, ray_cpus, ranks, cpus_per_task, share, node) for node, cpus in allowance.items()}


def read_topology(root: Path = Path("/sys/devices/system/cpu")) -> list[CpuTopology]:
    """This node's online CPUs with their package and core (from sysfs)."""
    topo = []
    for d in sorted(root.glob("cpu[0-9]*"), key=lambda p: int(p.name[3:])):
        t = d / "topology"
        if not (t / "core_id").exists():
            continue  # offline
        topo.append(CpuTopology(int(d.name[3:]), int((t / "physical_package_id").read_text()),
                                int((t / "core_id").read_text())))  # fmt: skip
    return topo


def machine_ids(abstract: Sequence[int], topology: Sequence[CpuTopology]) -> tuple[int, ...]:
    """SLURM's abstract CPU IDs as the kernel's, given the node's topology.

    SLURM numbers CPUs socket by socket, core by core, with a core's hardware threads
    consecutive; the kernel usually numbers first threads of every core before the siblings.

    Raises
    ------
    ConfigError
        An abstract ID beyond this node's CPUs (SLURM's node description does not match the node).

    Examples
    --------
    >>> topo = [CpuTopology(c, 0, c % 2) for c in range(4)]  # 2 cores × 2 threads: cpu2 is cpu0's sibling
    >>> machine_ids([0, 1], topo)
    (0, 2)
    """
    order = sorted(topology, key=lambda t: (t.package, t.core, t.cpu))
    if any(a >= len(order) or a < 0 for a in abstract):
        raise ConfigError(f"SLURM CPU IDs {format_cpu_list(abstract)} are beyond this node's {len(order)} CPUs; the "
                          "node's slurm.conf (CPUs, Sockets, Cores, Threads) does not match it")  # fmt: skip
    return tuple(order[a].cpu for a in abstract)


def _encode(plans: Mapping[str, NodePlan]) -> str:
    return json.dumps({n: [format_cpu_list(p.ray), *map(format_cpu_list, p.ranks)] for n, p in plans.items()},
                      separators=(",", ":"))  # fmt: skip


def _plan_command(job: str, ray_cpus: int, ranks: int, cpus_per_task: int, emulated: bool) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-d", job], capture_output=True, text=True, check=False,
                         timeout=60)  # fmt: skip
    if out.returncode != 0:
        raise ConfigError(f"scontrol show job -d {job} failed: {out.stderr.strip()}")
    allowance = job_allowance(out.stdout)
    share = False
    host = tuple(t.cpu for t in read_topology())
    if emulated and any(c >= len(host) for cpus in allowance.values() for c in cpus):
        # emulated nodes advertising more CPUs than this host has: plan on the host's, sharing
        allowance, share = {n: host for n in allowance}, True
    return _encode(plan_job(allowance, ray_cpus, ranks, cpus_per_task, share))


def _cpus_command(role: str, local_id: int, env: Mapping[str, str]) -> str:
    if "INSITU_BINDING" not in env or "SLURMD_NODENAME" not in env:
        raise ConfigError("`cpus` runs inside a SLURM step of a job whose batch script exported INSITU_BINDING")
    plans = json.loads(env["INSITU_BINDING"])
    node = env["SLURMD_NODENAME"]
    if node not in plans:
        raise ConfigError(f"INSITU_BINDING has no plan for {node} (nodes: {', '.join(plans)})")
    lists = plans[node]
    abstract = parse_cpu_list(lists[0 if role == "ray" else 1 + local_id % (len(lists) - 1)])
    if env.get("INSITU_EMULATED_NODES") == "1":
        return format_cpu_list(abstract)
    return format_cpu_list(machine_ids(abstract, read_topology()))


def _main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m insitu.binding", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    pj = sub.add_parser("plan", help="print the job's plan (INSITU_BINDING) from `scontrol show job -d`")
    pj.add_argument("--job", required=True)
    pj.add_argument("--ray-cpus", type=int, required=True)
    pj.add_argument("--ranks", type=int, required=True)
    pj.add_argument("--cpus-per-task", type=int, default=1)
    pj.add_argument("--emulated", action="store_true",
                    help="several slurmd on one host: the host's CPUs when nodes advertise more")  # fmt: skip
    pc = sub.add_parser("cpus", help="this node's kernel CPU list for Ray or a local rank (from INSITU_BINDING)")
    pc.add_argument("role", choices=("ray", "rank"))
    pc.add_argument("local_id", type=int, nargs="?", default=0)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "plan":
            print(_plan_command(args.job, args.ray_cpus, args.ranks, args.cpus_per_task, args.emulated))
        else:
            print(_cpus_command(args.role, args.local_id, os.environ))
    except (ConfigError, ValueError) as exc:
        print(f"insitu.binding: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main())
