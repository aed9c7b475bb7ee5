"""One configuration object for both sides of a run.

Every setting has a default, an ``INSITU_<NAME>`` environment variable and a
validator. The environment is read when :meth:`Config.from_env` is called,
never at import.

Examples
--------
>>> from insitu.config import Config
>>> cfg = Config.from_env({"INSITU_IN_FLIGHT": "3"})
>>> cfg.in_flight
3
>>> cfg.replace(deadline=5.0).deadline
5.0
"""

from __future__ import annotations

import dataclasses
import enum
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from insitu.errors import ConfigError, RunNameError

__all__ = ["Backpressure", "Config", "FailurePolicy", "Scheduler", "When", "resolve_run"]


class Backpressure(enum.StrEnum):
    """What ``Bridge.send`` does when ``in_flight`` steps are already unprocessed."""

    BLOCK = "block"
    """Wait (up to ``deadline``) until the analytics frees a slot; then raise ``BackpressureTimeout``."""
    SKIP = "skip"
    """Drop the step on every rank and count it."""


class When(enum.StrEnum):
    """When a callback over several arrays runs (``Analytics.on_step(..., when=)``)."""

    ALL = "all"
    """At a step every one of its arrays has (the simulation's call completing the set)."""
    ANY = "any"
    """At the first call of a step carrying any of its arrays; the others get an empty list."""


class FailurePolicy(enum.StrEnum):
    """What the simulation does once the analytics failed."""

    CONTINUE = "continue"
    """Drop further steps, set ``Bridge.analytics_ok`` to false, warn once."""
    RAISE = "raise"
    """The next ``send`` raises ``AnalyticsFailedError`` on every rank."""


class Scheduler(enum.StrEnum):
    """How ``.compute()`` runs inside an analytics callback."""

    INSITU = "insitu"
    """Chunk-local work as one Ray task per node holding the chunks; the rest in the driver."""
    RAY_DASK = "ray-dask"
    """Ray's ``ray_dask_get``: one Ray task per Dask task."""


def _default_shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else "/tmp"


@dataclass(frozen=True, slots=True)
class Config:
    """Settings shared by the simulation side and the analytics side.

    Parameters
    ----------
    address
        Ray cluster address ``host:port`` (``INSITU_ADDRESS``). Never guessed.
    auth_token_path
        File holding the Ray auth token (``INSITU_AUTH_TOKEN_PATH``); when set,
        ``RAY_AUTH_MODE=token`` is used for every connection insitu makes.
    node
        The Ray node this rank's chunks live on: a raylet IP or a Ray node id
        (``INSITU_NODE``). Launchers set it per node; it may be left unset only on
        a one-node cluster.
    run
        Run name shared by simulation and analytics (``INSITU_RUN``, else
        ``SLURM_JOB_ID``).
    in_flight
        Steps sent but not yet processed by the analytics before back-pressure acts.
    backpressure
        ``block`` or ``skip``.
    on_analytics_failure
        ``continue`` or ``raise``.
    deadline
        Seconds any single wait may last (connect, back-pressure, close, next step).
    startup_deadline
        Seconds the set-up may take (registering the run, starting the node actors, which
        are new worker processes: seconds each on a loaded node); at least ``deadline``.
    reclaim_deadline
        Seconds a run's actors wait for a missing side before reclaiming everything.
    node_restarts
        Times the insitu process of one node is restarted on its node after it died
        (``INSITU_NODE_RESTARTS``, 0: never; the run then ends for the consumers with
        ``NodeLostError``). Its ranks reconnect at their next ``send``; the steps of the gap
        are dropped and reported (docs/architecture.md, "Recovery of a node process").
    namespace
        Ray namespace of the run's named actors.
    shm_dir
        Directory of the shared-memory staging files ranks write into.
    slots
        Staging buffers per rank (2 = double buffering).
    fanin
        Units per step relay (``INSITU_FANIN``): a run on more nodes than this reports
        through a tree of relays of ``fanin`` nodes (or relays) each (docs/architecture.md).
    head_fanin
        At most this many units (top relays) report to the head once a tree is built
        (``INSITU_HEAD_FANIN``), so the head's calls per step do not grow with the nodes.
    compute_cpus
        CPUs reserved by each node-local compute actor of the insitu scheduler (0: none
        reserved, the actor shares the node's cores).
    scheduler
        ``insitu`` or ``ray-dask``.
    pool_ready_deadline
        Seconds a slice pool waits for a slice's placement group to become ready (else that
        size counts as infeasible) and for its host actors to start.
    pool_health_interval
        Seconds between two health checks of a pool's slices (by :meth:`SlicePool.start_monitor`).
    pool_health_deadline
        Seconds every host of a slice has to answer a health check.
    pool_cancel_deadline
        Seconds cancelled work may take to stop before its slice is replaced.
    pool_drain_deadline
        Seconds a graceful drain waits for running work before cancelling it.
    heartbeat_file
        Set by ``insitu analytics --supervise`` for its child (``INSITU_HEARTBEAT_FILE``): the
        analytics touches it at every poll and before every callback.
    restarts_left
        Set by the supervisor (``INSITU_RESTARTS_LEFT``): restarts left after this analytics
        (-1: not supervised). While a supervised analytics with restarts left is down, the
        ranks drop steps under either failure policy; ``raise`` applies once none are left.
    restart_grace
        Set by the supervisor (``INSITU_RESTART_GRACE``): seconds the head waits for the restarted
        analytics before treating the failure as final.
    previous_stderr
        Set by the supervisor (``INSITU_PREVIOUS_STDERR``): a file holding the last stderr lines of
        the incarnation before this one, handed to the head at attach (``insitu status``).
    monitor_health_interval
        ``insitu monitor``: seconds between two health checks of a module
        (``INSITU_MONITOR_HEALTH_INTERVAL``).
    monitor_heartbeat_deadline
        ``insitu monitor``: seconds a module's event loop has to answer a health check before
        it counts as hung (``INSITU_MONITOR_HEARTBEAT_DEADLINE``).
    monitor_max_restarts
        ``insitu monitor``: restarts of a module before its routes answer 503 for good
        (``INSITU_MONITOR_MAX_RESTARTS``).
    """

    address: str | None = None
    auth_token_path: str | None = None
    node: str | None = None
    run: str | None = None
    in_flight: int = 2
    backpressure: Backpressure = Backpressure.BLOCK
    on_analytics_failure: FailurePolicy = FailurePolicy.CONTINUE
    deadline: float = 120.0
    startup_deadline: float = 120.0
    reclaim_deadline: float = 120.0
    node_restarts: int = 3
    namespace: str = "insitu"
    shm_dir: str = dataclasses.field(default_factory=_default_shm_dir)
    slots: int = 2
    fanin: int = 32
    head_fanin: int = 4
    compute_cpus: float = 0.0
    scheduler: Scheduler = Scheduler.INSITU
    pool_ready_deadline: float = 120.0
    pool_health_interval: float = 30.0
    pool_health_deadline: float = 30.0
    pool_cancel_deadline: float = 30.0
    pool_drain_deadline: float = 60.0
    heartbeat_file: str = ""
    restarts_left: int = -1
    restart_grace: float = 120.0
    previous_stderr: str = ""
    monitor_health_interval: float = 1.0
    monitor_heartbeat_deadline: float = 5.0
    monitor_max_restarts: int = 5

    def __post_init__(self) -> None:
        for name, value in ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self)):
            object.__setattr__(self, name, _coerce(name, value))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        """Build a config from ``INSITU_*`` variables, then apply keyword overrides.

        Parameters
        ----------
        environ
            Mapping to read instead of ``os.environ``.
        **overrides
            Field values that win over the environment (``None`` values are ignored).

        Examples
        --------
        >>> Config.from_env({"INSITU_BACKPRESSURE": "skip"}).backpressure.value
        'skip'
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = "INSITU_" + f.name.upper()
            if key in env and env[key] != "":
                values[f.name] = env[key]
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            valid = sorted(f.name for f in dataclasses.fields(cls))
            raise ConfigError(f"unknown config field(s) {unknown}; valid: {valid}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes: Any) -> Config:
        """Return a copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def require_address(self) -> str:
        """Return the Ray address or raise a ``ConfigError`` saying how to set it."""
        if not self.address:
            raise ConfigError(
                "no Ray address: pass address='host:port' or set INSITU_ADDRESS (insitu never guesses a cluster)"
            )
        return self.address


