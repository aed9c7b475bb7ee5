"""Slice pools: the pure parts (spec, discovery, autoscaler request, probes) and, on a real 4-raylet cluster
emulating two slices of two hosts, scaling, health, run, cancel and drain."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from insitu.config import Config
from insitu.errors import ConfigError
from insitu.pool import SlicePool, SliceSpec, file_probe, metadata_probe, request_slices, slice_names
from tests.conftest import run_check


def test_spec_bundle_and_validation() -> None:
    assert SliceSpec(hosts=4, gpus_per_host=8).bundle("slice_x") == {"slice_x": 1.0, "CPU": 1.0, "GPU": 8.0}
    assert SliceSpec(hosts=2, cpus_per_host=0, tpus_per_host=4).bundle("pod") == {"pod": 1.0, "TPU": 4.0}
    with pytest.raises(ConfigError, match="hosts >= 1"):
        SliceSpec(hosts=0)
    with pytest.raises(ConfigError, match="gpus_per_host"):
        SliceSpec(hosts=1, gpus_per_host=-1)
    with pytest.raises(ConfigError, match="pool sizes"):
        SlicePool(SliceSpec(hosts=1), sizes=[])


def test_slice_discovery_counts_alive_hosts() -> None:
    nodes = [
        {"Alive": True, "Resources": {"insitu_slice_a": 1.0, "CPU": 2}},
        {"Alive": True, "Resources": {"insitu_slice_a": 1.0}},
        {"Alive": False, "Resources": {"insitu_slice_b": 1.0}},
        {"Alive": True, "Resources": {"insitu_slice_b": 1.0}},
        {"Alive": True, "Resources": {"other": 1.0}},
    ]
    assert slice_names(nodes, SliceSpec(hosts=2)) == ["insitu_slice_a"]
    assert slice_names(nodes, SliceSpec(hosts=1)) == ["insitu_slice_a", "insitu_slice_b"]
    assert slice_names(nodes, SliceSpec(hosts=1, prefix="oth")) == ["other"]


def test_autoscaler_request(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray.autoscaler.sdk

    seen: list[Any] = []
    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", lambda **kw: seen.append(kw))
    bundles = request_slices(SliceSpec(hosts=2, gpus_per_host=4), 2)
    assert seen == [{"bundles": bundles}]
    assert bundles == [{"CPU": 1.0, "GPU": 4.0}] * 4
    request_slices(SliceSpec(hosts=2), 1, ["insitu_slice_z"])
    assert seen[-1] == {"bundles": [{"insitu_slice_z": 1.0, "CPU": 1.0}] * 2}


@pytest.fixture
def metadata_server() -> Iterator[tuple[str, dict[str, str]]]:
    state = {"body": "FALSE", "header": ""}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            state["header"] = self.headers.get("Metadata-Flavor", "")
            body = state["body"].encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/preempted", state
    server.shutdown()
    server.server_close()


def test_metadata_probe(metadata_server: tuple[str, dict[str, str]]) -> None:
    url, state = metadata_server
    probe = metadata_probe(url, headers={"Metadata-Flavor": "Google"})
    assert probe() is False
    assert state["header"] == "Google"
    state["body"] = "TRUE\n"
    assert probe() is True
    assert metadata_probe("http://127.0.0.1:9/none", timeout=0.5)() is False  # unreachable: not preempted


def test_file_probe(tmp_path: Path) -> None:
    probe = file_probe(tmp_path / "flag")
    assert probe() is False
    (tmp_path / "flag").touch()
    assert probe() is True


def test_pool_deadlines_are_configuration() -> None:
    cfg = Config.from_env({"INSITU_POOL_CANCEL_DEADLINE": "7", "INSITU_POOL_HEALTH_INTERVAL": "2.5"})
    assert (cfg.pool_cancel_deadline, cfg.pool_health_interval) == (7.0, 2.5)
    assert Config().pool_ready_deadline == 120.0  # minutes, not days
    with pytest.raises(ConfigError, match="pool_drain_deadline"):
        Config.from_env({"INSITU_POOL_DRAIN_DEADLINE": "soon"})


@pytest.mark.timeout(300)
def test_pool_on_a_real_cluster_emulating_two_slices_of_two_hosts() -> None:
    got = run_check("pool_check.py", timeout=280)
    # scale: 3 is not feasible (two slices exist), 2 is; one placement group per slice, STRICT_SPREAD
    assert got["scaled_to"] == 2 and got["distinct_nodes"] == 4
    for _sid, name, per_node in got["first"]:
        assert per_node == [[name], [name]]  # every bundle on a host of its own slice
    # run on every host: per-host environment, grouped by slice or flat
    assert sorted(v for rows in got["run_by_slice"].values() for v in map(tuple, rows)) == [
        ("insitu_slice_a", 0, 2),
        ("insitu_slice_a", 1, 2),
        ("insitu_slice_b", 0, 2),
        ("insitu_slice_b", 1, 2),
    ]
    assert got["run_nodes_match"] and got["run_devices"] == [["CPU", 0]]
    assert sorted(map(tuple, got["run_flat"])) == [("insitu_slice_a", 0), ("insitu_slice_a", 1),
                                                   ("insitu_slice_b", 0), ("insitu_slice_b", 1)]  # fmt: skip
    assert got["down"] == [1, 1] and got["up"] == [2, 2, 1]
    # infeasible: placement groups never ready -> removed, InsufficientSlicesError naming the wait
    assert got["infeasible"].startswith("InsufficientSlicesError") and "within 3 s" in got["infeasible"]
    assert got["infeasible_pgs_left"] == []
    assert got["three"] == "InsufficientSlicesError" and got["after_three"] == 2
    # a host actor killed: SliceLostError for the work on it, the pool back at size with a new slice id
    assert got["lost"].startswith("SliceLostError")
    assert got["replaced"] and got["after_kill"] == [2, False, 1]
    # cancel: a coroutine is interrupted in place; a thread that ignores it gets its slices replaced
    assert got["cancel_async"] == "TaskCancelledError" and got["cancel_async_replaced"] == []
    assert got["cancel_async_s"] < 10
    assert got["cancel_sync"] == "TaskCancelledError" and got["cancel_sync_replaced"] and got["cancel_sync_s"] < 30
    assert got["after_cancel"] == [2, 0] and sorted(got["works_after_cancel"]) == [0, 0, 1, 1]
    # the preemption probe fired on every host: both slices replaced, pool back at size
    assert got["preempted"] and got["preempted_back"]
    # a stopped host process does not answer within pool_health_deadline (5 s): its slice alone is replaced
    assert got["unresponsive_replaced"] and got["unresponsive_other_kept"] and got["unresponsive_s"] < 40
    # drain: no host actor, no placement group left
    assert got["hosts_seen"] == got["hosts_dead"] > 0
    assert got["pgs_left"] == [] and got["size_after_drain"] == 0


class _UnpicklableProbe:
    """A preemption probe holding a lock: it cannot travel to the hosts, so a slice cannot start."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def __call__(self) -> bool:
        return False


