"""SLURM launch against a real SLURM: slurmctld + 3 emulated slurmd nodes on this host.

Needs `slurm-wlm` and `munge` (`.ci/run` installs them); skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import HEAT2D_PY, HEAT_STATS, LAUNCH, ROOT, processes_mentioning, wait_nothing_left
from tests.slurm_jobs import assert_clean, private_slurm, submit, wait_job

PY = sys.executable  # the jobs' Python: this environment's, whatever PATH holds
pytestmark = pytest.mark.skipif(
    not (shutil.which("slurmctld") and shutil.which("munged") and shutil.which("sbatch")),
    reason="SLURM is not installed (apt-get install -y slurm-wlm munge)",
)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A private SLURM with 3 emulated nodes; the environment its clients need."""
    with private_slurm(tmp_path_factory.mktemp("slurm"), 7957, 3) as env:
        yield env


def _heat(dump: Path, steps: int = 30) -> str:
    return f"{PY} {HEAT2D_PY} --nx 48 --ny 40 --steps {steps} --dump {dump}"


def test_heat2d_on_three_nodes_matches_numpy_with_each_block_on_its_node(slurm: dict[str, str],
                                                                          tmp_path: Path) -> None:  # fmt: skip
    dump, out, placement = tmp_path / "dump", tmp_path / "out", tmp_path / "placement.json"
    nodes_file = tmp_path / "nodes.json"
    job, job_dir = submit(slurm, tmp_path, _heat(dump), f"{PY} {ROOT}/tests/sims/record_nodes.py {nodes_file} "
                           f"{PY} {HEAT_STATS} --out {out} --placement {placement}",
                           env_extra={"INSITU_SLICE_HOSTS": "2"})  # fmt: skip
    code = wait_job(slurm, job, log=tmp_path / "job.out")
    log = (tmp_path / "job.out").read_text()
    assert code == 0, log + (job_dir / "analytics.log").read_text()[-2000:]
    stats = {int(k): v for k, v in json.loads((out / "stats.json").read_text())["stats"].items()}
    assert sorted(stats) == list(range(30))
    for step, s in stats.items():
        field = np.load(dump / f"step{step:05d}.npy")
        assert s["min"] == pytest.approx(field.min())
        assert s["mean"] == pytest.approx(field.mean())
        assert s["max"] == pytest.approx(field.max())
    # each rank's block lives on the raylet of the node the rank ran on
    hosts = {}
    for f in job_dir.glob("sim-*.log"):
        for r, host, ip, cpus in re.findall(r"rank (\d+) host (\S+) insitu node (\S+) cpus (\S+)", f.read_text()):
            hosts[int(r)] = (host, ip)
            bound = [int(c) for c in cpus.split(",")]
            assert len(bound) == 1 and bound[0] >= 1, f"rank {r} must be bound to one core besides Ray's: {cpus}"
    assert len(hosts) == 6 and len({h for h, _ in hosts.values()}) == 3, hosts
    for host, ip in hosts.values():
        assert ip == f"127.0.0.{20 + int(host.removeprefix('node')) - 1}"
    where = json.loads(placement.read_text())
    for block, rank in where["owners"].items():
        assert where["blocks"][block] == [hosts[rank][1]], (block, rank)
    # INSITU_SLICE_HOSTS=2: nodes grouped two by two into slices for insitu.SlicePool
    slices = {n["ip"]: [r for r in n["resources"] if r.startswith("insitu_slice_")]
              for n in json.loads(nodes_file.read_text())}  # fmt: skip
    assert slices == {"127.0.0.20": ["insitu_slice_0"], "127.0.0.21": ["insitu_slice_0"],
                      "127.0.0.22": ["insitu_slice_1"]}  # fmt: skip
    assert "torn down (exit 0)" in log
    # the monitor ran on the first node's loopback; the job printed how to reach it from a login node
    mon = re.search(r"monitor: from a login node, ssh -N -L (\d+):127\.0\.0\.1:(\d+) \S+, then open "
                    r"http://127\.0\.0\.1:(\d+)/", log)  # fmt: skip
    assert mon and len(set(mon.groups())) == 1, log
    monitor_log = (job_dir / "monitor.log").read_text()
    assert f"at http://127.0.0.1:{mon.group(1)}/" in monitor_log, monitor_log
    assert "module status: incarnation 1 ready" in monitor_log, monitor_log
    # the submit directory holds the job's logs and nothing a node reads (no token, no markers)
    assert sorted({p.suffix for p in job_dir.iterdir()}) == [".log"], sorted(job_dir.iterdir())
    assert_clean(slurm, job)