_ENUMS: dict[str, type[enum.Enum]] = {
    "backpressure": Backpressure,
    "on_analytics_failure": FailurePolicy,
    "scheduler": Scheduler,
}


def _coerce(name: str, value: Any) -> Any:
    env = "INSITU_" + name.upper()
    if name in _ENUMS:
        cls = _ENUMS[name]
        try:
            return cls(value.value if isinstance(value, enum.Enum) else str(value).lower())
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in cls)
            raise ConfigError(f"{name} ({env}) must be one of {allowed}; got {value!r}") from None
    if name in ("in_flight", "slots", "fanin", "head_fanin"):
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} ({env}) must be an integer >= 1; got {value!r}") from None
        if number < 1:
            raise ConfigError(f"{name} ({env}) must be >= 1; got {number}")
        return number
    if name in ("monitor_max_restarts", "node_restarts"):
        try:
            return max(0, int(value))
        except (TypeError, ValueError):
            raise ConfigError(f"{name} ({env}) must be an integer >= 0; got {value!r}") from None
    if name == "restarts_left":
        try:
            return max(-1, int(value))
        except (TypeError, ValueError):
            raise ConfigError(f"{name} ({env}) must be an integer; got {value!r}") from None
    if name in ("deadline", "startup_deadline", "reclaim_deadline", "restart_grace", "compute_cpus") or name.startswith(
        "pool_"
    ) or name in ("monitor_health_interval", "monitor_heartbeat_deadline"):
        try:
            real = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} ({env}) must be a number of seconds; got {value!r}") from None
        if real < 0 or (name != "compute_cpus" and real == 0):
            raise ConfigError(f"{name} ({env}) must be > 0; got {real}")
        return real
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{name} ({env}) must be a string; got {type(value).__name__}")
    return value


def resolve_run(run: str | None, config: Config, environ: Mapping[str, str] | None = None) -> str:
    """Return the run name: argument, else ``config.run`` (``INSITU_RUN``), else ``SLURM_JOB_ID``.

    Examples
    --------
    >>> resolve_run(None, Config(), {"SLURM_JOB_ID": "4242"})
    '4242'
    """
    env = os.environ if environ is None else environ
    name = run or config.run or env.get("SLURM_JOB_ID")
    if not name:
        raise RunNameError(
            "no run name: pass run='...' to Bridge and Analytics, or set INSITU_RUN "
            "(inside a SLURM job the job id is used)"
        )
    if any(c in name for c in "/\0 ") or len(name) > 64:
        raise RunNameError(f"run name {name!r} must be at most 64 characters without '/', NUL or spaces")
    return name
