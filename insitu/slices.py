"""What a slice pool is made of: slice shapes, what a host learns, slice discovery and preemption probes.

Pure data and functions (Ray only inside :func:`request_slices`); :mod:`insitu.pool` reserves
and runs the slices.

Examples
--------
>>> spec = SliceSpec(hosts=2, cpus_per_host=1)
>>> spec.bundle("insitu_slice_a")
{'insitu_slice_a': 1.0, 'CPU': 1.0}
>>> slice_names([{"Alive": True, "Resources": {"insitu_slice_a": 1.0}},
...              {"Alive": True, "Resources": {"insitu_slice_a": 1.0}},
...              {"Alive": True, "Resources": {"insitu_slice_b": 1.0}}], spec)
['insitu_slice_a']
"""

from __future__ import annotations

import enum
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from insitu.errors import ConfigError

__all__ = [
    "DeviceKind",
    "Grouping",
    "HostEnv",
    "Probe",
    "SliceInfo",
    "SliceSpec",
    "file_probe",
    "metadata_probe",
    "request_slices",
    "slice_names",
]

Probe = Callable[[], bool]
"""A preemption probe: runs on a host, returns True when the host is about to go away."""


class DeviceKind(enum.StrEnum):
    """What a host computes on."""

    GPU = "GPU"
    TPU = "TPU"
    CPU = "CPU"


class Grouping(enum.StrEnum):
    """How :meth:`SlicePool.run` returns per-host results."""

    SLICE = "slice"
    """``{slice_id: [host 0 result, host 1 result, ...]}``."""
    FLAT = "flat"
    """One list, slices in pool order, hosts in index order."""


@dataclass(frozen=True)
class SliceSpec:
    """The shape of every slice of a pool.

    Parameters
    ----------
    hosts
        Hosts per slice (bundles per placement group).
    prefix
        Custom-resource prefix naming slices: a node carrying ``<prefix>a`` is a host of slice ``a``.
    cpus_per_host, gpus_per_host, tpus_per_host
        Reserved in every bundle and given to the host actor.
    """

    hosts: int
    prefix: str = "insitu_slice_"
    cpus_per_host: float = 1.0
    gpus_per_host: float = 0.0
    tpus_per_host: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.hosts, int) or self.hosts < 1:
            raise ConfigError(f"a slice needs hosts >= 1; got {self.hosts!r}")
        if not self.prefix:
            raise ConfigError("the slice resource prefix must not be empty (e.g. 'insitu_slice_')")
        for name in ("cpus_per_host", "gpus_per_host", "tpus_per_host"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0; got {getattr(self, name)!r}")

    def bundle(self, resource: str) -> dict[str, float]:
        """One host's bundle: the slice's resource plus the per-host devices."""
        out = {resource: 1.0}
        for key, amount in (("CPU", self.cpus_per_host), ("GPU", self.gpus_per_host), ("TPU", self.tpus_per_host)):
            if amount:
                out[key] = float(amount)
        return out


@dataclass(frozen=True)
class HostEnv:
    """What a function run on a pool host learns about where it runs.

    ``state`` is a per-host dictionary that lives as long as the host actor: keep a model, a
    process group or a cache there between calls.
    """

    slice_id: str
    slice_name: str
    host_index: int
    hosts: int
    node_id: str
    node_ip: str
    device_kind: DeviceKind
    devices: tuple[str, ...]
    state: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def device_count(self) -> int:
        """Accelerators assigned to this host (0 on a CPU host)."""
        return len(self.devices)


@dataclass(frozen=True)
class SliceInfo:
    """One reserved slice: its id (new for every reservation), resource name and hosts."""

    slice_id: str
    name: str
    node_ids: tuple[str, ...]
    node_ips: tuple[str, ...]


def slice_names(nodes: Iterable[Mapping[str, Any]], spec: SliceSpec) -> list[str]:
    """Slice resources carried by at least ``spec.hosts`` alive nodes (from ``ray.nodes()``)."""
    count: dict[str, int] = {}
    for n in nodes:
        if not n.get("Alive"):
            continue
        for key, amount in n.get("Resources", {}).items():
            if key.startswith(spec.prefix) and amount >= 1:
                count[key] = count.get(key, 0) + 1
    return sorted(k for k, c in count.items() if c >= spec.hosts)


def request_slices(spec: SliceSpec, count: int, resources: Sequence[str] = ()) -> list[dict[str, float]]:
    """Ask an autoscaler for ``count`` slices (``ray.autoscaler.sdk.request_resources``); returns the bundles.

    ``resources`` names the slices wanted; without names the bundles ask for the devices only
    (the autoscaler's node types then decide the slice resource).
    """
    from ray.autoscaler.sdk import request_resources

    names = list(resources) or [""] * count
    bundles = []
    for name in names[:count]:
        b = spec.bundle(name) if name else {k: v for k, v in spec.bundle("x").items() if k != "x"}
        bundles += [b] * spec.hosts
    request_resources(bundles=bundles)
    return bundles


def metadata_probe(url: str, headers: Mapping[str, str] | None = None, expect: str = "TRUE",
                   timeout: float = 2.0) -> Probe:  # fmt: skip
    """A probe reading a cloud metadata endpoint (e.g. GCE's ``.../instance/preempted``).

    Preempted when the body, stripped, equals ``expect``; an unreachable endpoint counts as not
    preempted (the health check's own deadline catches a dead host).
    """

    def probe() -> bool:
        req = urllib.request.Request(url, headers=dict(headers or {}))
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - the site configures the URL
                return resp.read().decode(errors="replace").strip() == expect
        except OSError:
            return False

    return probe


def file_probe(path: str | Path) -> Probe:
    """A probe for a SLURM preemption signal: the batch script's trap creates ``path``.

    For example ``#SBATCH --signal=B:USR2@120`` and ``trap 'touch "$INSITU_PREEMPT_FLAG"' USR2``
    on a shared file system.
    """
    flag = Path(path)
    return flag.exists
