"""The simulation side: one :class:`Bridge` per MPI rank.

No rank imports Ray. Rank 0 registers the run through the run driver, a separate
process on its host (:mod:`insitu.driver`); every rank talks to its own node's actor
through a Unix socket and a shared-memory staging file, so a rank costs a few MB and
no Ray start-up.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np

from insitu.agreement import (
    BROKEN,
    COMPLETED,
    ERR,
    FAILED,
    NO_SLOT,
    STATE,
    STATE_MAX,
    STEP_MAX,
    STEP_MIN,
    TIMED_OUT,
    VERSION,
    Agreement,
    Fate,
)
from insitu.comm import agree, launcher_mismatch, raise_common
from insitu.config import Backpressure, Config, FailurePolicy, resolve_run
from insitu.errors import (
    AnalyticsFailedError,
    BackpressureTimeout,
    ContractError,
    InsituError,
    SendError,
    StepTimeoutError,
)
from insitu.layout import ArrayLayout, ArraySpec
from insitu.messages import (
    AbortRun,
    AnalyticsState,
    Status,
    SteeringUpdate,
    Wire,
)
from insitu.mpiwait import SPIN_S, gentle_barrier, wait_gently
from insitu.nodelink import NodeLink
from insitu.transport import RankChannel, StagingFile
from insitu.validate import NO_STEP, as_specs, check_send, kept_signals

__all__ = ["Bridge", "BridgeStats"]

log = logging.getLogger(__name__)

_NO_STEP = NO_STEP
@dataclass(frozen=True, slots=True)
class BridgeStats:
    """Counters of one rank (identical on every rank)."""

    sent: int
    skipped: int
    dropped: int
    reconnects: int = 0
    """Times this rank reconnected to its node's restarted insitu process (not agreed across ranks)."""