def _node_slices(hosts: int = 1) -> SliceSpec:
    """Each raylet of the session's cluster as a slice of one host: its ``node:<ip>`` resource names it."""
    return SliceSpec(hosts=hosts, prefix="node:127.", cpus_per_host=0)


def _pgs(prefix: str) -> list[str]:
    import ray

    return [pg["state"] for pg in ray.util.placement_group_table().values() if pg["name"].startswith(prefix)]


@pytest.mark.cluster
def test_a_pool_whose_start_fails_removes_every_placement_group_it_made(cluster: Any) -> None:
    name = f"fail{threading.get_ident() % 10000}"
    pool = SlicePool(_node_slices(), sizes=[2], name=name, probe=_UnpicklableProbe(),
                     config=Config(pool_ready_deadline=30))  # fmt: skip
    with pytest.raises(TypeError, match="pickle"):
        pool.scale()
    states = _pgs(f"insitu-{name}-")
    assert len(states) == 2 and set(states) == {"REMOVED"}, states  # both were made, and both removed
    assert pool.size == 0
    pool.drain()


@pytest.mark.cluster
def test_scale_down_runs_the_shutdown_hook_on_the_hosts_within_its_deadline_then_kills_them(
    cluster: Any, tmp_path: Path
) -> None:
    import os
    import time

    from ray.util.state import list_actors

    def checkpoint_then_hang(env: Any) -> None:
        (tmp_path / env.slice_id).write_text(str(os.getpid()))
        time.sleep(600)  # a hook that never ends: the deadline cuts it

    name = f"hook{threading.get_ident() % 10000}"
    pool = SlicePool(_node_slices(), sizes=[2, 1], name=name, config=Config(pool_ready_deadline=30),
                     on_shutdown=checkpoint_then_hang, shutdown_deadline=2)  # fmt: skip
    assert pool.scale() == 2
    kept, dropped = [s.slice_id for s in pool.slices()]
    began = time.monotonic()
    assert pool.scale([1]) == 1
    assert 2 <= time.monotonic() - began < 20
    assert [p.name for p in tmp_path.iterdir()] == [dropped]  # the hook ran on the dropped slice's host only
    host_pid = int((tmp_path / dropped).read_text())
    end = time.monotonic() + 30
    while time.monotonic() < end:
        hosts = list_actors(address=cluster.address, filters=[("pid", "=", host_pid)], raise_on_missing_output=False)
        if hosts and all(h.state == "DEAD" for h in hosts):
            break
        time.sleep(0.5)
    assert hosts and all(h.state == "DEAD" for h in hosts), "the host is killed after its hook's deadline"
    pool.drain(graceful=True)  # a graceful drain runs the hook too
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([kept, dropped])
    assert set(_pgs(f"insitu-{name}-")) == {"REMOVED"}
