"""CPU binding inside the job's allowance (insitu.binding): recorded ``scontrol`` outputs, then one real job
under a local SLURM with ``TaskPlugin=task/affinity``.

Why not ``task/cgroup`` here: the emulated nodes are several ``slurmd`` on one host; ``task/cgroup``
needs one cgroup tree per ``slurmd`` (each would claim the same ``/sys/fs/cgroup/system.slice/slurmstepd.scope``)
and a systemd that delegates it, which this container does not have. ``task/affinity`` binds with
``sched_setaffinity`` only, so it runs here and shows the same thing a cgroup would enforce: whether
every process of the job stays inside the job's CPU IDs.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from insitu.binding import CpuTopology, job_allowance, machine_ids, parse_cpu_list, plan_job, plan_node
from insitu.errors import ConfigError
from tests.conftest import HEAT2D_PY, ROOT
from tests.slurm_jobs import assert_clean, private_slurm, submit, wait_job

# `scontrol show job -d` of two jobs sharing one 8-CPU node (CR_Core), as SLURM 22.05 prints them
JOB_A = """JobId=101 JobName=insitu
   UserId=alice(1001) GroupId=alice(1001) MCS_label=N/A
   JobState=RUNNING Reason=None Dependency=(null)
   NodeList=n01
   BatchHost=n01
   NumNodes=1 NumCPUs=4 NumTasks=4 CPUs/Task=1 ReqB:S:C:T=0:0:*:*
   TRES=cpu=4,node=1,billing=4
   Socks/Node=* NtasksPerN:B:S:C=4:0:*:* CoreSpec=*
   JOB_GRES=(null)
     Nodes=n01 CPU_IDs=0-3 Mem=0 GRES=
   MinCPUsNode=4 MinMemoryNode=0 MinTmpDiskNode=0
"""
JOB_B = JOB_A.replace("JobId=101", "JobId=102").replace("alice", "bob").replace("CPU_IDs=0-3", "CPU_IDs=4-7")
# a hybrid MPI+OpenMP job on two nodes: 2 ranks × 3 CPUs + 1 for Ray per node
HYBRID = """JobId=103 JobName=hybrid
   NodeList=n[01-02]
   NumNodes=2 NumCPUs=14 NumTasks=5 CPUs/Task=3 ReqB:S:C:T=0:0:*:*
     Nodes=n01 CPU_IDs=0-6 Mem=4000 GRES=
     Nodes=n02 CPU_IDs=1-7 Mem=4000 GRES=
"""


def test_two_jobs_on_one_node_never_share_a_cpu() -> None:
    plans = [plan_job(job_allowance(text), ray_cpus=1, ranks=3) for text in (JOB_A, JOB_B)]
    used = []
    for plan, allowed in zip(plans, ((0, 1, 2, 3), (4, 5, 6, 7)), strict=True):
        p = plan["n01"]
        cpus = [*p.ray, *(c for r in p.ranks for c in r)]
        assert sorted(cpus) == list(allowed)  # inside the job's CPU IDs, each exactly once
        used.extend(cpus)
    assert plans[0]["n01"].ray == (0,) and plans[0]["n01"].ranks == ((1,), (2,), (3,))
    assert plans[1]["n01"].ray == (4,) and plans[1]["n01"].ranks == ((5,), (6,), (7,))
    assert len(used) == len(set(used)) == 8


def test_hybrid_ranks_keep_all_their_cpus_on_every_node() -> None:
    plans = plan_job(job_allowance(HYBRID), ray_cpus=1, ranks=2, cpus_per_task=3)
    assert plans["n01"].ray == (0,) and plans["n01"].ranks == ((1, 2, 3), (4, 5, 6))
    assert plans["n02"].ray == (1,) and plans["n02"].ranks == ((2, 3, 4), (5, 6, 7))
    with pytest.raises(ConfigError, match=r"n01 gives the job 7 CPUs \(0-6\) but Ray needs 2 and 2 ranks × 3 CPUs"):
        plan_job(job_allowance(HYBRID), ray_cpus=2, ranks=2, cpus_per_task=3)
    assert plan_node(range(8), ray_cpus=1, ranks=2, cpus_per_task=3).ray == (0, 7)  # leftovers to Ray


def test_abstract_cpu_ids_map_to_the_kernel_numbering_with_hyperthreads() -> None:
    # 2 sockets × 2 cores × 2 threads; the kernel numbers first threads 0-3, their siblings 4-7
    topo = [CpuTopology(cpu, package=(cpu % 4) // 2, core=cpu % 2) for cpu in range(8)]
    assert machine_ids([0, 1, 2, 3], topo) == (0, 4, 1, 5)  # SLURM: socket 0, core 0 thread 0/1, core 1 ...
    assert machine_ids([4, 5, 6, 7], topo) == (2, 6, 3, 7)
    with pytest.raises(ConfigError, match="beyond this node's 8 CPUs"):
        machine_ids([8], topo)


@pytest.fixture(scope="module")
def affinity_slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    if not (shutil.which("slurmctld") and shutil.which("munged")):
        pytest.skip("SLURM is not installed (apt-get install -y slurm-wlm munge)")
    cpus = len(os.sched_getaffinity(0))
    if cpus < 2:
        pytest.skip(f"needs 2 CPUs for Ray and one rank; this host gives {cpus}")
    # one node that advertises exactly the host's CPUs, so task/affinity can bind to every one of them
    with private_slurm(tmp_path_factory.mktemp("slurm-affinity"), 7987, 1, INSITU_SLURM_CPUS="2",
                       INSITU_SLURM_TASK_PLUGIN="task/affinity") as env:  # fmt: skip
        yield env


def test_every_process_of_a_job_under_task_affinity_stays_inside_the_job_cpus(affinity_slurm: dict[str, str],
                                                                               tmp_path: Path) -> None:  # fmt: skip
    probe = tmp_path / "probe.json"
    sim = f"{sys.executable} {HEAT2D_PY} --nx 32 --ny 32 --steps 40"
    ana = (f"{sys.executable} {ROOT}/tests/sims/affinity_probe.py {probe} {sys.executable} {ROOT}/tests/sims/ana.py "
           '{"array":"temperature","sleep":0.2}')  # fmt: skip
    job, _ = submit(affinity_slurm, tmp_path, sim, ana, nodes=1, ranks=1)
    code = wait_job(affinity_slurm, job, timeout=300, log=tmp_path / "job.out")
    assert code == 0, (tmp_path / "job.out").read_text()[-3000:]
    seen = json.loads(probe.read_text())
    allowed = set(job_allowance(seen["scontrol"])["node1"])
    assert allowed == {0, 1}
    procs = seen["processes"].values()
    outside = [p for p in procs if not set(parse_cpu_list(p["cpus"])) <= allowed]
    assert outside == [], outside
    role = ("raylet", "gcs_server", "ray::", "heat2d.py", "ana.py")
    found = {}
    for p in procs:
        for key in role:
            launcher = ("affinity_probe", "srun", "insitu_node.sh", "taskset")  # before they exec the process
            if key in p["cmd"] and not any(w in p["cmd"] for w in launcher):
                found.setdefault(key, set()).add(p["cpus"])
    # the plan: Ray, its workers and the co-located analytics on CPU 0; the one rank on CPU 1
    assert found == {"raylet": {"0"}, "gcs_server": {"0"}, "ray::": {"0"}, "heat2d.py": {"1"}, "ana.py": {"0"}}, found
    assert_clean(affinity_slurm, job)
