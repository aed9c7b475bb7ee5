"""Real mpiexec + a real two-raylet Ray cluster: data path, placement, windows, steering, layouts."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

from tests.conftest import expected_field, finish_sim, run_name, run_sim, start_sim, wait_gone

pytestmark = pytest.mark.cluster


def head_of(run: str) -> Any:
    import ray

    from insitu.actors.head import head_name

    return ray.get_actor(head_name(run), namespace="insitu")


def make_analytics(run: str, **cfg: Any) -> Any:
    import insitu

    return insitu.Analytics(run=run, deadline=60, **cfg)


@pytest.mark.parametrize("ranks", [1, 4])
def test_fields_placement_and_one_message_per_node(cluster: Any, ranks: int) -> None:
    import ray

    run = run_name(f"e2e{ranks}")
    shape, steps = (12, 10), 6
    nodes = cluster.node_ips[:1] if ranks == 1 else cluster.node_ips
    proc = start_sim(cluster, ranks, {"run": run, "steps": steps, "shape": list(shape), "view": True}, nodes=nodes)
    analytics = make_analytics(run)
    seen: dict[int, np.ndarray] = {}
    means: dict[int, float] = {}
    locations: list[tuple[tuple[int, ...], list[str]]] = []
    final_stats: dict[str, Any] = {}

    @analytics.on_step("u")
    def record(step: int, u: list) -> None:
        arr = u[0]
        assert arr.step == step
        seen[step] = arr.compute()
        means[step] = float(arr.mean().compute())
        # each graph leaf picks its block out of its node's step object: (getitem, ref, index)
        leaves = {k[1:]: v for k, v in arr.dask.items()}
        assert all(isinstance(v[1], ray.ObjectRef) for v in leaves.values()), "graph leaves must be the chunks' refs"
        refs = {block: v[1] for block, v in leaves.items()}
        ip_of = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
        recorded = analytics.block_nodes(arr)
        for block, ref in refs.items():  # one ref per call (a batched call aborted the process once, Ray 2.60)
            node_ids = ray.experimental.get_object_locations([ref])[ref]["node_ids"]
            locations.append((block, node_ids))
            assert recorded[block] in [ip_of[n] for n in node_ids]  # insitu's record matches Ray's
        if step == steps - 1:
            final_stats.update(ray.get(head_of(run).stats.remote()))

    summary = analytics.run()
    result = finish_sim(proc)
    assert result.returncode == 0, result.stderr[-2000:]
    assert summary.steps == steps
    for step in range(steps):
        np.testing.assert_array_equal(seen[step], expected_field(step, shape))
        assert means[step] == pytest.approx(expected_field(step, shape).mean())
    # each rank's chunk lives on the raylet of its own node
    rank_node = {r: e["node"] for r, e in result.one("ready").items()}
    layout = {lay.name: lay for lay in analytics.info.layouts}["u"]
    owner = dict(layout.owners)
    assert len(set(rank_node.values())) == len(nodes)
    for block, node_ids in locations:
        assert rank_node[owner[block]] in node_ids
    # the head received exactly one message per node per step
    assert final_stats["messages"] == {n: steps for n in set(rank_node.values())}
    assert wait_gone(run), "the run's actors must be reclaimed once both sides are done"


def test_window_of_three(cluster: Any) -> None:
    run = run_name("window")
    shape = (8, 6)
    proc = start_sim(cluster, 4, {"run": run, "steps": 7, "shape": list(shape)})
    analytics = make_analytics(run)
    got: list[tuple[int, list[int], float]] = []

    @analytics.on_step("u", window=3)
    def trend(step: int, u: list) -> None:
        got.append((step, [a.step for a in u], float((u[2] - u[0]).mean().compute())))

    analytics.run()
    assert finish_sim(proc).returncode == 0
    assert [g[0] for g in got] == [2, 3, 4, 5, 6]
    for step, window, diff in got:
        assert window == [step - 2, step - 1, step]
        assert diff == pytest.approx(2000.0)


def test_steering_stops_every_rank_at_the_same_step(cluster: Any) -> None:
    run = run_name("steer")
    proc = start_sim(cluster, 4, {"run": run, "steps": 200})
    analytics = make_analytics(run)
    set_at: list[int] = []

    @analytics.on_step("u")
    def steer(step: int, u: list) -> None:
        if step == 3:
            analytics.set("stop", True)
            set_at.append(step)

    analytics.run()
    result = finish_sim(proc)
    assert result.returncode == 0
    stops = {r: e["stop_at"] for r, e in result.one("done").items()}
    assert len(stops) == 4 and len(set(stops.values())) == 1, stops
    t = next(iter(stops.values()))
    in_flight = 2
    assert set_at == [3]
    assert 3 < t <= 3 + in_flight + 1


@pytest.mark.parametrize(("ranks", "shape"), [(4, (7, 5)), (3, (7, 5, 3))])
def test_uneven_decomposition(cluster: Any, ranks: int, shape: tuple[int, ...]) -> None:
    run = run_name("uneven")
    proc = start_sim(cluster, ranks, {"run": run, "steps": 3, "shape": list(shape)})
    analytics = make_analytics(run)
    fields: dict[int, np.ndarray] = {}

    @analytics.on_step("u")
    def record(step: int, u: list) -> None:
        fields[step] = u[0].compute()

    analytics.run()
    assert finish_sim(proc).returncode == 0
    for step in range(3):
        np.testing.assert_array_equal(fields[step], expected_field(step, shape))
    layout = {lay.name: lay for lay in analytics.info.layouts}["u"]
    assert sum(layout.chunks[0]) == shape[0]
    assert len(set(layout.chunks[0])) > 1


def test_rank_without_block(cluster: Any) -> None:
    run = run_name("noblock")
    proc = start_sim(cluster, 4, {"run": run, "steps": 3, "empty_array": True})
    analytics = make_analytics(run)
    values: dict[int, list[int]] = {}

    @analytics.on_step("v")
    def record(step: int, v: list) -> None:
        values[step] = v[0].compute().tolist()

    analytics.run()
    assert finish_sim(proc).returncode == 0
    assert values == {s: [s] * 4 for s in range(3)}


def test_analytics_first_then_simulation(cluster: Any) -> None:
    run = run_name("anafirst")
    analytics = make_analytics(run)
    steps: list[int] = []
    analytics.on_step("u")(lambda step, u: steps.append(step))
    errors: list[BaseException] = []

    def go() -> None:
        try:
            analytics.run()
        except BaseException as exc:  # re-raised in the test thread below
            errors.append(exc)

    thread = threading.Thread(target=go)
    thread.start()
    time.sleep(1.0)  # the analytics is now waiting for the simulation
    result = run_sim(cluster, 2, {"run": run, "steps": 4})
    thread.join(60)
    assert not thread.is_alive() and not errors, errors
    assert result.returncode == 0
    assert steps == [0, 1, 2, 3]


def test_simulation_first_then_analytics(cluster: Any) -> None:
    run = run_name("simfirst")
    proc = start_sim(cluster, 2, {"run": run, "steps": 6})
    # the simulation fills its two in-flight steps, then waits for an analytics
    end = time.monotonic() + 60
    while time.monotonic() < end:
        try:
            import ray

            if ray.get(head_of(run).stats.remote())["assembled"] >= 2:
                break
        except ValueError:
            pass
        time.sleep(0.2)
    analytics = make_analytics(run)
    steps: list[int] = []
    analytics.on_step("u")(lambda step, u: steps.append(step))
    analytics.run()
    assert finish_sim(proc).returncode == 0
    assert steps == list(range(6))


def test_two_runs_at_once_and_in_a_row(cluster: Any) -> None:
    def one_pair(tags: list[str]) -> None:
        runs = [run_name(t) for t in tags]
        procs = [start_sim(cluster, 2, {"run": r, "steps": 4, "shape": [6, 4 + i]}) for i, r in enumerate(runs)]
        results: dict[str, list[tuple[int, tuple[int, ...]]]] = {r: [] for r in runs}
        threads = []
        for r in runs:
            a = make_analytics(r)
            a.on_step("u")(lambda step, u, r=r: results[r].append((step, u[0].shape)))
            threads.append(threading.Thread(target=a.run))
            threads[-1].start()
        for t in threads:
            t.join(90)
        for i, (r, p) in enumerate(zip(runs, procs, strict=True)):
            assert finish_sim(p).returncode == 0
            assert results[r] == [(s, (6, 4 + i)) for s in range(4)]

    one_pair(["twoA", "twoB"])  # at the same time
    one_pair(["rowC"])  # then another one
    one_pair(["rowD"])


@pytest.mark.parametrize("scheduler", ["insitu", "ray-dask"])
def test_schedulers_compute_next_to_the_chunks(cluster: Any, scheduler: str) -> None:
    from ray.util.state import list_actors

    run = run_name(f"sched{scheduler}")
    shape = (12, 10)
    proc = start_sim(cluster, 4, {"run": run, "steps": 3, "shape": list(shape)})
    analytics = make_analytics(run, scheduler=scheduler)
    got: dict[int, float] = {}
    executors: list[set[str]] = []

    @analytics.on_step("u", window=2)
    def diff(step: int, u: list) -> None:
        got[step] = float((u[1] - u[0]).sum().compute())
        wanted = [("class_name", "=", "NodeExecutor"), ("state", "=", "ALIVE")]
        alive = list_actors(address=cluster.address, filters=wanted, raise_on_missing_output=False)
        executors.append({a.node_id for a in alive})

    analytics.run()
    result = finish_sim(proc)
    assert result.returncode == 0
    assert got == {1: pytest.approx(1000.0 * 120), 2: pytest.approx(1000.0 * 120)}
    rank_nodes = {e["node"] for e in result.one("ready").values()}
    if scheduler == "insitu":
        # one compute actor on each node holding chunks, none elsewhere
        assert executors[-1] == rank_nodes
    else:
        assert executors[-1] == set()


def test_block_refs_are_read_elsewhere_and_on_close_runs_connected(cluster: Any) -> None:
    import ray

    import insitu
    from insitu.errors import CallbackError

    run = run_name("blocks")
    shape = (8, 6)
    proc = start_sim(cluster, 4, {"run": run, "steps": 3, "shape": list(shape)})
    analytics = make_analytics(run)
    seen: dict[int, bool] = {}
    closed: list[Any] = []

    @ray.remote(num_cpus=0)
    def read(b: insitu.BlockRef) -> Any:  # another process reads the block from the object store
        return ray.get(b.ref)[b.index]

    @analytics.on_step("u")
    def check(step: int, u: list) -> None:
        blocks = analytics.blocks(u[0])
        whole = expected_field(step, shape)
        assert blocks and all(b.node for b in blocks.values())
        parts = {k: ray.get(read.remote(b), timeout=60) for k, b in blocks.items()}
        rows = [np.concatenate([parts[(i, j)] for j in range(u[0].numblocks[1])], axis=1)
                for i in range(u[0].numblocks[0])]  # fmt: skip
        seen[step] = bool(np.array_equal(np.concatenate(rows, axis=0), whole))

    @analytics.on_close
    def done(summary: Any) -> None:
        closed.append((summary.steps, ray.is_initialized()))
        raise RuntimeError("late failure")

    with pytest.raises(CallbackError, match="on_close callback done failed after step 2"):
        analytics.run()
    assert finish_sim(proc).returncode == 0
    assert seen == {0: True, 1: True, 2: True}
    assert closed == [(3, True)]
