"""The premise of tunnel-aware dispatch, under a real packet filter (run by test_dispatch.py as root).

Builds a network namespace for the remote-marked raylet, joined to the host by a veth pair; the head
raylet listens on the host end of the veth, the LAN raylet on a second host address that a DROP rule
inside the namespace makes unreachable from the remote node (as a firewall would: packets vanish, no
refusal). Then, from a task on the remote node: a plain ``.remote()`` pinned to the LAN node is
still pending after the wait, and the same call through :class:`insitu.dispatch.Dispatcher` returns.

Then heat2d + heat_stats across the filter: rank 0 on the LAN node, rank 1 on the remote node (each
with its node actor there), and heat_stats itself on the remote node, so the LAN node's compute
actor is created and called through the relay.

Prints one JSON object of observations; the test asserts on them.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from insitu.resources import data_path, executable

PENDING_WAIT = 12.0  # the issue asks for "pending past 10 s"
# The remote raylet also gets its own PID namespace, as on a machine of its own: a Ray driver
# started there (heat_stats) finds only that raylet among the local processes and attaches to it.
OWN_PIDS = ["unshare", "--pid", "--fork", "--mount-proc"]


def namespace_init(leader: int) -> int:
    """The host PID of the first process of the PID namespace that ``unshare`` (PID ``leader``) made."""
    end = time.monotonic() + 30
    while time.monotonic() < end:
        children = Path(f"/proc/{leader}/task/{leader}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.1)
    raise TimeoutError(f"unshare (pid {leader}) started no process within 30 s")


def progress(what: str) -> None:
    print(f"premise_check: {what}", file=sys.stderr, flush=True)


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def firewalled_namespace() -> Iterator[tuple[str, str, str, str]]:
    """Yield (netns name, head IP, LAN IP, remote IP); everything is removed on exit.

    The filter is not installed yet: :func:`block` installs it.
    """
    tag = os.getpid() % 200 + 20
    ns, host_if, ns_if = f"insitu-r{tag}", f"isth{tag}", f"isnr{tag}"
    head_ip, lan_ip, remote_ip = f"10.77.{tag}.1", f"10.78.{tag}.1", f"10.77.{tag}.2"
    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        sh("ip", "link", "set", ns_if, "netns", ns)
        sh("ip", "addr", "add", f"{head_ip}/24", "dev", host_if)
        sh("ip", "addr", "add", f"{lan_ip}/32", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        sh("ip", "-n", ns, "addr", "add", f"{remote_ip}/24", "dev", ns_if)
        sh("ip", "-n", ns, "link", "set", ns_if, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "route", "add", "default", "via", head_ip)
        yield ns, head_ip, lan_ip, remote_ip
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, timeout=30, check=False)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30, check=False)


def block(ns: str, lan_ip: str) -> None:
    """The firewall: the remote node's packets to the LAN node are dropped, and so are the LAN
    node's packets into the namespace."""
    sh("ip", "netns", "exec", ns, "iptables", "-A", "OUTPUT", "-d", lan_ip, "-j", "DROP")
    sh("ip", "netns", "exec", ns, "iptables", "-A", "INPUT", "-s", lan_ip, "-j", "DROP")


def main() -> int:
    base = tempfile.mkdtemp(prefix="insitu-premise-")
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = os.path.join(base, "auth_token")
    from insitu.cluster.local import LocalCluster

    results: dict[str, object] = {}
    with firewalled_namespace() as (ns, head_ip, lan_ip, remote_ip):
        cluster = LocalCluster(nodes=3, cpus_per_node=2, base_dir=base, resources={2: {"insitu_remote": 1}},
                               ips={0: head_ip, 1: lan_ip, 2: remote_ip},
                               wrappers={2: ["ip", "netns", "exec", ns, *OWN_PIDS]})  # fmt: skip
        with cluster:
            import ray

            progress(f"cluster {cluster.address} up")
            ray.init(address=cluster.address, namespace="insitu", logging_level="ERROR", log_to_driver=False)
            try:
                results = checks(cluster.node_ips, lambda: block(ns, lan_ip))
                init = namespace_init(cluster.pids()[2])
                inside = ["nsenter", "--target", str(init), "--pid", "--net", "--mount", "--"]
                results["heat"] = heat_across_the_filter(cluster.environment(), inside, ns, lan_ip, remote_ip,
                                                         Path(base))  # fmt: skip
            finally:
                ray.shutdown()  # before the cluster stops
    print(json.dumps(results))
    return 0


