"""Bypass: replace chosen calls by recorded results while still exercising the cluster path.

A bypassed call is submitted through Ray exactly like the real one (same resources, placement
group, node affinity, dispatcher route) but runs a trivial function that returns the recorded
result. What is bypassed comes from a YAML file read with ``yaml.safe_load``::

    bypass:
      train_surrogate: {bypass: true, data: results/train.json, tags: ["U:1[0-9]{2}", "V:.*"]}
      heavy_stat: true        # shorthand: bypassed, no data
      # not listed = never bypassed

Scope: functions called through :class:`~insitu.Dispatcher` and :class:`~insitu.SlicePool`
(matched by qualified name, ``fn.__qualname__``) and analytics callbacks (matched by name).

Resolution of a bypassed call's result, on the worker: the provider registered with
:meth:`Bypass.set_provider` (called as ``fn(tag, data_path, *args, **kwargs)``), else the
``data`` file (JSON keyed by tag, ``.npz`` keyed by tag, or ``.npy``), served by a file-server
actor pinned to the node that loaded the YAML (no shared file system needed) and confined to
the directories the YAML names, else :class:`~insitu.errors.BypassError` naming both ways to fix it.

Tags: ``re.fullmatch`` against the call's tag (callbacks: ``"<array>:<step>"``; a callback over
several arrays matches if any of its arrays' tags does); no ``tags`` = every call. A condition
(:meth:`Bypass.set_cond`, called on the caller as ``fn(tag, *args, **kwargs)``) is evaluated last
and vetoes the bypass when it returns false.

Examples
--------
>>> b = Bypass.from_mapping({"bypass": {"heavy": True, "train": {"tags": ["U:1[0-9]"]}}})
>>> b.decide("heavy", "anything") is not None, b.decide("train", "U:12") is not None, b.decide("train", "U:2")
(True, True, None)
>>> b.decide("other", "x") is None
True
"""

from __future__ import annotations

import contextvars
import io
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from insitu.errors import BypassError

__all__ = ["Bypass", "BypassRule", "active", "for_call"]

_ACTIVE: contextvars.ContextVar[Bypass | None] = contextvars.ContextVar("insitu_bypass", default=None)
_RULE_KEYS = {"bypass": bool, "data": str, "tags": list}


def active() -> Bypass | None:
    """The bypass in force for calls made from here (a worker running a call made under one)."""
    return _ACTIVE.get()


@dataclass(frozen=True)
class BypassRule:
    """One entry of the YAML: whether ``name`` is bypassed, its data file and tag patterns."""

    name: str
    bypass: bool = True
    data: str | None = None
    tags: tuple[str, ...] | None = None

    def matches(self, tag: str | Sequence[str]) -> bool:
        """Whether the call's tag (or any of a multi-array callback's tags) matches."""
        if self.tags is None:
            return True
        tags = [tag] if isinstance(tag, str) else list(tag)
        return any(re.fullmatch(p, t) for p in self.tags for t in tags)


@dataclass(frozen=True)
class Decision:
    """A call that is bypassed: how its result is made."""

    name: str
    tag: str
    data: str | None


def _parse_rule(name: str, value: Any) -> BypassRule:
    where = f"bypass.{name}"
    if isinstance(value, bool):
        return BypassRule(name, value)
    if not isinstance(value, Mapping):
        raise BypassError(f"{where}: expected true, false or a mapping with bypass/data/tags; got {value!r}")
    for key, v in value.items():
        if key not in _RULE_KEYS:
            raise BypassError(f"{where}.{key}: unknown key; expected one of {', '.join(_RULE_KEYS)}")
        if not isinstance(v, _RULE_KEYS[key]):
            raise BypassError(f"{where}.{key}: expected {_RULE_KEYS[key].__name__}; got {v!r}")
    tags = value.get("tags")
    if tags is not None:
        for i, t in enumerate(tags):
            if not isinstance(t, str):
                raise BypassError(f"{where}.tags[{i}]: expected a regular expression string; got {t!r}")
            try:
                re.compile(t)
            except re.error as exc:
                raise BypassError(f"{where}.tags[{i}]: {t!r} is not a regular expression ({exc})") from None
    return BypassRule(name, value.get("bypass", True), value.get("data"), tuple(tags) if tags is not None else None)