def test_two_jobs_at_once_on_the_same_nodes_and_scancel_of_one_leaves_nothing(slurm: dict[str, str],
                                                                               tmp_path: Path) -> None:  # fmt: skip
    """Two jobs share the nodes; job b (endless) is ``scancel``ed mid-run (issue 17 item 4): job a
    finishes untouched, and nothing of b is left: no process of its Ray or run, no Ray directory,
    no staging file (mapped or named), no MPICH shared memory of its killed ranks."""
    jobs = []
    for name, steps in (("a", 20), ("b", 1000000)):
        d = tmp_path / name
        d.mkdir()
        # unbound: 2 jobs x 3 emulated nodes' Ray on core 0 of one host starve (cores binding: first test)
        jobs.append((submit(slurm, d, _heat(d / "dump", steps), f"{PY} {HEAT_STATS} --out {d / 'out'}",
                             env_extra={"INSITU_BIND_CPUS": "0"}), d))  # fmt: skip
    time.sleep(3)
    running = subprocess.run(["squeue", "-h", "-t", "R", "-o", "%i"], env=slurm, capture_output=True, text=True,
                             check=False).stdout.split()  # fmt: skip
    assert len(running) == 2, f"both jobs should run at the same time: {running}"
    (a, _), da = jobs[0]
    (b, _), db = jobs[1]
    run_b = f"slurm-{b}"
    stats = db / "out" / "stats.jsonl"
    end = time.monotonic() + 240
    while time.monotonic() < end and not (stats.exists() and stats.read_text().count("\n") >= 3):
        time.sleep(0.5)
    assert stats.exists() and stats.read_text().count("\n") >= 3, (db / "job.out").read_text()[-3000:]
    assert processes_mentioning(f"insitu-ray-{b}"), "job b's raylets should be running now"
    assert any("heat2d" in p for p in processes_mentioning(f"INSITU_RUN={run_b}", where="environ"))
    # the ranks' staging files: mapped by the ranks and the node processes, their names already unlinked
    assert any(f"/dev/shm/insitu-{run_b}-r" in m for m in _shm_maps()), "job b's ranks should map staging files"
    mpich_before = {f.name for f in Path("/dev/shm").glob("mpich_shm_*")}
    subprocess.run(["scancel", str(b)], env=slurm, check=True)
    wait_job(slurm, b, timeout=120, log=db / "job.out")
    left = wait_nothing_left({f"insitu-ray-{b}": "cmdline", f"INSITU_RUN={run_b}": "environ"}, timeout=30)
    assert left == {}, left
    assert_clean(slurm, b)  # no step, no Ray process, no /tmp/insitu-ray-<job>
    assert list(Path("/dev/shm").glob(f"insitu-{run_b}-*")) == []
    assert not any(f"/dev/shm/insitu-{run_b}-r" in m for m in _shm_maps())
    assert [f.name for f in Path("/dev/shm").glob("mpich_shm_*") if f.name not in mpich_before] == []

    assert wait_job(slurm, a, log=da / "job.out") == 0, (da / "job.out").read_text()
    assert len(json.loads((da / "out" / "stats.json").read_text())["stats"]) == 20
    assert_clean(slurm, a)


def test_failing_simulation_fails_the_job_and_cleans_up(slurm: dict[str, str], tmp_path: Path) -> None:
    job, job_dir = submit(slurm, tmp_path, f"{PY} {ROOT}/tests/sims/crash.py",
                           f"{PY} {HEAT_STATS} --out {tmp_path / 'out'}")  # fmt: skip
    code = wait_job(slurm, job, log=tmp_path / "job.out")
    log = (tmp_path / "job.out").read_text()
    assert code != 0, log
    assert "simulation exited with" in log and "torn down" in log
    assert "died before closing" in (job_dir / "analytics.log").read_text()
    assert_clean(slurm, job)


def test_dedicated_analytics_that_fails_ends_the_job_non_zero(slurm: dict[str, str], tmp_path: Path) -> None:
    """--placement dedicated: the analytics alone on the last node, the simulation on the others; its
    failure (a callback raising at step 3) is the job's exit code, the simulation still finishes."""
    ana = f'{PY} {ROOT}/tests/sims/ana.py {{"fail_at":3,"array":"temperature"}}'
    job, job_dir = submit(slurm, tmp_path, _heat(tmp_path / "dump", 20), ana,
                          launch=("--placement", "dedicated", "--analytics-restarts", "0"))  # fmt: skip
    code = wait_job(slurm, job, log=tmp_path / "job.out")
    log = (tmp_path / "job.out").read_text()
    ana_log = (job_dir / "analytics.log").read_text()
    assert code != 0, log
    assert "analytics exited with 1" in log, log
    assert "planned failure at step 3" in ana_log
    assert json.loads(ana_log.splitlines()[0]) == {"node": "node3"}  # the last node, alone
    ranks_on = set()
    for f in job_dir.glob("sim-*.log"):
        ranks_on |= set(re.findall(r"rank \d+ host (\S+)", f.read_text()))
    assert ranks_on == {"node1", "node2"}, ranks_on
    assert "simulation exited with 0" in log
    assert_clean(slurm, job)


