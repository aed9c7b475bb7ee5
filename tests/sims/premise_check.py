"""The premise of tunnel-aware dispatch, under a real packet filter (run by test_dispatch.py as root).

Builds a network namespace for the remote-marked raylet, joined to the host by a veth pair; the head
raylet listens on the host end of the veth, the LAN raylet on a second host address that a DROP rule
inside the namespace makes unreachable from the remote node (as a firewall would: packets vanish, no
refusal). Then, from a task on the remote node: a plain ``.remote()`` pinned to the LAN node is
still pending after the wait, and the same call through :class:`insitu.dispatch.Dispatcher` returns.

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

PENDING_WAIT = 12.0  # the issue asks for "pending past 10 s"


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
                               wrappers={2: ["ip", "netns", "exec", ns]})  # fmt: skip
        with cluster:
            import ray

            progress(f"cluster {cluster.address} up")
            ray.init(address=cluster.address, namespace="insitu", logging_level="ERROR", log_to_driver=False)
            try:
                results = checks(cluster.node_ips, lambda: block(ns, lan_ip))
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
        return {"plain_ready": bool(ready), "plain_pending_s": round(pending_for, 1), "dispatched_on_lan":
                landed == lan_node, "dispatched_s": round(time.monotonic() - t, 2), "route": call.route.value}  # fmt: skip

    @ray.remote(num_cpus=0)
    def open_path(lan_node: str) -> bool:
        return ray.get(ray.remote(node_id).options(**pin(lan_node)).remote(), timeout=60) == lan_node

    out["remote_to_lan_before_filter"] = ray.get(open_path.options(**pin(remote)).remote(lan), timeout=120)
    firewall()
    progress("plain vs dispatched call from the remote node, behind the filter")
    out.update(ray.get(on_remote.options(**pin(remote)).remote(lan, PENDING_WAIT), timeout=180))
    relay.close()
    return out


if __name__ == "__main__":
    sys.exit(main())