@dataclass
class Bypass:
    """What to bypass (from YAML), the providers and conditions registered in code.

    Parameters
    ----------
    yaml_path
        The YAML file; ``None`` bypasses nothing.

    Raises
    ------
    BypassError
        The file does not follow the schema (the message names the key and what was expected).
    """

    yaml_path: str | os.PathLike[str] | None = None
    rules: dict[str, BypassRule] = field(default_factory=dict)
    base: str = "."
    providers: dict[str, Callable[..., Any]] = field(default_factory=dict)
    conds: dict[str, Callable[..., bool]] = field(default_factory=dict)
    _server: Any = field(default=None, repr=False)
    _made: dict[Any, Any] = field(default_factory=dict, repr=False)  # stubs and wrappers, made once

    def __post_init__(self) -> None:
        if self.yaml_path is None or self.rules:
            return
        import yaml

        path = Path(self.yaml_path)
        doc = yaml.safe_load(path.read_text()) or {}
        parsed = Bypass.from_mapping(doc, base=str(path.resolve().parent))
        self.rules, self.base = parsed.rules, parsed.base

    @classmethod
    def from_mapping(cls, doc: Any, base: str = ".") -> Bypass:
        """A bypass from an already-parsed YAML document (paths relative to ``base``)."""
        if not isinstance(doc, Mapping) or set(doc) - {"bypass"}:
            raise BypassError(f"the top level must be a mapping with the single key 'bypass'; got {doc!r}")
        entries = doc.get("bypass") or {}
        if not isinstance(entries, Mapping):
            raise BypassError(f"bypass: expected a mapping of names to rules; got {entries!r}")
        rules = {str(n): _parse_rule(str(n), v) for n, v in entries.items()}
        return cls(None, rules, base)

    # -- registration ---------------------------------------------------------------------
    def set_provider(self, name: str, fn: Callable[..., Any]) -> None:
        """Compute ``name``'s bypassed results with ``fn(tag, data_path, *args, **kwargs)`` on the worker.

        Raises
        ------
        BypassError
            ``fn`` cannot be pickled (it must travel to the worker).
        """
        import cloudpickle

        try:
            cloudpickle.dumps(fn)
        except Exception as exc:  # cloudpickle raises many types: report which provider
            raise BypassError(f"the provider of {name!r} cannot be pickled to reach the workers: {exc}") from exc
        self.providers[name] = fn

    def set_cond(self, name: str, fn: Callable[..., bool]) -> None:
        """Veto ``name``'s bypass when ``fn(tag, *args, **kwargs)`` (called on the caller) is false."""
        self.conds[name] = fn

    # -- decisions ------------------------------------------------------------------------
    def decide(self, name: str, tag: str | Sequence[str], *args: Any, **kwargs: Any) -> Decision | None:
        """The bypass of a call to ``name`` with ``tag``, or None when it runs for real."""
        rule = self.rules.get(name)
        if rule is None or not rule.bypass or not rule.matches(tag):
            return None
        first = tag if isinstance(tag, str) else next(iter(tag), "")
        cond = self.conds.get(name)
        if cond is not None and not cond(first, *args, **kwargs):
            return None
        return Decision(name, first, self._data_path(rule))

    def _data_path(self, rule: BypassRule) -> str | None:
        if rule.data is None:
            return None
        return str(Path(self.base, rule.data))

    def roots(self) -> tuple[str, ...]:
        """The directories the YAML names (those of its data files): the only ones served."""
        return tuple(sorted({str(Path(self.base, r.data).parent.resolve()) for r in self.rules.values() if r.data}))

    def stub(self, decision: Decision) -> Callable[..., Any]:
        """The trivial function a bypassed call runs instead (picklable; resolves on the worker)."""
        key = ("stub", decision)
        if key not in self._made:
            self._made[key] = _Stub(decision, self.providers.get(decision.name),
                                    self.server() if decision.data else None)  # fmt: skip
        return self._made[key]

    def call(self, fn: Callable[..., Any], tag: str | Sequence[str], args: Sequence[Any],
             kwargs: Mapping[str, Any]) -> Callable[..., Any]:  # fmt: skip
        """What to submit for ``fn(*args, **kwargs)``: its stub when bypassed, else ``fn`` run with this
        bypass in force (so the calls it makes on the worker see it). Matched by ``fn.__qualname__``."""
        name = getattr(fn, "__qualname__", type(fn).__qualname__)
        decision = self.decide(name, tag, *args, **kwargs)
        if decision is not None:
            return self.stub(decision)
        key = ("real", id(fn))
        made = self._made.get(key)
        if made is None or made.fn is not fn:
            made = self._made[key] = WithBypass(fn, self)
        return made

    def server(self) -> Any:
        """The file-server actor, pinned to this node (made on first use)."""
        if self._server is None:
            import ray
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            node = ray.get_runtime_context().get_node_id()
            self._server = _file_server().options(
                num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
            ).remote(self.roots())
        return self._server

    def close(self) -> None:
        """End the file-server actor (made again if the bypass is used after this).

        Exported stubs hold its handle, which keeps it alive: call this (or use the bypass as a
        context manager) once the calls are done; :meth:`insitu.Analytics.run` does it at its end.
        """
        if self._server is not None:
            import ray

            ray.kill(self._server)
            self._server = None
        self._made.clear()

    def __enter__(self) -> Bypass:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Make this the bypass of the calls made from here (what :func:`active` returns)."""
        token = _ACTIVE.set(self)
        try:
            yield
        finally:
            _ACTIVE.reset(token)


@dataclass(frozen=True)
class _Stub:
    """Runs on the worker in place of the real function: the provider, else the data file."""

    decision: Decision
    provider: Callable[..., Any] | None
    server: Any

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        d = self.decision
        if self.provider is not None:
            return self.provider(d.tag, d.data, *args, **kwargs)
        if d.data is None:
            raise BypassError(f"{d.name} is bypassed (tag {d.tag!r}) but has no result: register one with "
                              f"bypass.set_provider({d.name!r}, fn) or give it `data:` in the YAML")  # fmt: skip
        import ray

        return _decode(d.data, d.tag, ray.get(self.server.read.remote(d.data)))


@dataclass(frozen=True)
class WithBypass:
    """The real function, run on the worker with the bypass in force for the calls it makes."""

    fn: Callable[..., Any]
    bypass: Bypass

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.bypass.installed():
            return self.fn(*args, **kwargs)


def for_call(explicit: Bypass | None, fn: Callable[..., Any], tag: str | Sequence[str], args: Sequence[Any],
             kwargs: Mapping[str, Any]) -> Callable[..., Any]:  # fmt: skip
    """:meth:`Bypass.call` of ``explicit``, else of the bypass in force here (:func:`active`), else ``fn``."""
    bypass = explicit if explicit is not None else active()
    return fn if bypass is None else bypass.call(fn, tag, args, kwargs)


def _decode(path: str, tag: str, blob: bytes) -> Any:
    import numpy as np

    if path.endswith(".json"):
        table = json.loads(blob)
        if tag not in table:
            raise BypassError(f"{path} has no result for tag {tag!r} (it has {len(table)} tags)")
        return table[tag]
    if path.endswith(".npz"):
        with np.load(io.BytesIO(blob)) as z:
            if tag not in z:
                raise BypassError(f"{path} has no array for tag {tag!r} (it has {', '.join(z.files)})")
            return z[tag]
    if path.endswith(".npy"):
        return np.load(io.BytesIO(blob))
    raise BypassError(f"{path}: bypass data files are .json (keyed by tag), .npz (keyed by tag) or .npy")


def _file_server() -> Any:
    import ray

    @ray.remote
    class FileServer:
        """Serves the bypass's data files from the node that loaded the YAML, inside its directories."""

        def __init__(self, roots: tuple[str, ...]) -> None:
            self._roots = tuple(Path(r) for r in roots)

        def read(self, path: str) -> bytes:
            real = Path(path).resolve()
            if not any(real.is_relative_to(r) for r in self._roots):
                raise BypassError(f"{path} is outside the directories the bypass YAML names "
                                  f"({', '.join(map(str, self._roots)) or 'none'}); refused")  # fmt: skip
            return real.read_bytes()

    return FileServer
