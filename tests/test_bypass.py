"""Bypass rules (insitu.bypass): table-driven on the decisions, then through Ray on a real cluster."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from insitu.bypass import Bypass
from insitu.errors import BypassError

YAML = """
bypass:
  train_surrogate: {bypass: true, data: results/train.json, tags: ["U:1[0-9]{2}", "V:.*"]}
  heavy_stat: true
  off: false
  fields: {data: results/fields.npz}
"""


@pytest.fixture
def bypass(tmp_path: Path) -> Bypass:
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "train.json").write_text(json.dumps({"U:150": {"loss": 0.5}, "V:3": [1, 2]}))
    np.savez(tmp_path / "results" / "fields.npz", **{"U:7": np.arange(4.0)})
    (tmp_path / "bypass.yaml").write_text(YAML)
    return Bypass(tmp_path / "bypass.yaml")


@pytest.mark.parametrize(("name", "tag", "bypassed"), [
    ("train_surrogate", "U:150", True),       # listed, tag matches the first pattern
    ("train_surrogate", "V:anything", True),  # ... the second
    ("train_surrogate", "U:15", False),       # listed, no pattern matches (fullmatch, not search)
    ("train_surrogate", ["W:1", "V:2"], True),  # a multi-array callback: any of its tags
    ("heavy_stat", "whatever", True),         # shorthand true: every call
    ("off", "x", False),                      # listed false
    ("never_listed", "x", False),             # not listed: never bypassed
    ("fields", "U:7", True),                  # no tags: every call
])  # fmt: skip
def test_listed_unlisted_shorthand_and_tags(bypass: Bypass, name: str, tag: Any, bypassed: bool) -> None:
    assert (bypass.decide(name, tag) is not None) == bypassed


def test_no_yaml_bypasses_nothing() -> None:
    assert Bypass(None).decide("heavy_stat", "x") is None


def test_a_condition_vetoes_last_on_the_caller(bypass: Bypass) -> None:
    seen: list[tuple[str, tuple[Any, ...]]] = []

    def cond(tag: str, *args: Any) -> bool:
        seen.append((tag, args))
        return args[0] > 10

    bypass.set_cond("heavy_stat", cond)
    assert bypass.decide("heavy_stat", "t", 5) is None
    assert bypass.decide("heavy_stat", "t", 50) is not None
    assert seen == [("t", (5,)), ("t", (50,))]
    assert bypass.decide("off", "t", 50) is None and len(seen) == 2  # not bypassed: the condition is not asked


@pytest.mark.parametrize(("doc", "message"), [
    ("bypass: [a, b]", r"bypass: expected a mapping"),
    ("bypass: {f: 3}", r"bypass\.f: expected true, false or a mapping"),
    ("bypass: {f: {bypas: true}}", r"bypass\.f\.bypas: unknown key"),
    ("bypass: {f: {tags: U:1}}", r"bypass\.f\.tags: expected list"),
    ("bypass: {f: {tags: ['(']}}", r"bypass\.f\.tags\[0\]: '\(' is not a regular expression"),
    ("bypass: {f: {data: 3}}", r"bypass\.f\.data: expected str"),
    ("other: {}", r"the single key 'bypass'"),
])  # fmt: skip
def test_schema_errors_name_the_key(tmp_path: Path, doc: str, message: str) -> None:
    (tmp_path / "b.yaml").write_text(doc)
    with pytest.raises(BypassError, match=message):
        Bypass(tmp_path / "b.yaml")


def test_an_unpicklable_provider_is_named(bypass: Bypass) -> None:
    lock = threading.Lock()
    with pytest.raises(BypassError, match="the provider of 'heavy_stat' cannot be pickled"):
        bypass.set_provider("heavy_stat", lambda tag, data: lock)  # a closure over a lock
    assert "heavy_stat" not in bypass.providers


@pytest.fixture
def make() -> Any:
    """Make bypasses from mappings; their file servers end at teardown (exported stubs keep them alive)."""
    made: list[Bypass] = []

    def new(doc: dict[str, Any], base: str = ".") -> Bypass:
        made.append(Bypass.from_mapping(doc, base=base))
        return made[-1]

    yield new
    for b in made:
        b.close()


def heavy(x: Any) -> str:
    """The real function: what a bypass must avoid running."""
    return f"real {x}"


def nested(x: Any) -> Any:
    """Not bypassed itself; dispatches ``heavy`` from the worker (the bypass travels with the call)."""
    from insitu.dispatch import Dispatcher

    return Dispatcher("t-nested").task(heavy, x, bypass_tag="V:9").get(timeout=60)


def where(tag: str, data: Any, x: Any) -> dict[str, Any]:
    import ray

    ctx = ray.get_runtime_context()
    return {"tag": tag, "x": x, "node": ctx.get_node_id(), "pg": ctx.get_placement_group_id()}


@pytest.fixture
def served(tmp_path: Path) -> Path:
    """A YAML whose data files live beside it; one of them a symlink to a file outside its directory."""
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "train.json").write_text(json.dumps({"U:150": {"loss": 0.5}}))
    np.savez(tmp_path / "results" / "fields.npz", **{"U:7": np.arange(4.0)})
    np.save(tmp_path / "results" / "one.npy", np.ones(3))
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"x": "secret"}))
    (tmp_path / "results" / "evil.json").symlink_to(outside)
    return tmp_path


def _dispatch(b: Bypass, tag: str, options: dict[str, Any] | None = None, fn: Any = heavy) -> Any:
    from insitu.dispatch import Dispatcher

    return Dispatcher("t-bypass", bypass=b).task(fn, 3, options=options, bypass_tag=tag).get(timeout=60)


@pytest.mark.cluster
@pytest.mark.parametrize(("rule", "tag", "expected"), [
    ({"data": "results/train.json"}, "U:150", {"loss": 0.5}),          # JSON keyed by tag
    ({"data": "results/fields.npz"}, "U:7", [0.0, 1.0, 2.0, 3.0]),     # .npz keyed by tag
    ({"data": "results/one.npy"}, "any", [1.0, 1.0, 1.0]),             # .npy whatever the tag
    ({"tags": ["U:1"]}, "U:2", "real 3"),                               # tag does not match: runs for real
])  # fmt: skip
def test_data_files_are_served_from_the_node_that_loaded_the_yaml(cluster: Any, make: Any, served: Path,
                                                                  rule: dict[str, Any], tag: str,
                                                                  expected: Any) -> None:  # fmt: skip
    b = make({"bypass": {"heavy": rule}}, base=str(served))
    got = _dispatch(b, tag)
    assert (got.tolist() if isinstance(got, np.ndarray) else got) == expected


@pytest.mark.cluster
def test_provider_first_then_data_then_an_error_naming_both_ways(cluster: Any, make: Any, served: Path) -> None:
    b = make({"bypass": {"heavy": {"data": "results/train.json"}, "nested": False,
                                        "where": True}}, base=str(served))  # fmt: skip
    b.set_provider("heavy", lambda tag, data, x: ("provided", tag, Path(data).name, x))
    assert _dispatch(b, "U:150") == ("provided", "U:150", "train.json", 3)
    bare = make({"bypass": {"heavy": True}})
    with pytest.raises(BypassError, match=r"heavy is bypassed \(tag 'U:1'\) but has no result: register one "
                                          r"with bypass.set_provider\('heavy', fn\) or give it `data:` in the YAML"):
        _dispatch(bare, "U:1")
    evil = make({"bypass": {"heavy": {"data": "results/evil.json"}}}, base=str(served))
    with pytest.raises(BypassError, match=r"evil.json is outside the directories the bypass YAML names"):
        _dispatch(evil, "x")


@pytest.mark.cluster
def test_a_condition_veto_runs_the_real_function_and_nested_calls_see_the_bypass(cluster: Any, make: Any) -> None:
    b = make({"bypass": {"heavy": True}})
    b.set_provider("heavy", lambda tag, data, x: f"bypassed {tag}")
    b.set_cond("heavy", lambda tag, x: tag != "U:veto")
    assert _dispatch(b, "U:1") == "bypassed U:1"
    assert _dispatch(b, "U:veto") == "real 3"
    assert _dispatch(b, "", fn=nested) == "bypassed V:9"  # nested is real; the heavy it dispatches is not


@pytest.mark.cluster
def test_a_bypassed_call_lands_on_the_same_node_and_placement_group_as_the_real_one(cluster: Any, make: Any) -> None:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

    b = make({"bypass": {"where": True}})
    b.set_provider("where", where)
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] in cluster.node_ips]
    for node in nodes:
        got = _dispatch(b, "t", {"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(node, False)},
                        fn=where)  # fmt: skip
        assert (got["node"], got["tag"], got["x"]) == (node, "t", 3)
    pg = placement_group([{"CPU": 0.01}], strategy="STRICT_PACK")
    ray.get(pg.ready(), timeout=60)
    try:
        got = _dispatch(b, "t", {"num_cpus": 0.01, "scheduling_strategy": PlacementGroupSchedulingStrategy(pg)},
                        fn=where)  # fmt: skip
        assert got["pg"] == pg.id.hex()
    finally:
        remove_placement_group(pg)


@pytest.mark.cluster
def test_heat_stats_with_a_bypassed_callback_skips_exactly_the_matching_steps(cluster: Any, tmp_path: Path) -> None:
    import os
    import sys

    from tests.conftest import HEAT2D_PY, HEAT_STATS, mpi_command, run_coupled, run_name

    (tmp_path / "recorded.json").write_text(json.dumps({f"temperature:{s}": None for s in range(5, 10)}))
    (tmp_path / "bypass.yaml").write_text(
        "bypass:\n  derivative: {data: recorded.json, tags: ['temperature:[5-9]']}\n  summary: false\n"
    )
    run = run_name("bypass")
    env = {**os.environ, **cluster.environment(), "INSITU_RUN": run, "INSITU_DEADLINE": "60"}
    heat2d = [sys.executable, str(HEAT2D_PY), "--nx", "24", "--ny", "20", "--steps", "12"]
    ana = [sys.executable, str(HEAT_STATS), "--out", str(tmp_path / "out"), "--print-every", "100",
           "--bypass", str(tmp_path / "bypass.yaml")]  # fmt: skip
    run_coupled(mpi_command(4, cluster.node_ips, heat2d), ana, env)
    stats = {int(k): v for k, v in json.loads((tmp_path / "out" / "stats.json").read_text())["stats"].items()}
    assert sorted(stats) == list(range(12))  # summary is listed false: it ran at every step
    with_rate = sorted(s for s, v in stats.items() if "dmean_dt" in v)
    assert with_rate == [1, 2, 3, 4, 10, 11]  # derivative ran for real except at steps 5-9 (window 2: not at 0)


def placed(env: Any, x: Any) -> tuple[str, str]:
    """Real pool function: where a slice host runs."""
    import ray

    ctx = ray.get_runtime_context()
    return ctx.get_node_id(), ctx.get_placement_group_id()


def placed_provider(tag: str, data: Any, env: Any, x: Any) -> tuple[str, str, str]:
    return ("bypassed", *placed(env, x))


@pytest.mark.cluster
def test_a_bypassed_pool_call_runs_on_the_same_slices_as_the_real_one(cluster: Any, make: Any) -> None:
    import threading

    from insitu.config import Config
    from insitu.pool import Grouping, SlicePool
    from tests.test_pool import _node_slices

    b = make({"bypass": {"placed": {"tags": ["fast"]}}})
    b.set_provider("placed", placed_provider)
    pool = SlicePool(_node_slices(), sizes=[2], name=f"byp{threading.get_ident() % 10000}", bypass=b,
                     config=Config(pool_ready_deadline=30))  # fmt: skip
    try:
        assert pool.scale() == 2
        real = pool.run(placed, 3, grouping=Grouping.FLAT, timeout=60, bypass_tag="slow")
        bypassed = pool.run(placed, 3, grouping=Grouping.FLAT, timeout=60, bypass_tag="fast")
        assert {r[0] for r in bypassed} == {"bypassed"}
        assert sorted(r[1:] for r in bypassed) == sorted(real) and len({pg for _, pg in real}) == 2
    finally:
        pool.drain(graceful=False)
