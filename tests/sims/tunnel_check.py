"""A remote-marked Ray node joined through launch/tunnel.sh over a real SSH tunnel (run by test_dispatch.py as root).

The remote raylet runs in its own network and PID namespace, joined to the host by a veth pair
whose only permitted traffic (iptables inside the namespace) is SSH to a private sshd on the
host. tunnel.sh (with a verified host key) carries the head's and the remote node's Ray ports;
the head and a LAN raylet run on the host. Observed: the remote node joins, the head runs a task
on it, nothing else leaves the namespace (a direct connection to the LAN raylet times out), and
a dispatched call from the remote node to the LAN node returns through the relay.

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
from collections.abc import Iterator
from pathlib import Path

from harness import progress
from premise_check import OWN_PIDS, sh

from insitu.resources import data_path


@contextlib.contextmanager
def namespace_behind_ssh(base: Path) -> Iterator[dict[str, str]]:
    """A namespace that may only speak SSH to the host, a private sshd, and the addresses of everything."""
    tag = os.getpid() % 200 + 20
    a = {
        "ns": f"insitu-t{tag}", "host_if": f"itth{tag}", "ns_if": f"itnr{tag}",
        "link_host": f"10.76.{tag}.1", "link_ns": f"10.76.{tag}.2", "sshd_ip": f"10.79.{tag}.1",
        "head_ip": f"10.77.{tag}.1", "lan_ip": f"10.78.{tag}.1", "remote_ip": f"10.250.{tag}.7",
    }  # fmt: skip
    sshd = None
    try:
        sh("ip", "netns", "add", a["ns"])
        sh("ip", "link", "add", a["host_if"], "type", "veth", "peer", "name", a["ns_if"])
        sh("ip", "link", "set", a["ns_if"], "netns", a["ns"])
        sh("ip", "addr", "add", f"{a['link_host']}/24", "dev", a["host_if"])
        for ip in ("sshd_ip", "head_ip", "lan_ip", "remote_ip"):  # host addresses (remote_ip: the -R alias)
            sh("ip", "addr", "add", f"{a[ip]}/32", "dev", a["host_if"])
        sh("ip", "link", "set", a["host_if"], "up")
        ns = ["ip", "netns", "exec", a["ns"]]
        sh("ip", "-n", a["ns"], "addr", "add", f"{a['link_ns']}/24", "dev", a["ns_if"])
        sh("ip", "-n", a["ns"], "link", "set", a["ns_if"], "up")
        sh("ip", "-n", a["ns"], "link", "set", "lo", "up")
        for ip in ("head_ip", "remote_ip"):  # the aliases tunnel.sh asks for
            sh("ip", "-n", a["ns"], "addr", "add", f"{a[ip]}/32", "dev", "lo")
        sh("ip", "-n", a["ns"], "route", "add", "default", "via", a["link_host"])
        # the firewall: out of the namespace, SSH to the sshd only
        sh(*ns, "iptables", "-A", "OUTPUT", "-o", a["ns_if"], "-p", "tcp", "-d", a["sshd_ip"], "--dport", "2222",
           "-j", "ACCEPT")  # fmt: skip
        sh(*ns, "iptables", "-A", "OUTPUT", "-o", a["ns_if"], "-j", "DROP")
        # a private sshd: its own host key, root by key only, -R binds on the client's address
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(base / "host_key"))
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(base / "client_key"))
        (base / "authorized_keys").write_text((base / "client_key.pub").read_text())
        host_pub = " ".join((base / "host_key.pub").read_text().split()[:2])
        (base / "known_hosts").write_text(f"[{a['sshd_ip']}]:2222 {host_pub}\n")
        (base / "sshd_config").write_text(
            f"Port 2222\nListenAddress {a['sshd_ip']}\nHostKey {base / 'host_key'}\n"
            f"AuthorizedKeysFile {base / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
            f"PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            f"GatewayPorts clientspecified\nAllowTcpForwarding yes\nPidFile {base / 'sshd.pid'}\n"
        )
        Path("/run/sshd").mkdir(exist_ok=True)
        sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(base / "sshd_config")],
                                stdout=subprocess.DEVNULL, stderr=open(base / "sshd.log", "w"),  # noqa: SIM115
                                start_new_session=True)  # fmt: skip
        yield a
    finally:
        if sshd is not None:
            sshd.terminate()
            sshd.wait(timeout=10)
        subprocess.run(["ip", "link", "del", a["host_if"]], capture_output=True, timeout=30, check=False)
        subprocess.run(["ip", "netns", "del", a["ns"]], capture_output=True, timeout=30, check=False)


def connects(ns: str, ip: str, port: int, timeout: float = 3.0) -> bool:
    """Whether a TCP connection from inside ``ns`` to ip:port succeeds within ``timeout``."""
    code = (f"import socket,sys; s=socket.socket(); s.settimeout({timeout}); "
            f"sys.exit(0 if s.connect_ex(({ip!r}, {port})) == 0 else 1)")  # fmt: skip
    return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], timeout=timeout + 10,
                          check=False).returncode == 0  # fmt: skip


def main() -> int:
    base = Path(tempfile.mkdtemp(prefix="insitu-tunnel-"))
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(base / "ray" / "auth_token")
    from insitu.cluster.local import LocalCluster

    out: dict[str, object] = {}
    with namespace_behind_ssh(base) as a:
        cluster = LocalCluster(nodes=3, cpus_per_node=2, base_dir=str(base / "ray"),
                               resources={2: {"insitu_remote": 1}},
                               ips={0: a["head_ip"], 1: a["lan_ip"], 2: a["remote_ip"]},
                               wrappers={2: ["ip", "netns", "exec", a["ns"], *OWN_PIDS]},
                               deferred=frozenset({2}))  # fmt: skip
        with cluster:
            head, node = cluster.node_ports(0), cluster.node_ports(2)
            env = {**os.environ, "INSITU_TUNNEL_KNOWN_HOSTS": str(base / "known_hosts"),
                   "INSITU_TUNNEL_PORT": "2222", "INSITU_TUNNEL_IDENTITY": str(base / "client_key"),
                   "HEAD_IP": a["head_ip"], "REMOTE_IP": a["remote_ip"],
                   "HEAD_GCS": str(head["gcs"]), "HEAD_NM": str(head["node_manager"]),
                   "HEAD_OM": str(head["object_manager"]), "HEAD_WMIN": str(head["min_worker"]),
                   "HEAD_WMAX": str(head["max_worker"]), "NODE_NM": str(node["node_manager"]),
                   "NODE_OM": str(node["object_manager"]), "NODE_ENV": str(node["runtime_env_agent"]),
                   "NODE_AGENT": str(node["dashboard_agent_grpc"]), "NODE_WMIN": str(node["min_worker"]),
                   "NODE_WMAX": str(node["max_worker"])}  # fmt: skip
            progress("tunnel_check", "opening the tunnel")
            tunnel = subprocess.Popen(
                ["ip", "netns", "exec", a["ns"], "bash", str(data_path("launch", "tunnel.sh")), f"root@{a['sshd_ip']}"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=open(base / "tunnel.log", "w"),
                start_new_session=True,
            )  # noqa: SIM115
            try:
                end = time.monotonic() + 30
                while not connects(a["ns"], a["head_ip"], head["gcs"], 1.0):
                    if tunnel.poll() is not None or time.monotonic() > end:
                        raise RuntimeError("tunnel did not come up:\n" + (base / "tunnel.log").read_text()[-2000:])
                    time.sleep(0.5)
                out["lan_direct_from_remote"] = connects(a["ns"], a["lan_ip"], cluster.node_ports(1)["node_manager"])
                progress("tunnel_check", "starting the remote raylet through the tunnel")
                cluster.start_node(2)
                out.update(observe(cluster))
            finally:
                tunnel.terminate()
                tunnel.wait(timeout=10)
    print(json.dumps(out))
    return 0


def observe(cluster: object) -> dict[str, object]:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as Affinity

    from insitu.dispatch import Dispatcher

    ray.init(address=cluster.address, namespace="insitu", logging_level="ERROR", log_to_driver=False)  # type: ignore[attr-defined]
    try:
        end = time.monotonic() + 60
        while len([n for n in ray.nodes() if n["Alive"]]) < 3 and time.monotonic() < end:
            time.sleep(0.2)
        ids = {n["NodeManagerAddress"]: n for n in ray.nodes() if n["Alive"]}
        head_ip, lan_ip, remote_ip = cluster.node_ips  # type: ignore[attr-defined]
        got: dict[str, object] = {"remote_joined": remote_ip in ids and "insitu_remote" in ids[remote_ip]["Resources"]}
        remote, lan = ids[remote_ip]["NodeID"], ids[lan_ip]["NodeID"]

        def pin(node: str) -> dict:
            return {"scheduling_strategy": Affinity(node_id=node, soft=False), "num_cpus": 0}

        def node_id() -> str:
            return ray.get_runtime_context().get_node_id()

        t = time.monotonic()
        got["head_to_remote"] = ray.get(ray.remote(node_id).options(**pin(remote)).remote(), timeout=120) == remote
        got["head_to_remote_s"] = round(time.monotonic() - t, 1)

        @ray.remote(num_cpus=0)
        def from_remote(lan_node: str) -> dict:
            call = Dispatcher("tunnel").task(node_id, options=pin(lan_node))
            return {"dispatched_on_lan": call.get(60) == lan_node, "route": call.route.value}

        got.update(ray.get(from_remote.options(**pin(remote)).remote(lan), timeout=180))
        Dispatcher("tunnel").close()
        return got
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