def test_time_limit_stops_the_simulation_through_the_signal(slurm: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    job, job_dir = submit(slurm, tmp_path, f"{PY} {HEAT2D_PY} --nx 32 --ny 32 --steps 1000000",
                           f"{PY} {HEAT_STATS} --out {out}", "--time=1",
                           "--signal=B:USR1@50", nodes=2)  # fmt: skip
    code = wait_job(slurm, job, timeout=240, log=tmp_path / "job.out")
    log = (tmp_path / "job.out").read_text()
    assert code == 0, log
    assert "steering value stop=true set" in log
    logs = "".join(f.read_text() for f in job_dir.glob("sim-*.log"))
    stopped = {int(s) for s in re.findall(r"stopped after step (\d+)", logs)}
    assert len(stopped) == 1 and next(iter(stopped)) < 999999, stopped  # every rank stopped at the same step
    assert_clean(slurm, job)


def _shm_maps() -> list[str]:
    """Every /dev/shm path some live process maps (deleted or not)."""
    maps = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                maps += [line for line in (proc / "maps").read_text().splitlines() if "/dev/shm/" in line]
            except OSError:
                continue
    return maps


def test_generated_script_passes_shellcheck(tmp_path: Path) -> None:
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck)")
    script = subprocess.run([sys.executable, "-m", "insitu.cli", "launch", "--nodes", "2", "--ranks-per-node", "4",
                             "--simulation", "./sim --steps 10", "--analytics", "python3 ana.py", "--dry-run"],
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    (tmp_path / "job.sbatch").write_text(script)
    for path in (tmp_path / "job.sbatch", LAUNCH / "insitu.sbatch", *sorted(LAUNCH.glob("*.sh"))):
        proc = subprocess.run(["shellcheck", str(path)], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stdout


def test_object_store_that_does_not_fit_fails_fast() -> None:
    from insitu.errors import ConfigError
    from insitu.slurm import check_node_memory, job_memory, store_bytes

    with pytest.raises(ConfigError, match=r"n2: the object store \(\d+ MiB\) and staging files \(2 MiB\) need \d+ "
                                          r"MiB but /dev/shm has \d+ MiB free"):  # fmt: skip
        check_node_memory(store_bytes(1 << 50, 2, 2), 2 << 20, node="n2")
    mem = job_memory({"SLURM_MEM_PER_CPU": "200", "SLURM_CPUS_ON_NODE": "4"})
    with pytest.raises(ConfigError, match=r"need 420 MiB, more than half of the job's 800 MiB on the node"):
        check_node_memory(store_bytes(60 << 20, 2, 2), 120 << 20, job_mem=mem)
    check_node_memory(store_bytes(60 << 20, 2, 2), 120 << 20, job_mem=mem * 2)  # fits in 1600 MiB
    with pytest.raises(ConfigError, match=r"but the node has 100 MiB available"):
        check_node_memory(80 << 20, 40 << 20, available=100 << 20)


def test_memory_check_runs_on_every_node_and_fails_the_job_with_the_numbers(slurm: dict[str, str],
                                                                              tmp_path: Path) -> None:  # fmt: skip
    # --mem=150: 80 MiB of object store + 2 × 1 MB of staging files is more than half of it, on every node
    job, job_dir = submit(slurm, tmp_path, "true", "true", "--mem=150")
    code = wait_job(slurm, job, timeout=120, log=tmp_path / "job.out")
    log = (tmp_path / "job.out").read_text()
    assert code != 0, log
    for node in ("node1", "node2", "node3"):
        assert (f"{node}: the object store (80 MiB) and staging files (2 MiB) need 82 MiB, more than half of the "
                "job's 150 MiB on the node") in log, log  # fmt: skip
    assert "Ray head" not in log  # failed before any Ray started
    assert_clean(slurm, job)


def test_job_spec_rejects_bad_placement() -> None:
    from insitu.errors import ConfigError
    from insitu.slurm import JobSpec

    with pytest.raises(ConfigError, match="placement"):
        JobSpec(nodes=2, ranks_per_node=1, simulation="s", analytics="a", placement="elsewhere")
    with pytest.raises(ConfigError, match="simulation node"):
        JobSpec(nodes=1, ranks_per_node=1, simulation="s", analytics="a", placement="dedicated")


def test_busy_ports_sees_a_listener_but_not_a_free_port() -> None:
    import socket

    from insitu.slurm import busy_ports

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        taken = listener.getsockname()[1]
        assert busy_ports("127.0.0.1", [taken]) == [taken]
    assert busy_ports("127.0.0.1", [taken]) == []


def test_srun_without_the_mpi_plugin_is_refused(slurm: dict[str, str]) -> None:
    code = (
        "import insitu\n"
        "spec = insitu.ArraySpec('u', (4,), 'f8', start=(0,), shape=(4,))\n"
        "insitu.Bridge([spec], run='wrong-mpi', address='127.0.0.1:9')\n"
    )
    proc = subprocess.run(["srun", "--mpi=none", "-N", "2", "-n", "2", sys.executable, "-c", code], env=slurm,
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert proc.returncode != 0
    assert "ContractError" in proc.stderr
    assert "size" in proc.stderr or "tasks" in proc.stderr, proc.stderr[-2000:]


def _fake_ray(slurm: dict[str, str], tmp_path: Path, fail_first: int) -> dict[str, str]:
    """A fake `ray` (INSITU_RAY) that fails `fail_first` times before the node is up, then starts; the env to run it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ray = bin_dir / "ray"
    ray.write_text(
        "#!/usr/bin/env bash\n"
        f'n=$(cat "{tmp_path}/calls" 2>/dev/null || echo 0); echo $((n + 1)) >"{tmp_path}/calls"\n'
        f'echo "$@" >>"{tmp_path}/args"\n'
        f"if ((n < {fail_first})); then echo 'The current node timed out during startup.' >&2; exit 1; fi\n"
        "echo 'Ray runtime started.'\n"
    )
    ray.chmod(0o755)
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    return {**slurm, "INSITU_RAY": str(ray), "SLURMD_NODENAME": "node1",
            "SLURM_JOB_NODELIST": "node[1-3]", "INSITU_EMULATED_NODES": "1", "INSITU_RAY_BASE": "35000",
            "INSITU_RAY_STRIDE": "74",
            "INSITU_STORE_BYTES": str(80 << 20), "INSITU_RAY_TMP": str(tmp_path / "raytmp"),
            "INSITU_JOB_DIR": str(job_dir), "INSITU_RAY_START_TRIES": "3"}  # fmt: skip


def test_ray_start_that_fails_before_the_node_is_up_is_retried(slurm: dict[str, str], tmp_path: Path) -> None:
    env = _fake_ray(slurm, tmp_path, fail_first=2)
    proc = subprocess.run([str(LAUNCH / "insitu_node.sh"), "ray"], env=env, capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "calls").read_text().strip() == "3"
    assert proc.stderr.count("retrying once its ports are free") == 2, proc.stderr
    args = (tmp_path / "args").read_text().splitlines()
    assert all(a.startswith("start --head --port=35000 ") for a in args), args  # node1 = first node: the head
    assert "INSITU-RAY-START-FAILED" not in proc.stdout


def test_ray_start_gives_up_after_its_tries_and_the_wait_ends_at_once(slurm: dict[str, str],
                                                                     tmp_path: Path) -> None:  # fmt: skip
    from insitu.errors import StepTimeoutError
    from insitu.slurm import wait_for_nodes

    env = _fake_ray(slurm, tmp_path, fail_first=10)
    proc = subprocess.run([str(LAUNCH / "insitu_node.sh"), "ray"], env=env, capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    assert proc.returncode == 1
    assert (tmp_path / "calls").read_text().strip() == "3"
    assert "ray start failed 3 times (last exit 1); giving up" in proc.stderr
    # the marker is on the step's output (srun brings it to the batch host), not in a shared file
    assert not list((tmp_path / "job").iterdir())
    step_out = tmp_path / "ray-nodes.log"
    step_out.write_text("".join(f"0: {line}\n" for line in proc.stdout.splitlines()))
    assert "0: INSITU-RAY-START-FAILED node1: 3 tries, last exit 1" in step_out.read_text()
    t0 = time.monotonic()
    with pytest.raises(StepTimeoutError, match=r"Ray could not be started on node1 \(3 tries, last exit 1\)"):
        wait_for_nodes("127.0.0.20:35000", ["node1", "node2"], deadline=60, failed_log=str(step_out))
    assert time.monotonic() - t0 < 10


def test_wait_for_nodes_names_a_head_that_never_came_up(tmp_path: Path) -> None:
    from insitu.errors import StepTimeoutError
    from insitu.slurm import wait_for_nodes

    with pytest.raises(StepTimeoutError, match=r"the Ray head 127.0.0.20:35000 did not come up within 1 s"):
        wait_for_nodes("127.0.0.20:35000", ["node1"], deadline=1, failed_log=str(tmp_path / "none.log"))
