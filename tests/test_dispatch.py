"""Tunnel-aware dispatch: the reachability rule (table-driven and property-based), and the relay on a
real 3-raylet cluster whose third raylet carries the remote marker."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from insitu.dispatch import Dispatcher
from insitu.errors import ConfigError
from insitu.reach import NodeRole, NodeView, Placement, Route, Snapshot, decide, reachable, snapshot_from_ray
from tests.conftest import LAUNCH, run_check

H, L1, L2, R1, R2 = "head", "lan1", "lan2", "rem1", "rem2"
ROLES = {H: NodeRole.HEAD, L1: NodeRole.LAN, L2: NodeRole.LAN, R1: NodeRole.REMOTE, R2: NodeRole.REMOTE}
GPU = {L2: {"gpu"}, R1: {"gpu", "box"}}
SNAP = Snapshot(tuple(NodeView(n, r, frozenset(GPU.get(n, set()))) for n, r in ROLES.items()), taken_at=100.0)


@pytest.mark.parametrize(
    ("caller", "placement", "now", "expected"),
    [
        (H, Placement(), 100.0, Route.DIRECT),  # the head never relays
        (L1, Placement(node_id=L2), 100.0, Route.DIRECT),
        (L1, Placement(node_id=R1), 100.0, Route.RELAY),
        (R1, Placement(node_id=L1), 100.0, Route.RELAY),
        (R1, Placement(node_id=R1), 100.0, Route.DIRECT),  # itself
        (R1, Placement(node_id=H), 100.0, Route.DIRECT),
        (R1, Placement(node_id=R2), 100.0, Route.RELAY),
        (L1, Placement(node_id="gone"), 100.0, Route.RELAY),  # missing from the snapshot
        (L1, Placement(node_id=L2, soft=True), 100.0, Route.RELAY),  # soft affinity: anywhere
        (L1, Placement(strategy="SPREAD"), 100.0, Route.RELAY),
        (L1, Placement(strategy="PLACEMENT_GROUP"), 100.0, Route.RELAY),
        (L1, Placement(), 100.0, Route.RELAY),  # no constraint: unknown
        (L1, Placement(resources=frozenset({"gpu"})), 101.0, Route.RELAY),  # could land on rem1
        (R1, Placement(resources=frozenset({"box"})), 101.0, Route.DIRECT),  # only rem1 has it
        (L1, Placement(resources=frozenset({"box"})), 101.0, Route.RELAY),
        (R1, Placement(resources=frozenset({"box"})), 200.0, Route.RELAY),  # stale snapshot
        (R1, Placement(resources=frozenset({"nobody"})), 101.0, Route.RELAY),
        ("unknown-caller", Placement(node_id=H), 100.0, Route.RELAY),
    ],
)
def test_rule_on_a_synthetic_node_table(caller: str, placement: Placement, now: float, expected: Route) -> None:
    assert decide(caller, placement, SNAP, now, ttl=5.0) == expected


def test_an_autoscaler_makes_resource_constraints_unprovable() -> None:
    snap = Snapshot(SNAP.nodes, taken_at=100.0, autoscaler=True)
    assert decide(R1, Placement(resources=frozenset({"box"})), snap, 101.0) == Route.RELAY


def test_roles_from_the_live_node_table() -> None:
    nodes = [
        {"NodeID": "a", "Alive": True, "Resources": {"node:__internal_head__": 1.0, "CPU": 2}},
        {"NodeID": "b", "Alive": True, "Resources": {"CPU": 2}},
        {"NodeID": "c", "Alive": True, "Resources": {"insitu_remote": 1.0}},
        {"NodeID": "d", "Alive": False, "Resources": {"CPU": 2}},
    ]
    snap = snapshot_from_ray(nodes, now=0.0)
    assert [(n.node_id, n.role) for n in snap.nodes] == [("a", NodeRole.HEAD), ("b", NodeRole.LAN),
                                                          ("c", NodeRole.REMOTE)]  # fmt: skip


def test_env_marker_fallback() -> None:
    from insitu.reach import node_role_from_env

    assert node_role_from_env({"INSITU_NODE_ROLE": "remote"}) == NodeRole.REMOTE
    assert node_role_from_env({}) is None
    with pytest.raises(ConfigError, match="head, lan or remote"):
        node_role_from_env({"INSITU_NODE_ROLE": "cloud"})


def test_more_than_one_return_value_is_refused() -> None:
    from insitu.dispatch import _check_options

    with pytest.raises(ConfigError, match="one return value"):
        _check_options({"num_returns": 2})


roles = st.sampled_from(list(NodeRole))
tables = st.lists(st.tuples(roles, st.sets(st.sampled_from(["gpu", "box", "x"]), max_size=2)), min_size=1, max_size=6)


@given(table=tables, caller_i=st.integers(0, 5), target_i=st.integers(-1, 6), res=st.sets(st.sampled_from(["gpu",
       "box", "x"]), max_size=2), soft=st.booleans(), strategy=st.sampled_from([None, "SPREAD"]),
       age=st.floats(0, 10), autoscaler=st.booleans())  # fmt: skip
def test_direct_only_when_every_possible_landing_node_is_reachable(table: list, caller_i: int, target_i: int,
                                                                    res: set, soft: bool, strategy: str | None,
                                                                    age: float, autoscaler: bool) -> None:  # fmt: skip
    nodes = tuple(NodeView(f"n{i}", role, frozenset(r)) for i, (role, r) in enumerate(table))
    snap = Snapshot(nodes, taken_at=0.0, autoscaler=autoscaler)
    caller = f"n{caller_i}"
    target = None if target_i < 0 else f"n{target_i}"
    placement = Placement(node_id=target, soft=soft, resources=frozenset(res), strategy=strategy)
    route = decide(caller, placement, snap, now=age, ttl=5.0)
    if route == Route.DIRECT:
        me = snap.node(caller)
        assert me is not None
        # every node the work could land on, by Ray's own rules
        if target is not None and not soft:
            possible = [n for n in nodes if n.node_id == target]
        elif target is not None or strategy is not None or not res:
            possible = list(nodes)  # anywhere (and nodes an autoscaler may add)
            assert me.role == NodeRole.HEAD
        else:
            possible = [n for n in nodes if res <= n.resources]
            assert me.role == NodeRole.HEAD or (age <= 5.0 and not autoscaler)
        assert possible or me.role == NodeRole.HEAD
        assert all(reachable(me.role, n.role, n.node_id == me.node_id) for n in possible)


@pytest.mark.timeout(400)
def test_relay_on_a_real_cluster_with_a_remote_marked_raylet() -> None:
    got = run_check("dispatch_check.py", timeout=380)
    routes = got["routes"]
    assert routes["head"] == {"head": "direct", "lan": "direct", "remote": "direct", "spread": "direct",
                              "remote-resource": "direct"}  # fmt: skip
    assert routes["lan"]["lan"] == "direct" and routes["lan"]["head"] == "direct"
    assert routes["lan"]["remote"] == "relay" and routes["lan"]["spread"] == "relay"
    assert routes["lan"]["remote-resource"] == "relay"
    assert routes["remote"]["remote"] == "direct" and routes["remote"]["head"] == "direct"
    assert routes["remote"]["lan"] == "relay" and routes["remote"]["remote-resource"] == "direct"
    fr = got["from_remote"]
    assert fr["task"] == [42, True, "relay"]
    assert fr["nested_ref"] == 11
    assert fr["actor"] == [11, 13, True, "relay"]
    assert fr["many"] == 16 and fr["inner"] == 8
    assert fr["again"] == [0, 2, 4] and fr["lambdas"] == [0, 10, 20]
    lost = got["relay_lost"]
    assert lost["lost"].startswith("RelayLostError") and lost["route"]
    assert lost["again"] == 2 and lost["retried"] == 6
    assert lost["unreadable"].startswith("UnreachableRefError") and "cannot be read even from the head" in lost[
        "unreadable"]  # fmt: skip
    assert got["relays_left"] == []


def _packet_filter_missing() -> str | None:
    """Why the premise test cannot run here, or None if it can."""
    import shutil

    if os.geteuid() != 0:
        return "needs root to create a network namespace and a packet filter"
    missing = [tool for tool in ("ip", "iptables", "unshare", "nsenter") if shutil.which(tool) is None]
    if missing:
        return f"needs {' and '.join(missing)} (Debian packages iproute2, iptables, util-linux)"
    ns = f"insitu-probe{os.getpid() % 100000}"
    steps = {
        "create a network namespace": ["ip", "netns", "add", ns],
        "add a packet filter rule in it": ["ip", "netns", "exec", ns, "iptables", "-A", "OUTPUT", "-d", "10.0.0.1",
                                           "-j", "DROP"],
        "create a veth pair": ["ip", "link", "add", f"isp{os.getpid() % 10000}", "type", "veth", "peer", "name",
                               f"isq{os.getpid() % 10000}"],
        "start a process in a PID namespace": ["unshare", "--pid", "--fork", "--mount-proc", "true"],
    }  # fmt: skip
    try:
        for what, cmd in steps.items():
            probe = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
            if probe.returncode != 0:
                return f"cannot {what} here: {probe.stderr.strip()[:200]}"
    finally:
        subprocess.run(["ip", "link", "del", f"isp{os.getpid() % 10000}"], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
    return None


@pytest.mark.timeout(200)
def test_premise_a_plain_call_across_the_filter_hangs_and_the_dispatched_one_returns() -> None:
    """Behind a real packet filter: the premise, then heat2d + heat_stats with the analytics on the remote node."""
    reason = _packet_filter_missing()
    if reason:
        print(f"premise test skipped: {reason}")
        pytest.skip(reason)
    got = run_check("premise_check.py", timeout=180)
    assert got["head_to_lan"] and got["head_to_remote"]  # the head reaches everything
    assert got["remote_to_lan_before_filter"]  # the filter, not something else, cuts the path
    assert not got["plain_ready"] and got["plain_pending_s"] >= 10.0
    assert got["dispatched_on_lan"] and got["route"] == "relay"
    heat = got["heat"]
    assert "error" not in heat, heat.get("error")
    # heat_stats on the remote node: the LAN node's blocks computed through the relay, its own directly
    assert heat["steps"] == 12 and heat["max_abs_error"] < 1e-12
    assert heat["block_ips"] == sorted([heat["lan_ip"], heat["remote_ip"]])  # a node actor on each side
    assert heat["routes"] == {heat["lan_ip"]: "relay", heat["remote_ip"]: "direct"}


@pytest.mark.timeout(200)
def test_a_remote_node_joins_through_tunnel_sh_and_dispatch_crosses_it() -> None:
    """A real SSH tunnel: the namespace may only speak SSH to the host; Ray runs through launch/tunnel.sh."""
    reason = _packet_filter_missing()
    missing = [p for p in ("/usr/sbin/sshd", shutil.which("ssh") or "/no/ssh") if not Path(p).exists()]
    if reason is None and missing:
        reason = f"needs {', '.join(missing)} (Debian packages openssh-server, openssh-client)"
    if reason:
        print(f"tunnel test skipped: {reason}")
        pytest.skip(reason)
    got = run_check("tunnel_check.py", timeout=180)
    assert got["lan_direct_from_remote"] is False  # only SSH leaves the namespace
    assert got["remote_joined"] and got["head_to_remote"]  # joined with the marker, reached through -R
    assert got["dispatched_on_lan"] and got["route"] == "relay"  # -L to the head's relay, then the LAN


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen (Debian package openssh-client)")
def test_tunnel_script_verifies_host_keys_and_forwards_on_the_advertised_addresses(tmp_path: Path) -> None:
    key = tmp_path / "hostkey"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30)
    known = tmp_path / "known_hosts"
    known.write_text("head.example.org " + " ".join(key.with_suffix(".pub").read_text().split()[:2]) + "\n")
    env = {**os.environ, "INSITU_TUNNEL_KNOWN_HOSTS": str(known), "HEAD_IP": "10.0.0.1", "REMOTE_IP": "10.250.0.7",
           "HEAD_WMIN": "20100", "HEAD_WMAX": "20104", "NODE_WMIN": "20200", "NODE_WMAX": "20209"}  # fmt: skip
    script = str(LAUNCH / "tunnel.sh")

    def run(target: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", script, target], env={**env, **extra}, capture_output=True, text=True,
                              timeout=30, check=False)  # fmt: skip

    unknown = run("user@elsewhere.example.org", INSITU_TUNNEL_DRY_RUN="1")
    assert unknown.returncode == 1 and "no verified host key for elsewhere.example.org" in unknown.stderr
    not_local = run("user@head.example.org")  # 10.0.0.1 is no alias here: refused before any ssh
    assert not_local.returncode == 1 and "ip addr add 10.0.0.1/32 dev lo" in not_local.stderr
    dry = run("user@head.example.org", INSITU_TUNNEL_DRY_RUN="1")
    assert dry.returncode == 0, dry.stderr
    words = dry.stdout.split()
    assert "StrictHostKeyChecking=yes" in words and "StrictHostKeyChecking=no" not in dry.stdout
    local = [words[i + 1] for i, w in enumerate(words) if w == "-L"]
    remote = [words[i + 1] for i, w in enumerate(words) if w == "-R"]
    assert len(local) == 3 + 5 and all(f.startswith("10.0.0.1:") and f.count("10.0.0.1") == 2 for f in local)
    assert len(remote) == 4 + 10 and all(f.startswith("10.250.0.7:") for f in remote)
    assert "10.0.0.1:6379:10.0.0.1:6379" in local and words[-1] == "user@head.example.org"


def test_functions_are_made_remote_and_pickled_once_per_dispatcher_in_a_bounded_cache() -> None:
    from insitu.dispatch import _FN_CACHE

    d = Dispatcher("unit")

    def f(x: int) -> int:
        return x

    assert d._remote_fn(f) is d._remote_fn(f)
    assert d._shipped_fn(f) is d._shipped_fn(f)
    a, b = (lambda: 1), (lambda: 2)  # noqa: E731  look-alikes: same name, different code
    assert d._shipped_fn(a).digest != d._shipped_fn(b).digest
    many = [lambda k=k: k for k in range(_FN_CACHE + 10)]
    for g in many:
        d._remote_fn(g)
    assert len(d._fns) == _FN_CACHE
    assert d._remote_fn(many[-1]) is d._remote_fn(many[-1])  # the most recent stay
