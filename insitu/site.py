"""Facts of a real site the launch scripts must get right: a node's address, Ray's ports.

A cluster node has several interfaces (management Ethernet, InfiniBand, docker bridges,
link-local addresses) and a kernel that hands out ephemeral ports from
``/proc/sys/net/ipv4/ip_local_port_range``. The functions here are pure (they take the
outputs of ``ip -j`` and the port range as arguments) and tested on recorded outputs;
:func:`node_address` and :func:`ray_ports` read the live system and call them.

Examples
--------
>>> plan = port_plan(job_id=7, cpus=8, nodes_per_host=1, local_range=(32768, 60999))
>>> plan.stride, plan.workers >= 64, plan.base + plan.stride <= 32768
(74, True, True)
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from insitu.errors import ConfigError

__all__ = [
    "PortPlan",
    "acceptable",
    "address_for_job",
    "node_address",
    "node_ip_setting",
    "pick_address",
    "port_plan",
    "ray_ports",
]

_EXCLUDED_DEVICES = ("docker", "br-", "veth", "virbr", "cni", "flannel")
_FIXED_PORTS = 10  # GCS, node manager, object manager, client server, agents, metrics (see insitu_node.sh)
_LOWEST_PORT = 10000


def acceptable(address: str, device: str, emulated: bool = False) -> bool:
    """Whether a node may advertise ``address`` of interface ``device`` to the other nodes.

    Never loopback (127/8, unless the nodes are emulated on one host), link-local
    (169.254/16), nor container or virtual bridges (``docker*``, ``br-*``, ``veth*``, ...).

    Examples
    --------
    >>> acceptable("10.1.2.3", "ib0"), acceptable("172.17.0.1", "docker0"), acceptable("169.254.3.4", "eth1")
    (True, False, False)
    >>> acceptable("127.0.0.21", "lo"), acceptable("127.0.0.21", "lo", emulated=True)
    (False, True)
    """
    ip = ipaddress.ip_address(address)
    if ip.is_loopback:
        return emulated
    if ip.is_link_local or ip.is_unspecified or ip.is_multicast:
        return False
    return not device.startswith(_EXCLUDED_DEVICES)


def pick_address(
    route: Sequence[Mapping[str, Any]] | None, addrs: Sequence[Mapping[str, Any]], iface: str | None = None,
    emulated: bool = False,
) -> str:  # fmt: skip
    """Choose this node's address from ``ip -j -4 route get PEER`` and ``ip -j -4 addr`` outputs.

    ``iface`` (``INSITU_IFACE``) wins: its first IPv4 address. Otherwise the source address
    of the route to another node of the job (``prefsrc``), when acceptable; otherwise the
    first acceptable address of any interface. Raises :class:`ConfigError` naming what was
    seen when nothing is acceptable.
    """
    by_dev = {a.get("ifname", ""): [i["local"] for i in a.get("addr_info", []) if "local" in i] for a in addrs}
    if iface:
        if not by_dev.get(iface):
            raise ConfigError(f"INSITU_IFACE={iface} has no IPv4 address here (interfaces: {sorted(by_dev)})")
        return by_dev[iface][0]
    for r in route or ():
        src, dev = r.get("prefsrc"), r.get("dev", "")
        if src and acceptable(src, dev, emulated):
            return str(src)
    for dev, ips in by_dev.items():
        for ip in ips:
            if acceptable(ip, dev, emulated):
                return ip
    seen = ", ".join(f"{d}={'/'.join(i)}" for d, i in by_dev.items()) or "none"
    raise ConfigError(
        f"no usable address on this node (seen: {seen}); loopback, link-local and container bridges are "
        "never used: set INSITU_IFACE to the cluster interface or INSITU_NODE_IP"
    )


def node_ip_setting(value: str, node_name: str) -> str | None:
    """``INSITU_NODE_IP`` for this node: one address, or a per-node list ``name=ip,name=ip``.

    Examples
    --------
    >>> node_ip_setting("10.0.0.7", "n1"), node_ip_setting("n1=10.0.0.1,n2=10.0.0.2", "n2")
    ('10.0.0.7', '10.0.0.2')
    >>> node_ip_setting("n1=10.0.0.1", "n3") is None
    True
    """
    if "=" not in value:
        return value.strip() or None
    pairs = dict(item.split("=", 1) for item in value.split(",") if "=" in item)
    return pairs.get(node_name)


def _ip_json(*args: str) -> list[dict[str, Any]]:
    out = subprocess.run(["ip", "-j", "-4", *args], capture_output=True, text=True, timeout=10, check=False)
    return json.loads(out.stdout) if out.returncode == 0 and out.stdout.strip() else []


def node_address(peer: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """This node's address for Ray: ``INSITU_NODE_IP`` (per-node form allowed), else
    :func:`pick_address` on the live ``ip -j`` outputs (route to ``peer``, another node of the job)."""
    env = os.environ if environ is None else environ
    setting = node_ip_setting(env.get("INSITU_NODE_IP", ""), env.get("SLURMD_NODENAME", ""))
    if setting:
        return setting
    route = _ip_json("route", "get", peer) if peer else None
    return pick_address(route, _ip_json("addr"), env.get("INSITU_IFACE") or None,
                        emulated=env.get("INSITU_EMULATED_NODES") == "1")  # fmt: skip


def address_for_job(environ: Mapping[str, str] | None = None) -> str:
    """:func:`node_address` inside a SLURM step: the peer is another node of the job
    (``SLURM_JOB_NODELIST``, resolved by name), so the route picks the cluster interface."""
    import socket

    env = os.environ if environ is None else environ
    me = env.get("SLURMD_NODENAME", "")
    peer = None
    if env.get("SLURM_JOB_NODELIST") and not node_ip_setting(env.get("INSITU_NODE_IP", ""), me):
        out = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]], capture_output=True,
                             text=True, timeout=30, check=False)  # fmt: skip
        for name in out.stdout.split():
            if name != me:
                try:
                    peer = socket.gethostbyname(name)
                    break
                except OSError:
                    continue
    return node_address(peer, env)


@dataclass(frozen=True, slots=True)
class PortPlan:
    """A job's Ray ports on one host: ``stride`` ports per node from ``base`` (one node per
    host on a real cluster; emulated nodes on one host each get the next ``stride``)."""

    base: int
    stride: int

    @property
    def workers(self) -> int:
        """Worker ports per node (every actor, even a zero-CPU one, holds one)."""
        return self.stride - _FIXED_PORTS


def port_plan(job_id: int, cpus: int, nodes_per_host: int = 1, local_range: tuple[int, int] = (32768, 60999),
              shift: int = 0) -> PortPlan:  # fmt: skip
    """Ray's port block of a job: outside the kernel's ephemeral range, ``max(2 x cpus, 64)``
    worker ports per node, placed by job id (``shift`` moves it when it is busy).

    Examples
    --------
    >>> p = port_plan(1, cpus=128, nodes_per_host=3, local_range=(10000, 65000))
    Traceback (most recent call last):
    ...
    insitu.errors.ConfigError: no room for 3 x 266 Ray ports outside the ephemeral port range 10000-65000 ...
    """
    stride = _FIXED_PORTS + max(2 * int(cpus), 64)
    span = stride * max(1, nodes_per_host)
    lo, hi = local_range
    regions = [(r0, r1) for r0, r1 in ((_LOWEST_PORT, lo - 1), (hi + 1, 65535)) if r1 - r0 + 1 >= span]
    slots = [(r0 + i * span) for r0, r1 in regions for i in range((r1 - r0 + 1) // span)]
    if not slots:
        raise ConfigError(
            f"no room for {max(1, nodes_per_host)} x {stride} Ray ports outside the ephemeral port range "
            f"{lo}-{hi} (and above {_LOWEST_PORT}): narrow net.ipv4.ip_local_port_range or use fewer CPUs per node"
        )
    return PortPlan(slots[(job_id + shift) % len(slots)], stride)


def ephemeral_range() -> tuple[int, int]:
    """This host's ``net.ipv4.ip_local_port_range``: ports the kernel may hand to any outgoing
    connection at any moment (a listener picked there can lose its port before it binds)."""
    lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    return lo, hi


def ray_ports(job_id: int, cpus: int, nodes_per_host: int = 1, shift: int = 0) -> PortPlan:
    """:func:`port_plan` with this host's ``ip_local_port_range``."""
    return port_plan(job_id, cpus, nodes_per_host, ephemeral_range(), shift)