def checks(node_ips: list[str], firewall: Callable[[], None]) -> dict[str, object]:
    """Every observation, on the running cluster."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as Affinity

    from insitu.dispatch import Dispatcher

    end = time.monotonic() + 60
    while len([n for n in ray.nodes() if n["Alive"]]) < 3 and time.monotonic() < end:
        time.sleep(0.2)
    ids = {n["NodeManagerAddress"]: n["NodeID"] for n in ray.nodes() if n["Alive"]}
    head, lan, remote = (ids[ip] for ip in node_ips)

    def pin(node: str) -> dict:
        return {"scheduling_strategy": Affinity(node_id=node, soft=False), "num_cpus": 0}

    def node_id() -> str:
        return ray.get_runtime_context().get_node_id()

    out: dict[str, object] = {}
    t0 = time.monotonic()
    out["head_to_lan"] = ray.get(ray.remote(node_id).options(**pin(lan)).remote(), timeout=120) == lan
    out["head_to_remote"] = ray.get(ray.remote(node_id).options(**pin(remote)).remote(), timeout=120) == remote
    progress(f"control calls from the head done in {time.monotonic() - t0:.1f} s")
    relay = Dispatcher("premise")
    relay.relay()  # created from the head

    @ray.remote(num_cpus=0)
    def on_remote(lan_node: str, wait: float) -> dict:
        plain = ray.remote(node_id).options(**pin(lan_node)).remote()
        t = time.monotonic()
        ready, _ = ray.wait([plain], timeout=wait)
        pending_for = time.monotonic() - t
        ray.cancel(plain, force=True)
        d = Dispatcher("premise")
        t = time.monotonic()
        call = d.task(node_id, options=pin(lan_node))
        landed = call.get(60)
        return {
            "plain_ready": bool(ready),
            "plain_pending_s": round(pending_for, 1),
            "dispatched_on_lan": landed == lan_node,
            "dispatched_s": round(time.monotonic() - t, 2),
            "route": call.route.value,
        }

    @ray.remote(num_cpus=0)
    def open_path(lan_node: str) -> bool:
        return ray.get(ray.remote(node_id).options(**pin(lan_node)).remote(), timeout=60) == lan_node

    out["remote_to_lan_before_filter"] = ray.get(open_path.options(**pin(remote)).remote(lan), timeout=120)
    firewall()
    progress("plain vs dispatched call from the remote node, behind the filter")
    out.update(ray.get(on_remote.options(**pin(remote)).remote(lan, PENDING_WAIT), timeout=180))
    relay.close()
    return out


def heat_across_the_filter(cluster_env: dict[str, str], inside: list[str], ns: str, lan_ip: str, remote_ip: str,
                           base: Path) -> dict[str, object]:  # fmt: skip
    """heat2d on the LAN and remote nodes, heat_stats on the remote node; what it computed and how."""
    env = {**os.environ, **cluster_env, "INSITU_RUN": "premise-heat", "INSITU_DEADLINE": "60"}
    out, dump, placement = base / "out", base / "dump", base / "placement.json"
    netns = ["ip", "netns", "exec", ns]
    progress("heat2d (LAN + remote) with heat_stats on the remote node")
    ana = subprocess.Popen([*inside, sys.executable, str(data_path("analytics", "heat_stats.py")), "--out", str(out),
                            "--print-every", "1000", "--placement", str(placement)], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    mpiexec = executable("mpiexec", "INSITU_MPIEXEC")
    steps = int(os.environ.get("PREMISE_STEPS", "12"))  # a longer run by hand: docs/dispatch.md
    heat = [sys.executable, str(data_path("examples", "python", "heat2d.py")), "--nx", "24", "--ny", "20", "--steps",
            str(steps)]  # fmt: skip
    sim_cmd = [mpiexec, "-n", "1", "-env", "INSITU_NODE", lan_ip, *heat, "--dump", str(dump), ":",
               "-n", "1", "-env", "INSITU_NODE", remote_ip, *netns, *heat, "--dump", str(dump)]  # fmt: skip
    try:
        sim = subprocess.run(sim_cmd, env=env, capture_output=True, text=True, timeout=150 + steps, check=False)
        _, ana_err = ana.communicate(timeout=90 + steps / 2)
    finally:
        if ana.poll() is None:
            ana.kill()
            ana.wait()
    if sim.returncode != 0 or ana.returncode != 0:
        return {"error": f"sim {sim.returncode}: {sim.stderr[-1500:]}\nanalytics {ana.returncode}: {ana_err[-2500:]}"}
    stats = json.loads((out / "stats.json").read_text())["stats"]
    worst = 0.0
    for step, st in stats.items():
        field = np.load(dump / f"step{int(step):05d}.npy")
        worst = max(worst, abs(st["min"] - field.min()), abs(st["mean"] - field.mean()), abs(st["max"] - field.max()))
    where = json.loads(placement.read_text())
    return {
        "steps": len(stats),
        "max_abs_error": worst,
        "analytics_warnings": [line[:300] for line in ana_err.splitlines() if "WARN" in line or "rror" in line][:20],
        "block_ips": sorted({ips[0] for ips in where["blocks"].values()}),
        "routes": where["routes"],
        "lan_ip": lan_ip,
        "remote_ip": remote_ip,
    }


if __name__ == "__main__":
    sys.exit(main())
