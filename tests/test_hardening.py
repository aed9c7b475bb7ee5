"""Consumers' messages are applied in their order, and steering logs stay compacted.

The head actor runs on the session's cluster and is called directly, out of order, as Ray may
run calls to an async actor; the node actor and the rank's log are fed 1,000 updates and their
sizes checked (the number of keys, not of updates).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from insitu.config import Config
from insitu.messages import AnalyticsState, Status, SteeringUpdate
from tests.conftest import run_name

pytestmark = pytest.mark.cluster


def _link() -> Any:
    import ray

    @ray.remote(num_cpus=0)
    class Link:
        async def park(self) -> None:
            await asyncio.sleep(3600)

    return Link.remote()


@pytest.fixture
def head(cluster: Any) -> Any:
    import ray

    from insitu.actors.head import get_or_create_head

    run = run_name("order")
    actor = get_or_create_head(run, Config.from_env().replace(reclaim_deadline=60))
    link = _link()
    yield actor, link
    ray.kill(link)
    ray.kill(actor)


def test_a_key_set_at_two_steps_ends_with_the_later_value_whatever_the_delivery_order(head: Any) -> None:
    import ray

    actor, link = head
    cid = ray.get(actor.attach.remote(link, {"u": 1})).consumer
    # the completion of step 6 (seq 1) is delivered before that of step 5 (seq 0)
    ray.get(actor.next_steps.remote(cid, 0.01, (6, (("k", "at 6"),)), 1))
    stats = ray.get(actor.stats.remote())
    assert stats["steering"] == {}  # held back until seq 0 arrives
    ray.get(actor.done.remote(cid, 5, (("k", "at 5"),), 0))
    stats = ray.get(actor.stats.remote())
    assert stats["steering"] == {"k": "at 6"}
    assert stats["steering_versions"] == {"k": 2}
    assert stats["consumers"][cid]["completed"] == 6
    # out-of-callback sets, delivered in reverse: the last one sent wins
    ray.get(actor.set.remote("j", 2, -1, cid, 3))
    ray.get(actor.set.remote("j", 1, -1, cid, 2))
    assert ray.get(actor.stats.remote())["steering"] == {"k": "at 6", "j": 2}


def test_a_detach_delivered_before_the_failure_does_not_hide_it(head: Any) -> None:
    import ray

    actor, link = head
    cid = ray.get(actor.attach.remote(link, {"u": 1})).consumer
    detached = actor.detach.remote(cid, 1)  # sent after the failure, delivered first
    assert ray.get(actor.stats.remote())["consumers"][cid]["state"] == "ATTACHED"
    ray.get(actor.fail.remote(cid, "callback watch failed at step 3", 0))
    ray.get(detached, timeout=10)
    stats = ray.get(actor.stats.remote())
    assert stats["consumers"][cid]["state"] == "FAILED"
    assert stats["consumers"][cid]["failure"] == "callback watch failed at step 3"
    assert stats["analytics"] == AnalyticsState.FAILED.name


def test_a_detach_whose_earlier_message_never_comes_applies_after_a_grace(head: Any) -> None:
    """A signal can interrupt a consumer between numbering a message and sending it (``insitu
    record`` SIGINTed while it polled): its detach, numbered after, must not wait forever and leave
    the consumer to be called *failed* when its process exits."""
    import ray

    actor, link = head
    cid = ray.get(actor.attach.remote(link, {"u": 1})).consumer
    ray.get(actor.done.remote(cid, 0, (), 0))
    t0 = time.monotonic()
    ray.get(actor.detach.remote(cid, 2), timeout=10)  # seq 1 was numbered, never sent
    assert 2.5 < time.monotonic() - t0 < 8
    stats = ray.get(actor.stats.remote())
    assert stats["consumers"][cid]["state"] == "DETACHED" and stats["consumers"][cid]["completed"] == 0
    ray.get(actor.fail.remote(cid, "late", 1))  # a message below the detach arriving after it: ignored
    assert ray.get(actor.stats.remote())["consumers"][cid]["state"] == "DETACHED"


def test_the_heads_steering_log_keeps_the_last_value_per_key_after_1000_updates(head: Any) -> None:
    import ray

    actor, link = head
    cid = ray.get(actor.attach.remote(link, {"u": 1})).consumer
    ray.get([actor.set.remote(f"k{i % 5}", i, -1, cid, i) for i in range(1000)])
    stats = ray.get(actor.stats.remote())
    assert stats["steering_log"] == 5
    assert stats["steering"] == {f"k{j}": 995 + j for j in range(5)}
    assert stats["steering_versions"] == {f"k{j}": 996 + j for j in range(5)}


def test_the_node_actors_history_keeps_the_last_value_per_key_after_1000_updates(head: Any) -> None:
    import ray

    from insitu.actors.node import NodeActor

    actor, _ = head
    node = NodeActor.remote("order-node", "n" * 40, actor, (0,))
    try:
        ray.get(node.start.remote(Status(-1, AnalyticsState.PENDING, (), "", 0), actor))
        for seq in range(1, 1001):
            node.update.remote(Status(-1, AnalyticsState.ATTACHED,
                                      (SteeringUpdate(seq, f"k{seq % 7}", seq, seq),), "", seq))  # fmt: skip
        assert ray.get(node.stats.remote())["history"] == 7
    finally:
        ray.kill(node)


def test_a_ranks_steering_log_holds_only_unapplied_updates_after_1000_updates() -> None:
    from insitu.bridge import Bridge
    from insitu.messages import Wire

    bridge = Bridge.__new__(Bridge)  # the rank's status handling, without MPI or a node actor
    bridge._channel = None
    bridge._broken = ""
    bridge._completed_seen = -1
    bridge._log, bridge._seen_version, bridge._applied_version, bridge._values = {}, 0, 0, {}
    for version in range(1, 1001):
        update = SteeringUpdate(version, f"k{version % 3}", version, version)
        bridge._handle([(Wire.STATUS, Status(version, AnalyticsState.ATTACHED, (update,), "", version))])
        if version % 10 == 0:
            bridge._apply_steering(version - 5)  # the agreed version lags what this rank has seen
    assert bridge._seen_version == 1000
    assert sorted(bridge._log) == list(range(996, 1001))  # only what is not yet agreed
    assert bridge._values == {"k0": 993, "k1": 994, "k2": 995}
    bridge._apply_steering(1000)
    assert bridge._log == {} and bridge._values == {"k0": 999, "k1": 1000, "k2": 998}
    bridge._closed = True


def test_two_analytics_in_one_process_compute_on_their_own_schedulers_and_share_the_connection(cluster: Any) -> None:
    """Item 5: a real analytics process holds two Analytics (threads) computing at the same time."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT, expected_field, finish_sim, start_sim

    runs, steps, shapes = [run_name("two-a"), run_name("two-b")], [2, 4], [[8, 6], [6, 4]]
    sims = [
        start_sim(cluster, 2, {"run": runs[0], "steps": steps[0], "shape": shapes[0]}),
        start_sim(cluster, 1, {"run": runs[1], "steps": steps[1], "shape": shapes[1]}, nodes=cluster.node_ips[1:]),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("INSITU_")} | cluster.environment()
    options = json.dumps({"runs": runs, "steps": steps, "shapes": shapes})
    proc = subprocess.run([sys.executable, str(ROOT / "tests/sims/two_analytics.py"), options], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=240, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for sim in sims:
        assert finish_sim(sim).returncode == 0
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    a, b, driver = out[runs[0]], out[runs[1]], out["driver"]
    assert a["error"] is None and b["error"] is None, (a["error"], b["error"])
    assert (a["steps"], b["steps"]) == (2, 4)  # b went on after a left: the connection was not ended under it
    assert a["values_ok"] == [True] * 2 and b["values_ok"] == [True] * 4
    assert expected_field(0, (2, 2)).tolist() == [[0.0, 1.0], [2.0, 3.0]]  # the sims' field, as checked there
    for pids, executors in zip(a["pids"], a["executors"], strict=True):
        assert pids and set(pids) <= set(executors), "insitu's scheduler runs block tasks in the compute actors"
    for pids in b["pids"]:
        assert driver not in pids, "b's graph ran on a's scheduler (its chunks unknown there: read in the driver)"
    assert not set().union(*map(set, b["pids"])) & set().union(*map(set, a["executors"]))
    for pids, executors in zip(a["explicit"], a["executors"], strict=True):
        assert not set(pids) & {driver, *executors}, "compute(scheduler=...) must win over the router"
    assert out["other_cluster"].startswith("ConfigError: Analytics(run='elsewhere') is pointed at the Ray cluster at "
                                           "127.0.0.1:9, but this process is connected to the one at ")  # fmt: skip
    assert out["other_cluster_seconds"] < 5, "refused at once, not after trying to connect"
    assert out["connected_after"] is False, "the last Analytics to leave ends the connection insitu made"
    assert out["plain_dask_after"] == 45


def _relay_kit() -> tuple[Any, Any]:
    """A consumer actor (pinned to a LAN node, where unconstrained work is relayed) and its target class."""
    import os
    import time
    from pathlib import Path

    import ray

    from insitu.dispatch import Dispatcher
    from insitu.errors import RelayLostError, StepTimeoutError

    class Held:
        def nap(self, seconds: float) -> None:
            time.sleep(seconds)

        def die(self) -> None:
            os._exit(1)

    def ticking(path: str, seconds: int) -> None:
        for _ in range(seconds):  # one tick a second: a stopped file means the task stopped
            with open(path, "a") as fh:
                fh.write(".")
            time.sleep(1)

    def counts_then_calls_a_dead_actor(path: str) -> None:
        with open(path, "a") as fh:
            fh.write(".")
        dead = ray.remote(Held).options(num_cpus=0).remote()
        ray.get(dead.die.remote())  # the target's death, inside the relayed work

    def outcome(fn: Any) -> str:
        try:
            fn()
        except RelayLostError:
            return "RelayLostError"
        except (StepTimeoutError, ray.exceptions.RayError) as exc:
            return f"{type(exc).__name__}:{isinstance(exc, ray.exceptions.RayActorError)}"
        return "no error"

    @ray.remote(num_cpus=0, max_restarts=0)
    class Consumer:
        def __init__(self, run: str) -> None:
            self.d = Dispatcher(run, deadline=60)
            self.held: list[Any] = []
            self.free = {"num_cpus": 0}  # no constraint: relayed from a LAN node

        def pid(self) -> int:
            return os.getpid()

        def timeout_cancels(self, ticks: str) -> list[Any]:
            began = time.monotonic()
            got = outcome(lambda: self.d.task(ticking, ticks, 600, options=self.free).get(3))
            return [got, time.monotonic() - began]

        def target_dies(self) -> str:
            fragile = self.d.actor(Held, options=self.free)
            return outcome(lambda: fragile.call("die").get(60))

        def retriable_target_failure(self, count: str) -> list[Any]:
            task = self.d.task(counts_then_calls_a_dead_actor, count, options=self.free, retriable=True)
            return [outcome(lambda: task.get(60)), len(Path(count).read_text())]

        def hold(self, ticks: str) -> list[Any]:
            """An actor busy for 10 minutes and a ticking task, both through the relay, never collected."""
            held = self.d.actor(Held, options=self.free)
            self.held += [held, held.call("nap", 600), self.d.task(ticking, ticks, 600, options=self.free)]
            return [self.d.relay_prefix, held.route.value, self.held[-1].route.value]

    return Consumer, Held


def _alive_actors(address: str, run: str) -> list[str]:
    from ray.util.state import list_actors

    alive = list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=10000, raise_on_missing_output=False)
    return [f"{a.class_name}:{a.name}" for a in alive if (a.name or "").startswith(f"insitu-relay-{run}")
            or a.class_name.endswith("Held")]  # fmt: skip


