"""A node's address among several interfaces, Ray's ports outside the ephemeral range (insitu.site).

Recorded ``ip -j`` outputs for the rules; a network namespace with decoy interfaces for the
live lookup (skipped with the reason where namespaces are denied).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from insitu.errors import ConfigError
from insitu.site import acceptable, node_ip_setting, pick_address, port_plan, ray_ports


def _iface(name: str, *addrs: str) -> dict[str, object]:
    return {"ifname": name, "addr_info": [{"family": "inet", "local": a, "prefixlen": 24} for a in addrs]}


# A compute node as `ip -j -4 addr` shows it: docker and a bridge come before the fabric
NODE = [_iface("lo", "127.0.0.1"), _iface("docker0", "172.17.0.1"), _iface("br-5f2a", "172.18.0.1"),
        _iface("veth12ab"), _iface("eno1", "169.254.7.7"), _iface("ib0", "10.12.0.31"),
        _iface("eth0", "192.168.10.31")]  # fmt: skip
ROUTE_TO_PEER = [{"dst": "10.12.0.32", "dev": "ib0", "prefsrc": "10.12.0.31", "flags": [], "uid": 0, "cache": []}]
ROUTE_VIA_DOCKER = [{"dst": "172.17.0.5", "dev": "docker0", "prefsrc": "172.17.0.1", "flags": [], "cache": []}]


def test_the_route_to_a_peer_picks_the_fabric_address() -> None:
    assert pick_address(ROUTE_TO_PEER, NODE) == "10.12.0.31"


def test_a_route_through_a_container_bridge_is_refused_and_the_first_usable_address_taken() -> None:
    # docker0, br-*, veth*, loopback and link-local are skipped, in the order ip lists them
    assert pick_address(ROUTE_VIA_DOCKER, NODE) == "10.12.0.31"
    assert pick_address(None, NODE) == "10.12.0.31"


def test_insitu_iface_wins_and_a_missing_one_is_named() -> None:
    assert pick_address(ROUTE_TO_PEER, NODE, iface="eth0") == "192.168.10.31"
    with pytest.raises(ConfigError, match="INSITU_IFACE=ib1 has no IPv4 address"):
        pick_address(ROUTE_TO_PEER, NODE, iface="ib1")


def test_nothing_usable_says_what_was_seen() -> None:
    only_bad = [_iface("lo", "127.0.0.1"), _iface("docker0", "172.17.0.1"), _iface("eno1", "169.254.1.2")]
    with pytest.raises(ConfigError, match=r"no usable address.*docker0=172\.17\.0\.1.*INSITU_IFACE"):
        pick_address(None, only_bad)
    # emulated nodes on one host may use loopback aliases
    assert pick_address([{"dev": "lo", "prefsrc": "127.0.0.21"}], only_bad, emulated=True) == "127.0.0.21"


def test_rules_and_the_per_node_setting() -> None:
    assert not acceptable("127.0.0.1", "lo") and not acceptable("169.254.0.9", "ib0")
    assert not acceptable("10.0.0.1", "veth0") and acceptable("10.0.0.1", "hsn0")
    assert node_ip_setting("n1=10.0.0.1,n2=10.0.0.2", "n1") == "10.0.0.1"
    assert node_ip_setting("10.9.9.9", "anything") == "10.9.9.9"


@pytest.mark.parametrize("cpus", [1, 2, 32, 64, 128])
@pytest.mark.parametrize("local_range", [(32768, 60999), (15000, 60999), (1024, 50000)])
def test_port_blocks_avoid_the_ephemeral_range_and_hold_enough_worker_ports(
    cpus: int, local_range: tuple[int, int]
) -> None:
    lo, hi = local_range
    seen = set()
    for job in range(0, 400, 7):
        for nodes_per_host in (1, 3):
            p = port_plan(job, cpus, nodes_per_host, local_range)
            assert p.workers >= max(2 * cpus, 64)
            first, last = p.base, p.base + p.stride * nodes_per_host - 1
            assert last < lo or first > hi, (p, local_range)
            assert 1024 < first and last <= 65535
            seen.add(p.base)
    assert len(seen) > 10  # jobs spread over the free region
    assert port_plan(7, cpus, 1, local_range).base != port_plan(7, cpus, 1, local_range, shift=1).base


def test_no_room_is_an_error_that_says_what_to_change() -> None:
    with pytest.raises(ConfigError, match="ip_local_port_range"):
        port_plan(1, cpus=512, nodes_per_host=4, local_range=(10000, 65000))


def test_ray_ports_reads_this_hosts_range() -> None:
    lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    p = ray_ports(42, os.cpu_count() or 1)
    assert p.base + p.stride - 1 < lo or p.base > hi


def _netns_ok() -> str | None:
    if shutil.which("ip") is None:
        return "iproute2 is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"insitu-probe-{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        return f"ip netns add is denied here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], check=False)
    return None


def test_live_lookup_in_a_namespace_with_decoy_interfaces() -> None:
    """docker0 (listed first), a link-local interface and loopback are present; the fabric interface
    has the route to the peer: the address of the fabric is chosen. No packet is sent."""
    reason = _netns_ok()
    if reason:
        pytest.skip(reason)
    ns = f"insitu-site-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        # veth pairs (the dummy driver is not everywhere): the named end carries the address
        cmds = [["link", "set", "lo", "up"]]
        for name, cidr in (("docker0", "172.17.0.1/16"), ("eno9", "169.254.9.9/16"), ("fabric0", "10.123.0.5/24")):
            cmds += [["link", "add", name, "type", "veth", "peer", "name", f"{name}p"],
                     ["addr", "add", cidr, "dev", name],
                     ["link", "set", name, "up"], ["link", "set", f"{name}p", "up"]]  # fmt: skip
        for cmd in cmds:
            subprocess.run(["ip", "-n", ns, *cmd], check=True, capture_output=True)
        code = ("import json, sys; from insitu.site import node_address; "
                "print(json.dumps([node_address('10.123.0.9', {}), node_address(None, {}), "
                "node_address('10.123.0.9', {'INSITU_IFACE': 'docker0'})]))")  # fmt: skip
        out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], capture_output=True,
                             text=True, timeout=60, check=False)  # fmt: skip
        assert out.returncode == 0, out.stderr
        via_route, by_scan, forced = json.loads(out.stdout)
        assert via_route == "10.123.0.5"  # the source of the route to the peer
        assert by_scan == "10.123.0.5"  # no peer: docker0 and the link-local address are skipped
        assert forced == "172.17.0.1"  # INSITU_IFACE is obeyed as given
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
