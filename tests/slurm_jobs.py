"""A private SLURM on this host for the launch tests, and the jobs they submit through ``insitu launch``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import LAUNCH, ROOT

SLURM_LOCAL = LAUNCH / "slurm_local.sh"


@contextmanager
def private_slurm(base: Path, port: int, nodes: int, **settings: str) -> Iterator[dict[str, str]]:
    """slurmctld + ``nodes`` emulated slurmd (``slurm_local.sh``); yields the environment its clients need.

    ``settings`` are ``slurm_local.sh``'s variables (``INSITU_SLURM_CPUS``, ``INSITU_SLURM_TASK_PLUGIN``).
    """
    env = {**os.environ, "INSITU_SLURM_BASE": str(base), "INSITU_SLURM_PORT": str(port), **settings}
    subprocess.run([str(SLURM_LOCAL), "start", str(nodes)], env=env, check=True, capture_output=True, timeout=60)
    env["SLURM_CONF"] = str(base / "etc" / "slurm.conf")
    env["INSITU_EMULATED_NODES"] = "1"
    for k in [k for k in env if k.startswith(("INSITU_ADDRESS", "INSITU_AUTH", "RAY_"))]:
        del env[k]  # the job makes its own cluster and token
    try:
        yield env
    finally:
        subprocess.run([str(SLURM_LOCAL), "stop"], env=env, check=False, capture_output=True, timeout=60)


def submit(slurm: dict[str, str], tmp: Path, sim: str, ana: str, *extra: str, nodes: int = 3, ranks: int = 2,
           env_extra: dict[str, str] | None = None, launch: tuple[str, ...] = ()) -> tuple[int, Path]:  # fmt: skip
    job_dir = tmp / "job"
    env = {**slurm, "INSITU_JOB_DIR": str(job_dir), **(env_extra or {})}
    cmd = [sys.executable, "-m", "insitu.cli", "launch", "--nodes", str(nodes), "--ranks-per-node", str(ranks),
           "--simulation", sim, "--analytics", ana, "--step-bytes", "1000000", "--time", "00:10:00",
           *launch, "--script", str(tmp / "job.sbatch"), "--", f"--output={tmp / 'job.out'}", *extra]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    return int(proc.stdout.split()[-1]), job_dir


def wait_job(slurm: dict[str, str], job: int, timeout: float = 420, log: Path | None = None) -> int:
    """Wait for the job to end; its exit code (from scontrol, the job is still in slurmctld's memory).

    On timeout the job is cancelled and the failure shows the end of ``log`` (the job's output).
    """
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        out = subprocess.run(["scontrol", "show", "job", str(job)], env=slurm, capture_output=True, text=True,
                             check=False).stdout  # fmt: skip
        state = re.search(r"JobState=(\w+)", out)
        if state and state[1] not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
            code = re.search(r"ExitCode=(\d+):(\d+)", out)
            assert code
            return int(code[1])
        time.sleep(1)
    subprocess.run(["scancel", str(job)], env=slurm, check=False)
    tail = log.read_text()[-3000:] if log is not None and log.exists() else "(no job output)"
    pytest.fail(f"job {job} did not end within {timeout} s; its output ends with:\n{tail}")


def assert_clean(slurm: dict[str, str], job: int) -> None:
    steps = subprocess.run(["squeue", "-s", "-h", "-j", str(job)], env=slurm, capture_output=True, text=True,
                           check=False).stdout.strip()  # fmt: skip
    assert steps == "", f"job steps left: {steps}"
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    left = [line for line in ps.splitlines() if f"insitu-ray-{job}" in line]
    assert left == [], f"Ray processes of job {job} left: {left}"
    assert not Path(f"/tmp/insitu-ray-{job}").exists()