class Bridge(NodeLink):
    """Hand this rank's blocks to the in-situ analytics every step.

    Collective over a duplicate of ``comm``: every rank of ``comm`` constructs one,
    calls :meth:`send` for the same steps and :meth:`close` at the end.

    Parameters
    ----------
    arrays
        This rank's :class:`ArraySpec` declarations (a sequence, or a name -> spec mapping).
    comm
        An mpi4py communicator (default ``COMM_WORLD``); never used directly, only duplicated.
    run
        Run name shared with the analytics (else ``INSITU_RUN``, else ``SLURM_JOB_ID``).
    config
        Base configuration (default :meth:`Config.from_env`).
    **overrides
        Config fields to override, e.g. ``address=``, ``node=``, ``in_flight=``,
        ``backpressure=``, ``on_analytics_failure=``, ``deadline=``.

    Raises
    ------
    ContractError
        The same on every rank when any rank's declaration, node setting or Ray
        connection is bad.

    Examples
    --------
    >>> import numpy as np, insitu  # doctest: +SKIP
    >>> from mpi4py import MPI  # doctest: +SKIP
    >>> cart = MPI.COMM_WORLD.Create_cart([2, 2])  # doctest: +SKIP
    >>> spec = insitu.ArraySpec.from_cart("u", cart, (64, 64), "f8")  # doctest: +SKIP
    >>> with insitu.Bridge([spec], comm=cart, run="demo") as bridge:  # doctest: +SKIP
    ...     for step in range(10):
    ...         bridge.send(step, u=np.random.rand(64, 64))
    ...         if bridge.get("stop"):
    ...             break
    """

    def __init__(
        self,
        arrays: Iterable[ArraySpec] | Mapping[str, ArraySpec],
        comm: Any = None,
        run: str | None = None,
        *,
        config: Config | None = None,
        **overrides: Any,
    ) -> None:
        self._closed = True
        self._comm: Any = None
        with kept_signals():  # the simulation's signal handlers stay its own
            self._init(arrays, comm, run, config, overrides)

    def _init(
        self,
        arrays: Iterable[ArraySpec] | Mapping[str, ArraySpec],
        comm: Any,
        run: str | None,
        config: Config | None,
        overrides: dict[str, Any],
    ) -> None:
        from mpi4py import MPI

        self._comm = (comm if comm is not None else MPI.COMM_WORLD).Dup()
        self.rank: int = self._comm.Get_rank()
        self.size: int = self._comm.Get_size()
        self._channel: RankChannel | None = None
        self._staging: StagingFile | None = None
        self._driver: RankChannel | None = None
        local: InsituError | None = None
        specs: dict[str, ArraySpec] = {}
        cfg = Config()
        try:
            cfg = (config or Config.from_env()).replace(**{k: v for k, v in overrides.items() if v is not None})
            specs = as_specs(arrays)
            self.run: str = resolve_run(run, cfg)
            problem = launcher_mismatch(MPI.COMM_WORLD.Get_size())
            local = ContractError(problem) if problem else None
        except InsituError as exc:
            local = exc
        except Exception as exc:  # noqa: BLE001 - e.g. an unknown override: agreed below, never raised alone
            local = ContractError(f"{type(exc).__name__}: {exc}")
        self.config = cfg
        self._specs = specs
        if self.rank == 0 and local is None:
            try:
                cfg.require_address()
                from insitu.driver import connect_driver

                self._driver, _ = connect_driver(self.run, cfg)
            except InsituError as exc:
                local = exc
            except Exception as exc:  # noqa: BLE001 - carried into the collective, never raised alone
                local = ContractError(f"cannot start the run driver of run {self.run!r}: {exc}")
        mine = (
            None if local is None else f"{type(local).__name__}: {local}",
            {n: s.summary() for n, s in specs.items()},
            cfg.node,
            getattr(self, "run", None),
        )
        gentle_barrier(self._comm)  # rank 0 may be starting the run driver: the others wait without spinning
        gathered = self._comm.gather(mine, root=0)
        result: Any = None
        if self.rank == 0:
            try:
                from insitu.driver import register_run

                result = register_run(self._driver, self.config, self.run, self.size, gathered)
            except Exception as exc:  # noqa: BLE001 - the verdict must reach every rank
                result = ("error", f"rank 0: set-up failed: {type(exc).__name__}: {exc}")
        gentle_barrier(self._comm)  # rank 0 registers the run (node processes start): seconds
        result = self._comm.bcast(result, root=0)
        if result[0] == "error":
            self._release()
            raise ContractError(result[1])
        _, layouts, rank_nodes, addresses = result
        self._layouts: dict[str, ArrayLayout] = layouts
        self.node: str = rank_nodes[self.rank]
        self._last_step = _NO_STEP
        self._in_flight: deque[int] = deque()
        self._free = list(range(cfg.slots))
        self._completed_seen = _NO_STEP
        self._state_seen = AnalyticsState.PENDING
        self._failure_seen = ""
        self._broken = ""
        self._broken_at = 0.0
        self._retry_at = 0.0
        self._reconnects = 0
        self._gap_start: tuple[int, int] | None = None  # (first step dropped, dropped count then)
        self.gaps: list[tuple[int, int, int]] = []
        """Per recovered outage: first and last step dropped, and how many steps were dropped."""
        self._log: dict[int, SteeringUpdate] = {}  # received, not yet applied (compacted on apply)
        self._seen_version = 0
        self._applied_version = 0
        self._values: dict[str, Any] = {}
        self._analytics_ok = True
        self._failure_message = ""
        self._sent = self._skipped = self._dropped = 0
        self._names: tuple[str, ...] = tuple(sorted(layouts))
        self._step_fate = Fate.NONE
        self._step_arrays: set[str] = set()
        self._agreement = Agreement(self._names, self._owns)
        self._vec, self._agreed = self._agreement.vec, self._agreement.agreed
        local = None
        self._address = addresses[self.node]
        try:
            self._connect(self._address, cfg)
        except InsituError as exc:
            local = exc
        except Exception as exc:  # carried into the agreement so that no rank raises alone
            local = ContractError(f"cannot reach the node actor of node {self.node[:12]}: {type(exc).__name__}: {exc}")
        try:
            agree(self._comm, local)
            self._catch_up(time.monotonic() + max(cfg.deadline, cfg.startup_deadline))
        except InsituError:
            if self.rank == 0:
                self._abort("a rank could not reach its node actor")
            self._release()
            raise
        self._leave_driver()
        self._closed = False

    # -- set-up ------------------------------------------------------------------------
    def _abort(self, reason: str) -> None:
        """Rank 0: the set-up failed after registration; the driver reclaims the run now."""
        if self._driver is None:
            return
        try:
            self._driver.send(AbortRun(reason, True))
            self._driver.wait_for(bool, time.monotonic() + 10)
        except OSError as exc:  # best effort: the head's own watchdog reclaims it anyway
            log.warning("could not abort run %s through its driver: %s", getattr(self, "run", "?"), exc)

    def _leave_driver(self) -> None:
        if self._driver is not None:
            self._driver.close()
            self._driver = None

    # -- status from the node actor -----------------------------------------------------
    def _handle(self, messages: list[Any]) -> None:
        for m in messages:
            tag = m[0]
            if tag == Wire.FREE:
                self._free.append(m[1])
            elif tag == Wire.STATUS:
                st: Status = m[1]
                self._completed_seen = max(self._completed_seen, st.completed)
                self._state_seen = st.analytics  # statuses arrive in push order
                if st.failure:
                    self._failure_seen = st.failure
                for u in st.updates:
                    if u.version > self._applied_version:
                        self._log[u.version] = u
                    self._seen_version = max(self._seen_version, u.version)
            elif tag == Wire.ERROR:
                self._broken = m[1]
        if self._channel is not None and self._channel.closed and not self._broken:
            self._broken = f"lost the connection to the node actor of node {self.node[:12]}"

    def _drain(self, timeout: float = 0.0) -> None:
        if self._channel is not None and not self._channel.closed:
            self._handle(self._channel.poll(timeout))
        else:
            self._handle([])

    # -- per step -------------------------------------------------------------------------
    def _check(self, step: Any, arrays: Mapping[str, Any]) -> tuple[int, SendError | None]:
        blocks = {n: self._layouts[n].block_of(self.rank) for n in self._specs}
        return check_send(step, arrays, self._specs, blocks, self._last_step)

    def _reduce(
        self, step: int, error: bool, timed_out: bool, gentle: bool = False, passed: set[str] | None = None
    ) -> np.ndarray:
        """The one allreduce of a step (see the slot constants above).

        Always a non-blocking allreduce polled with sleeps (:mod:`insitu.mpiwait`), so waiting
        ranks leave the node's cores to the ranks, actors and analytics they wait for; ``gentle``
        (waiting under back-pressure) sleeps from the first poll. ``passed``: the arrays
        this rank passed in the call (two slots per declared array: passed by some rank, and
        owned but not passed by some rank).
        """
        from mpi4py import MPI

        v = self._vec
        v[ERR] = int(error)
        v[STEP_MAX] = step
        v[STEP_MIN] = -step
        v[COMPLETED] = -self._completed_seen
        v[VERSION] = -self._seen_version
        v[FAILED] = int(bool(self._broken) or self._state_seen >= AnalyticsState.RESTARTING)
        v[NO_SLOT] = int(not self._free)
        v[TIMED_OUT] = int(timed_out)
        v[STATE] = -int(self._state_seen)
        v[BROKEN] = int(bool(self._broken) and not self._recoverable())
        v[STATE_MAX] = int(self._state_seen)
        self._agreement.fill(passed)
        # never a blocking Allreduce: the first rank there would spin on the cores of the slowest
        # one, of its node process and of the analytics (insitu.mpiwait)
        wait_gently(self._comm.Iallreduce(v, self._agreed, op=MPI.MAX), spin=0.0 if gentle else SPIN_S)
        return self._agreed

    def _apply_steering(self, version: int) -> None:
        """Apply the updates up to the agreed ``version``; applied ones leave the log (its size
        is the updates in flight, whatever the number of updates of the run)."""
        if version <= self._applied_version:
            return
        for v in sorted(v for v in self._log if v <= version):
            u = self._log.pop(v)
            self._values[u.key] = u.value
        self._applied_version = version

    def _catch_up(self, end: float) -> None:
        """Collective, at set-up: wait until this rank has seen every steering version any rank saw.

        A rank connecting later gets its node's log compacted to the last value per key; every
        agreed version is at least the newest such snapshot, so no rank ever needs a value a
        snapshot dropped (statuses reach all nodes in the same order).
        """
        from mpi4py import MPI

        mine = np.array([self._seen_version, 0], dtype=np.int64)
        most = np.empty_like(mine)
        gentle_barrier(self._comm)  # ranks connect to their node processes at their own pace
        self._comm.Allreduce(mine, most, op=MPI.MAX)
        while self._seen_version < most[0] and not self._broken and time.monotonic() < end:
            self._drain(0.01)
        newest = int(most[0])
        mine[:] = (0, int(self._seen_version < newest))
        self._comm.Allreduce(mine, most, op=MPI.MAX)
        if most[1]:
            raise StepTimeoutError(
                f"run {self.run!r}: a rank did not receive steering version {newest} from its node during set-up"
            )

    def send(self, step: int, **arrays: Any) -> None:
        """Hand this rank's blocks of ``step`` to the analytics (collective).

        Returns once the caller may reuse its buffers and the data sits in shared
        memory that outlives this process. Any array may be a view (e.g. the
        interior of a field with ghost cells); it is copied once.

        Arrays may come at their own cadence: a call may carry any subset of the declared
        arrays (``u`` every step, ``v`` every 10 steps), and the arrays of one step may be
        sent in several calls (``send(s, u=u)`` then ``send(s, v=v)``). The calls of one
        step carry disjoint arrays; the step never decreases from call to call; steering is
        applied at a step's first call; back-pressure counts steps, not calls. Every rank
        makes the same calls, and a rank owning a block of an array sent in a call passes it
        in that call (a rank owning no block of it omits it or passes ``None``).

        Parameters
        ----------
        step
            Step number; never decreases from call to call and is equal on all ranks.
        **arrays
            One keyword per declared array of this call that this rank owns a block of.

        Raises
        ------
        SendError
            Bad input on any rank (same on every rank; nothing of this call published).
        BackpressureTimeout
            Policy ``block`` and the analytics did not catch up within the deadline.
        AnalyticsFailedError
            Policy ``raise`` and the analytics failed.
        """
        self._send(step, arrays)

    def _send(self, step: int, arrays: Mapping[str, Any], local_error: SendError | None = None) -> None:
        """``send`` with an error the caller already found on this rank (used by the C shim):
        the step is then rejected on every rank, never on this rank alone."""
        if self._closed:
            raise InsituError("send() on a closed Bridge")
        t0 = time.perf_counter()
        step_i, error = self._check(step, arrays)
        error = local_error or error
        self._drain()
        self._reconnect()
        passed = {n for n, v in arrays.items() if v is not None and self._owns(n)}
        again = sorted(passed & self._step_arrays) if step_i == self._last_step else []
        if error is None and again and self._step_fate is not Fate.NONE:
            error = SendError(f"array(s) {again} were already sent at step {step_i}; the calls of one step carry "
                              "disjoint arrays (send a later step instead)")  # fmt: skip
        agreed = self._reduce(step_i, error is not None, False, passed=passed)
        call = self._agreement.call()
        steps_agree = agreed[STEP_MAX] == -agreed[STEP_MIN]
        if error is None and not agreed[ERR] and steps_agree:
            error = self._agreement.missing(passed, self._layouts_block, step_i)
        if not agreed[ERR] and steps_agree and not self._agreement.blamed() and not call:  # the same on every rank
            raise SendError(f"send({step_i}) carried no array; pass at least one of {list(self._names)}")
        if agreed[ERR] or not steps_agree or self._agreement.blamed():
            if error is None and not agreed[ERR] and agreed[STEP_MAX] != -agreed[STEP_MIN]:
                error = SendError(f"ranks passed different steps ({-agreed[STEP_MIN]} to {agreed[STEP_MAX]})")
            report = None if error is None else (self.rank, type(error).__name__, str(error))
            raise_common(self._comm.allgather(report))  # at least one rank reported: always raises
        first = step_i != self._last_step or self._step_fate is Fate.NONE
        if first:  # a new step: steering applies, back-pressure decides its fate
            self._last_step = step_i
            self._step_arrays = set(call)
            self._apply_steering(int(-agreed[VERSION]))
        else:
            self._step_arrays |= set(call)
        if agreed[FAILED]:
            if first:
                if self._gap_start is None:
                    self._gap_start = (step_i, self._dropped)
                self._dropped += 1
                self._step_fate = Fate.DROPPED
            self._on_failure(bool(agreed[BROKEN]) or agreed[STATE_MAX] >= AnalyticsState.DETACHED)
            self._count(first, self._failure_message)
            return
        if self._failure_message:  # a consumer attached again, or the node processes came back
            self._recovered(step_i)
            self._failure_message = ""
            self._failure_seen = ""
            self._analytics_ok = True
        if not first and self._step_fate is not Fate.SENT:
            return  # the step was skipped or dropped at its first call: so are its later calls
        completed = int(-agreed[COMPLETED])
        while self._in_flight and self._in_flight[0] <= completed:
            self._in_flight.popleft()
        limit = self.config.in_flight
        if first and len(self._in_flight) >= limit and self.config.backpressure == Backpressure.SKIP:
            self._skipped += 1
            self._step_fate = Fate.SKIPPED
            self._count(True, f"back-pressure skip: {len(self._in_flight)} steps in flight")
            return
        if (first and len(self._in_flight) >= limit) or agreed[NO_SLOT]:
            if first:
                self._step_fate = Fate.DROPPED  # unless the wait succeeds (below)
            if not self._block(step_i, first):
                if first and self._gap_start is None:
                    self._gap_start = (step_i, self._dropped)
                self._dropped += int(first)
                self._count(first, self._failure_message)
                return
        mine = [n for n in call if n in passed]
        slot = -1
        if mine:
            slot = self._free.pop()
            views = self._views[slot]
            for name in mine:
                np.copyto(views[name], arrays[name], casting="equiv")  # byte order converted in the one copy
        try:
            assert self._channel is not None
            part = None if len(call) == len(self._names) else call
            self._channel.send((Wire.CHUNKS, step_i, slot, part, time.perf_counter() - t0))
        except OSError as exc:
            self._broken = f"lost the connection to the node actor of node {self.node[:12]}: {exc}"
        if first:
            self._in_flight.append(step_i)
            self._sent += 1
            self._step_fate = Fate.SENT

    def _count(self, first: bool, reason: str) -> None:
        """Tell the node actor a step was skipped or dropped, and why (for ``insitu status``)."""
        if first and self._channel is not None and not self._channel.closed and not self._broken:
            with contextlib.suppress(OSError):
                self._channel.send((Wire.COUNTS, self._skipped, self._dropped, reason))

    def _owns(self, name: str) -> bool:
        spec = self._specs.get(name)
        return spec is not None and spec.owns_block

    def _layouts_block(self, name: str) -> tuple[int, ...]:
        return self._layouts[name].block_of(self.rank)

    def _block(self, step: int, first: bool = True) -> bool:
        """Wait (collectively) for a free in-flight slot (at a step's first call) and a free staging
        slot; ``False`` if the analytics failed meanwhile."""
        end = time.monotonic() + self.config.deadline
        limit = self.config.in_flight
        while True:
            self._drain(0.005)
            agreed = self._reduce(step, False, time.monotonic() > end, gentle=True)
            if first:
                self._apply_steering(int(-agreed[VERSION]))
            if agreed[FAILED]:
                self._on_failure(bool(agreed[BROKEN]) or agreed[STATE_MAX] >= AnalyticsState.DETACHED)
                return False
            completed = int(-agreed[COMPLETED])
            while self._in_flight and self._in_flight[0] <= completed:
                self._in_flight.popleft()
            if (not first or len(self._in_flight) < limit) and not agreed[NO_SLOT]:
                return True
            if agreed[TIMED_OUT]:
                state = AnalyticsState(int(-agreed[STATE]))
                if first and len(self._in_flight) >= limit:
                    waiting = (
                        f"{len(self._in_flight)} steps in flight ({list(self._in_flight)}), the analytics "
                        f"completed up to step {completed if completed > _NO_STEP else 'none'}, analytics "
                        f"state {state.name.lower()}"
                    )
                else:
                    waiting = "a node actor did not free a staging slot (node actor overloaded or gone)"
                raise BackpressureTimeout(
                    f"run {self.run!r}: step {step} waited {self.config.deadline:.0f} s for back-pressure: {waiting}"
                )

    def _on_failure(self, final: bool = True) -> None:
        """The agreed step is dropped: warn once (rank 0); under policy ``raise`` raise, unless the
        failure is not ``final`` (a supervised analytics is being restarted)."""
        if not self._failure_message:
            reason = self._broken or self._failure_seen
            reports = self._comm.allgather(reason)
            self._failure_message = next((r for r in reports if r), "the analytics stopped")
            self._analytics_ok = False
            if (self.config.on_analytics_failure == FailurePolicy.CONTINUE or not final) and self.rank == 0:
                warnings.warn(
                    f"insitu run {self.run!r}: analytics unavailable ({self._failure_message}); "
                    "further steps are dropped",
                    RuntimeWarning,
                    stacklevel=3,
                )
        if self.config.on_analytics_failure == FailurePolicy.RAISE and final:
            raise AnalyticsFailedError(f"run {self.run!r}: {self._failure_message}")

    # -- steering and state ----------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        """The steering value ``key`` as agreed at the last ``send`` (never blocks)."""
        return self._values.get(key, default)

    @property
    def analytics_ok(self) -> bool:
        """False while the run has no consumer after its analytics failed or left; true again once
        a consumer attaches (the same on every rank after a send)."""
        return self._analytics_ok

    @property
    def stats(self) -> BridgeStats:
        """Steps sent, skipped (back-pressure) and dropped (analytics failed)."""
        return BridgeStats(self._sent, self._skipped, self._dropped, self._reconnects)

    # -- end -------------------------------------------------------------------------------
    def close(self) -> None:
        """End the stream for this rank (not collective: makes no MPI call).

        Returns once every step this rank sent is held by its node actor; the data
        stays readable by the analytics after this process exits. The bridge's duplicate
        of the communicator is not freed here (``MPI_Comm_free`` is collective, and one
        rank may close while others still run or have failed): ``MPI_Finalize`` releases it.
        If the node's insitu process died and may be restarted (``node_restarts``), waits for it
        (at most ``deadline`` seconds after the loss) so that the run closes normally.
        """
        if self._closed:
            return
        self._closed = True
        problem = None
        while self._recoverable():  # a node process being restarted: its close must reach the new one
            self._reconnect()
            if self._broken:
                time.sleep(0.25)
        if self._gap_start is not None:  # the run ends inside a gap: it lasts to the last step
            first, before = self._gap_start
            self.gaps.append((first, self._last_step, self._dropped - before))
            self._gap_start = None
        try:
            if self._channel is not None and not self._channel.closed and not self._broken:
                self._channel.send((Wire.CLOSE, self._last_step))
                got = self._channel.wait_for(
                    lambda ms: any(m[0] in (Wire.CLOSED, Wire.ERROR) for m in ms),
                    time.monotonic() + self.config.deadline,
                )
                if not any(m[0] == Wire.CLOSED for m in got):
                    problem = (
                        f"run {self.run!r}: the node actor of node {self.node[:12]} did not confirm rank "
                        f"{self.rank}'s close within {self.config.deadline:.0f} s"
                    )
        except OSError as exc:
            problem = f"run {self.run!r}: close of rank {self.rank} failed: {exc}"
        finally:
            self._release(collective=False)
        if problem:
            raise StepTimeoutError(problem)

    def _release(self, collective: bool = True) -> None:
        """Release this rank's resources; ``collective`` (every rank of the bridge is here, as
        on an agreed set-up failure) also frees the duplicated communicator."""
        self._drop_link()
        self._leave_driver()
        if self._comm is not None and collective:
            self._comm.Free()
        self._comm = None

    def __enter__(self) -> Bridge:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            warnings.warn("insitu.Bridge was not closed; call close() or use 'with'", ResourceWarning, stacklevel=1)