def _stopped(path: Path, seconds: float = 3.0) -> bool:
    before = path.stat().st_size
    time.sleep(seconds)
    return path.stat().st_size == before


def test_relayed_work_has_deadlines_reports_target_failures_and_dies_with_its_consumer(
    cluster: Any, tmp_path: Path
) -> None:
    """Item 6: timeouts cancel relayed work, a target's death is not the relay's, SIGKILL reclaims everything."""
    import os
    import signal

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    run = run_name("relay")
    lan = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] == cluster.node_ips[1])
    consumer_cls, _ = _relay_kit()
    consumer = consumer_cls.options(scheduling_strategy=NodeAffinitySchedulingStrategy(lan, soft=False)).remote(run)
    pid = ray.get(consumer.pid.remote(), timeout=60)

    first = tmp_path / "timeout.ticks"
    got, seconds = ray.get(consumer.timeout_cancels.remote(str(first)), timeout=120)
    assert got == "StepTimeoutError:False" and seconds < 15
    assert _stopped(first), "the caller's timeout must cancel the relayed task"

    assert ray.get(consumer.target_dies.remote(), timeout=120) == "ActorDiedError:True"  # not RelayLostError
    count = tmp_path / "count"
    got, runs = ray.get(consumer.retriable_target_failure.remote(str(count)), timeout=120)
    assert got.startswith("ActorDiedError") and runs == 1, "retriable never reruns the target's failure"

    ticks = tmp_path / "held.ticks"
    prefix, actor_route, task_route = ray.get(consumer.hold.remote(str(ticks)), timeout=120)
    assert (actor_route, task_route) == ("relay", "relay")
    deadline = time.monotonic() + 30
    while not ticks.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = _alive_actors(cluster.address, run)
    assert any(a.endswith("Relay:" + prefix + "1") for a in alive) and any(a.startswith("Held") for a in alive), alive
    assert not _stopped(ticks, 2.0)

    os.kill(pid, signal.SIGKILL)  # the consumer's process dies without a word
    reclaim = Config.from_env().replace(reclaim_deadline=30).reclaim_deadline
    end = time.monotonic() + reclaim
    while _alive_actors(cluster.address, run) and time.monotonic() < end:
        time.sleep(1)
    assert _alive_actors(cluster.address, run) == [], "the relay and the actors it made must die with the consumer"
    assert _stopped(ticks), "the task the relay submitted must stop with it"


def test_close_finds_every_relay_the_dispatcher_made_by_name(cluster: Any) -> None:
    """A replacement relay (made after the dispatcher lost sight of the first) is named too, and close() ends both."""
    import ray

    from insitu.dispatch import Dispatcher

    run = run_name("fallback")
    d = Dispatcher(run)
    first = d.relay()
    d._forget_relay()  # what a call that saw the relay fail does; this one is still alive
    second = d.relay()
    assert first != second
    names = [f"{d.relay_prefix}1", f"{d.relay_prefix}2"]
    assert all(ray.get_actor(n, namespace=d.namespace) for n in names)
    d.close()
    end = time.monotonic() + 30
    while _alive_actors(cluster.address, run) and time.monotonic() < end:
        time.sleep(0.5)
    assert _alive_actors(cluster.address, run) == []
