"""Consumers' messages are applied in their order, and steering logs stay compacted.

The head actor runs on the session's cluster and is called directly, out of order, as Ray may
run calls to an async actor; the node actor and the rank's log are fed 1,000 updates and their
sizes checked (the number of keys, not of updates).
"""

from __future__ import annotations

import asyncio
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
    ray.get(actor.detach.remote(cid, 1))  # sent after the failure, delivered first
    assert ray.get(actor.stats.remote())["consumers"][cid]["state"] == "ATTACHED"
    ray.get(actor.fail.remote(cid, "callback watch failed at step 3", 0))
    stats = ray.get(actor.stats.remote())
    assert stats["consumers"][cid]["state"] == "FAILED"
    assert stats["consumers"][cid]["failure"] == "callback watch failed at step 3"
    assert stats["analytics"] == AnalyticsState.FAILED.name


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
