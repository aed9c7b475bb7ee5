"""The analytics side: callbacks on steps or sliding windows of steps, and steering."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from insitu.actors.consumers import ConsumerKind
from insitu.bypass import Bypass
from insitu.callbacks import Callback, CallbackRunner
from insitu.config import Config, Scheduler, When, resolve_run
from insitu.dispatch import Dispatcher
from insitu.errors import (
    CallbackError,
    ContractError,
    NodeLostError,
    RunLostError,
    SimulationFailedError,
    SteeringValueError,
    StepTimeoutError,
)
from insitu.messages import Attached, EndReason, Gap, RunEnd, RunInfo, StepData, Waiting
from insitu.outcome import BlockRef, RunSummary, lost_node_end
from insitu.process import (
    Route,
    SigtermRequest,
    acquire_ray,
    check_cluster,
    register,
    release_ray,
    sigterm_between_steps,
)

__all__ = ["Analytics", "BlockRef", "RunSummary"]

log = logging.getLogger(__name__)
_POLL = 1.0


def _link_class() -> Any:
    import ray

    @ray.remote(num_cpus=0, max_restarts=0)
    class AnalyticsLink:
        """Owned by the analytics process: dies with it, which tells the head."""

        async def park(self) -> None:
            await asyncio.Event().wait()

    return AnalyticsLink


class Analytics(CallbackRunner):
    """Receive a run's steps as Dask arrays and steer the simulation.

    Parameters
    ----------
    run
        Run name shared with the simulation (else ``INSITU_RUN``, else ``SLURM_JOB_ID``).
    address
        Ray address (else ``INSITU_ADDRESS``).
    config
        Base configuration (default :meth:`Config.from_env`).
    bypass
        Callbacks (matched by function name, tags ``"<array>:<step>"``) and dispatched calls to
        bypass (:class:`insitu.Bypass`). A bypassed callback is still run as a Ray task on the
        node holding its first array's first block; its result is the provider's or the data file's,
        called as ``provider(tag, data_path, step)``; results are counted in the summary.
    kind
        ``ConsumerKind.MONITOR`` makes it an observer: it sees the latest complete steps
        (older ones are skipped when it falls behind), never holds the simulation back, and
        its failure is its own (no policy applies). ``insitu monitor``'s snapshot reader is one.
    **overrides
        Config fields to override (``deadline=``, ``scheduler=``, ...).

    Examples
    --------
    >>> import insitu  # doctest: +SKIP
    >>> analytics = insitu.Analytics(run="demo", address="127.0.0.2:6379")  # doctest: +SKIP
    >>> @analytics.on_step("u", window=2)  # doctest: +SKIP
    ... def trend(step, u):
    ...     rate = float((u[1] - u[0]).mean().compute())
    ...     if abs(rate) < 1e-6:
    ...         analytics.set("stop", True)
    >>> analytics.run()  # doctest: +SKIP
    """

    def __init__(
        self, run: str | None = None, address: str | None = None, *, config: Config | None = None,
        bypass: Bypass | None = None, kind: ConsumerKind = ConsumerKind.ANALYTICS, **overrides: Any
    ) -> None:  # fmt: skip
        base = config or Config.from_env()
        self.config = base.replace(
            address=address or base.address, **{k: v for k, v in overrides.items() if v is not None}
        )
        self.run_name = resolve_run(run, self.config)
        check_cluster(self.config.address, f"Analytics(run={self.run_name!r})")
        self.kind = ConsumerKind(kind)
        self._callbacks: list[Callback] = []
        self._on_close: list[Callable[[RunSummary], None]] = []
        self._head: Any = None
        self._link: Any = None
        self._consumer = 0
        self._resumed_after: int | None = None
        self._dropped_before: int | None = None
        self._seq = 0  # messages of this consumer incarnation to the head (set/done/fail/detach), in order
        self._history: tuple[StepData, ...] = ()
        self._order: dict[tuple[str, str], tuple[tuple[int, ...], ...]] | None = None
        self._holds_ray = False
        self._sigterm = SigtermRequest()
        self._stop = threading.Event()
        self._gaps: list[Gap] = []
        self._lost: list[int] = []
        self._on_gap: list[Callable[[Gap], None]] = []
        self._unroute: Callable[[], None] | None = None
        self._where: dict[str, str] = {}
        self._step: int | None = None
        self._call_step: int | None = None  # the step of the last call processed, and its arrays so far
        self._step_arrays: set[str] = set()
        self._in_callback = False
        self._sets: list[tuple[str, Any]] = []
        self._done: tuple[int, tuple[tuple[str, Any], ...]] | None = None
        self._executors: dict[str, Any] = {}
        self.bypass = bypass
        self._handled: dict[str, int] = {}
        self.bypassed: dict[str, int] = {}
        self._dispatcher = Dispatcher(self.run_name, namespace=self.config.namespace, deadline=self.config.deadline,
                                      bypass=bypass)  # fmt: skip
        self.info: RunInfo | None = None

    def on_step(self, *arrays: str, window: int = 1, partial: bool = False,
                on_error: Callable[[int, BaseException], Any] | None = None, when: When | str = When.ALL,
                ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:  # fmt: skip
        """Register ``fn(step, **arrays)`` to run on every step (or every full window).

        Each named array arrives as a list of up to ``window`` Dask arrays, oldest first:
        the last ``window`` steps *of that array* (arrays sent at their own cadence keep
        their own steps); each has a ``.step`` attribute. With ``window > 1`` the callback
        first runs when the window is full, or from the first step with the steps so far
        when ``partial`` is true.

        ``when`` chooses the trigger when the simulation sends arrays at their own cadence
        (:meth:`insitu.Bridge.send`): ``"all"`` (default) runs at a step every one of the
        callback's arrays has, once the call carrying the last of them arrived; ``"any"``
        runs at the first call of a step carrying any of them, and an array without that
        step yet gets an empty list (an array sent in a later call of the same step is not
        seen by this run of the callback).

        ``on_error(step, exc)`` handles this callback's exceptions: the error is logged and
        counted (:attr:`RunSummary.handled`) and the run goes on. A handler that raises counts
        as a failure of the callback under the run's policy; without a handler, any exception
        of the callback is one.
        """
        if not arrays:
            raise ContractError("on_step needs at least one array name")
        if int(window) < 1:
            raise ContractError(f"window must be >= 1; got {window}")
        if when not in tuple(When):
            raise ContractError(f"when must be 'all' or 'any'; got {when!r}")
        names = tuple(dict.fromkeys(arrays))

        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            history = {n: deque[tuple[int, Any]](maxlen=int(window)) for n in names}
            self._callbacks.append(Callback(fn, names, int(window), history, bool(partial), on_error, When(when)))
            return fn

        return register

    def record(self, arrays: Sequence[str], path: str | os.PathLike[str], every: int = 1) -> Any:
        """Record ``arrays`` to the Zarr store ``path`` while this analytics runs (see :func:`insitu.record`).

        Returns the :class:`insitu.record.Recorder` (``steps``, ``bytes``, ``by_node``).
        """
        from insitu.record import record

        return record(self, arrays, path, every)

    def windows(self) -> dict[str, int]:
        """The arrays the callbacks read, each with its largest window (what the head retains for us)."""
        out: dict[str, int] = {}
        for cb in self._callbacks:
            for name in cb.arrays:
                out[name] = max(out.get(name, 0), cb.window)
        return out

    def on_close(self, fn: Callable[[RunSummary], None]) -> Callable[[RunSummary], None]:
        """Register ``fn(summary)`` to run once the simulation closed, while Ray is still connected.

        The place to collect final results from actors or a slice pool and to release them.
        """
        self._on_close.append(fn)
        return fn

    def on_gap(self, fn: Callable[[Gap], None]) -> Callable[[Gap], None]:
        """Register ``fn(gap)``, called when a node process died and was restarted: ``gap.missing``
        steps will not come, and windows over that node's arrays were emptied (their blocks died
        with it), so they fill again from the first step after the gap."""
        self._on_gap.append(fn)
        return fn

    def blocks(self, array: Any) -> dict[tuple[int, ...], BlockRef]:
        """Where each block of ``array`` (an array handed to a callback) lives, as object refs.

        ``ray.get(b.ref)[b.index]`` reads block ``b`` anywhere in the cluster without going
        through this process: hand the :class:`BlockRef` to a task, an actor or a slice pool
        host and let it read its share (see ``analytics/train_surrogate.py``).
        """
        out = {}
        for key, task in array.__dask_graph__().items():
            if isinstance(key, tuple) and key[0] == array.name and isinstance(task, tuple):
                ref, index = task[1], task[2]
                out[tuple(key[1:])] = BlockRef(ref, int(index), self._where.get(ref.hex(), ""))
        return dict(sorted(out.items()))

    def block_nodes(self, array: Any) -> dict[tuple[int, ...], str]:
        """IP address of the node holding each block of ``array`` (an array handed to a callback).

        The node actor of that node stored the block in its local object store; this is
        insitu's own record, no query to Ray (for checking placement and for debugging).
        """
        import ray

        ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
        return {block: ips.get(b.node, b.node) for block, b in self.blocks(array).items()}

    def routes(self) -> dict[str, str]:
        """How this process reaches each node it computed on: IP address to ``"direct"`` or ``"relay"``.

        ``"relay"`` means the node's compute actor was created and is called through the
        run's relay on the head (see :mod:`insitu.dispatch`), e.g. analytics on a tunneled node.
        """
        import ray

        ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
        return {ips.get(node, node): proxy.route.value for node, proxy in self._executors.items()}

    def set(self, key: str, value: Any) -> None:
        """Send a steering value to the simulation (``Bridge.get(key)``).

        Values are ``bool``, ``int``, ``float`` or ``str``. A value set while step
        ``s`` is analysed takes effect at one step ``t`` with ``s < t <= s + N + 1``,
        the same on every rank (policy ``block``).
        """
        if not isinstance(key, str) or not isinstance(value, bool | int | float | str):
            raise SteeringValueError(
                f"steering values are bool, int, float or str under a str key; got {key!r}: {type(value).__name__}"
            )
        if self._head is None:
            raise ContractError("Analytics.set is available while run() is running")
        if self._in_callback:
            self._sets.append((key, value))  # sent with the step's completion
        else:
            step = -1 if self._step is None else self._step
            self._head.set.remote(key, value, step, self._consumer, self._next_seq())

    # -- run loop ---------------------------------------------------------------------------
    def run(self) -> RunSummary:
        """Process steps until the simulation closes; returns a summary.

        Raises
        ------
        CallbackError
            A callback raised (the simulation is told; its policy applies).
        SimulationFailedError
            A simulation rank died before closing.
        NodeLostError
            The insitu process of a node died (the message names the node and the last complete step).
        RunLostError
            The run's head actor died (killed, or its node or the cluster lost).
        StepTimeoutError
            Nothing arrived within ``deadline`` seconds; names what is missing.
        """
        if not self._callbacks:
            raise ContractError("no callbacks registered: use @analytics.on_step(...) first")
        with sigterm_between_steps() as self._sigterm:  # SIGTERM: detach at the next step, then exit 143
            acquire_ray(self.config, f"Analytics(run={self.run_name!r})")
            self._holds_ray = True
            return self._attach_and_loop()

    def stop(self) -> None:
        """Ask :meth:`run`, from any thread, to leave the run at the next step boundary (within about
        a second, once a running callback returns). ``run()`` then detaches and returns its summary
        with reason ``EndReason.STOPPED``; the simulation goes on under its policy.

        Examples
        --------
        >>> analytics = insitu.Analytics(run="demo")  # doctest: +SKIP
        >>> thread = threading.Thread(target=analytics.run); thread.start()  # doctest: +SKIP
        >>> analytics.stop(); thread.join()  # doctest: +SKIP
        """
        self._stop.set()

    def _summary(self, steps: int, last: int | None, reason: EndReason) -> RunSummary:
        return RunSummary(steps, last, reason, dict(self._handled), self._consumer, self._resumed_after,
                          self._dropped_before, tuple(self._gaps), tuple(self._lost))  # fmt: skip

    def _attach_and_loop(self) -> RunSummary:
        import ray

        from insitu.actors.head import get_or_create_head

        try:
            self._unroute = register(Route(self._owns_chunk, self._schedule, self.run_name))
            self._head = get_or_create_head(self.run_name, self.config)
            self._link = _link_class().remote()
            cfg = self.config
            previous = ""
            if cfg.previous_stderr:
                with contextlib.suppress(OSError):
                    previous = Path(cfg.previous_stderr).read_text(errors="replace")
            attached: Attached = ray.get(
                self._head.attach.remote(self._link, self.windows(), self.kind.value, cfg.restarts_left,
                                         cfg.restart_grace, previous),
                timeout=cfg.deadline,
            )  # fmt: skip
            self._consumer = attached.consumer
            self._resumed_after = attached.resumed_after
            self._dropped_before = attached.dropped
            if attached.resumed_after is not None:
                log.warning("run %s: attached as consumer %d after a failed one, which finished step %d",
                            self.run_name, attached.consumer, attached.resumed_after)  # fmt: skip
            self._seq = 0
            self.info = self._wait_info()
            if self.info is None:  # stopped before the simulation started
                return self._summary(0, None, EndReason.STOPPED)
            self._check_arrays(self.info)
            for data in attached.history:  # attached to a live run: windows refilled from retained steps
                self._process(data, history=True)
            return self._loop()
        finally:
            self._leave()

    @property
    def incarnation(self) -> int:
        """This analytics' consumer number in the run (0 before :meth:`run` attached it)."""
        return self._consumer

    @property
    def restarted(self) -> bool:
        """Whether ``insitu analytics --supervise`` started this process after a failed incarnation
        (it sets ``INSITU_PREVIOUS_STDERR`` from the second start on): its outputs should be resumed,
        not rewritten."""
        return bool(self.config.previous_stderr)

    def _beat(self) -> None:
        """Touch the supervisor's heartbeat file (``insitu analytics --supervise``), if any."""
        if self.config.heartbeat_file:
            with contextlib.suppress(OSError):
                os.utime(self.config.heartbeat_file)

    def _run_over(self, reason: str) -> None:
        """Tell a supervisor the run itself ended (a restart could not help): ``<heartbeat file>.over``."""
        if self.config.heartbeat_file:
            with contextlib.suppress(OSError):
                Path(self.config.heartbeat_file + ".over").write_text(reason)

    def _next_seq(self) -> int | None:
        """The next sequence number of this consumer's messages (``None`` before it attached)."""
        if not self._consumer:
            return None
        self._seq += 1
        return self._seq - 1

    def _wait_info(self) -> RunInfo | None:
        import ray

        end = time.monotonic() + self.config.deadline
        while True:  # short polls: the supervisor's heartbeat goes on while the simulation starts
            self._beat()
            self._sigterm.check()
            if self._stop.is_set():
                return None
            got = ray.get(self._head.run_info.remote(_POLL), timeout=_POLL + self.config.deadline)
            if not isinstance(got, Waiting) or time.monotonic() >= end:
                break
        if isinstance(got, Waiting):
            raise StepTimeoutError(f"waited {self.config.deadline:.0f} s: {got.description}")
        if isinstance(got, RunEnd):
            self._run_over(got.message or got.reason.value)
            if got.reason == EndReason.NODE_LOST:
                raise NodeLostError(got.message)
            raise SimulationFailedError(f"run {self.run_name!r}: {got.message or got.reason.value}")
        return got

    def _check_arrays(self, info: RunInfo) -> None:
        known = {lay.name for lay in info.layouts}
        for cb in self._callbacks:
            unknown = sorted(set(cb.arrays) - known)
            if unknown:
                raise ContractError(
                    f"callback {cb.fn.__name__} asks for {unknown}; run {self.run_name!r} declares {sorted(known)}"
                )

    def _loop(self) -> RunSummary:
        import ray

        steps = 0
        last: int | None = None
        progress = time.monotonic()
        while True:
            self._beat()
            self._sigterm.check()
            if self._stop.is_set():
                return self._summary(steps, last, EndReason.STOPPED)
            done, self._done = self._done, None  # the completion travels with the next poll
            seq = None if done is None else self._next_seq()
            try:
                batch = ray.get(self._head.next_steps.remote(self._consumer, _POLL, done, seq),
                                timeout=_POLL + self.config.deadline)  # fmt: skip
            except ray.exceptions.RayActorError as exc:  # the head died (killed, its node or the cluster lost)
                raise RunLostError(
                    f"run {self.run_name!r}: its head actor died after step {last} (the last step this analytics "
                    f"received): {type(exc).__name__}"
                ) from exc
            if isinstance(batch, Waiting):
                if time.monotonic() - progress > self.config.deadline:
                    raise StepTimeoutError(f"no step for {self.config.deadline:.0f} s: {batch.description}")
                continue
            progress = time.monotonic()
            for item in batch:
                if isinstance(item, RunEnd):
                    if item.reason == EndReason.CLOSED:
                        summary = self._summary(steps, last, item.reason)
                        for fn in self._on_close:
                            try:
                                fn(summary)
                            except Exception as exc:
                                raise CallbackError(
                                    f"on_close callback {fn.__name__} failed after step {last}: "
                                    f"{type(exc).__name__}: {exc}", step=-1 if last is None else last, arrays=(),
                                ) from exc  # fmt: skip
                        return summary
                    self._run_over(item.message)
                    if item.reason == EndReason.NODE_LOST:
                        raise NodeLostError(item.message)
                    raise SimulationFailedError(f"run {self.run_name!r}: {item.message}")
                self._sigterm.check()
                if isinstance(item, Gap):
                    self._gap(item)
                    continue
                self._process(item)
                if item.parts:  # steps carrying our arrays; not calls (a step may come in several)
                    steps += int(item.step != last)
                    last = item.step

    def _process(self, data: StepData, history: bool = False) -> None:
        """Run the callbacks of one step; with ``history`` only fill the windows."""
        assert self.info is not None
        from insitu.graph import block_order, expand_parts, make_array

        if self._order is None:
            self._order = block_order(self.info.layouts, self.info.rank_nodes)
        parts = self._resolve(data.parts)
        by_array = expand_parts(parts, self._order)
        for _array, node, ref in parts:
            self._where[ref.hex()] = node
        arrays = {
            lay.name: make_array(lay, data.step, by_array[lay.name], self.run_name)
            for lay in self.info.layouts
            if lay.name in by_array
        }
        self._step = data.step
        if data.step != self._call_step:  # the first call of a step (a step may come in several calls)
            self._call_step, self._step_arrays = data.step, set()
        before = set(self._step_arrays)
        self._step_arrays.update(arrays)
        for cb in self._callbacks:
            new = [n for n in cb.arrays if n in arrays]
            if not new:
                continue
            for n in new:
                cb.history[n].append((data.step, arrays[n]))
            if history:
                continue
            if cb.when == When.ALL:
                if not all(n in self._step_arrays for n in cb.arrays):
                    continue  # runs at the call completing its set
                present = list(cb.arrays)
            else:
                if any(n in before for n in cb.arrays):
                    continue  # ran at an earlier call of this step
                present = new
            if not cb.partial and any(len(cb.history[n]) < cb.window for n in present):
                continue
            kwargs = {n: [a for _, a in cb.history[n]] if n in present else [] for n in cb.arrays}
            self._beat()
            self._in_callback = True
            try:
                self._call_handled(cb, data.step, kwargs)
            except Exception as exc:
                self._raise_if_node_lost(exc)
                message = (
                    f"callback {cb.fn.__name__} failed at step {data.step} on array(s) "
                    f"{', '.join(cb.arrays)}: {type(exc).__name__}: {exc}"
                )
                self._head.fail.remote(self._consumer, message + "\n" + traceback.format_exc(limit=5), self._next_seq())
                raise CallbackError(message, step=data.step, arrays=cb.arrays) from exc
            finally:
                self._in_callback = False
        if history:
            return
        # reported with the next poll (next_steps(done=...)); sets accumulate until then
        self._done = (data.step, (*(self._done[1] if self._done else ()), *self._sets))
        self._sets.clear()
        self._prune()
        # Dask's and Ray's futures can keep a step's refs in reference cycles: collect them now,
        # so a chunk is released when the last window over its array passes it (retention rule)
        gc.collect(1)

    def _raise_if_node_lost(self, exc: BaseException) -> None:
        """A callback that failed because a node of the run was lost raises that, not a callback failure."""
        got = lost_node_end(self._head, exc)
        if got is not None:
            self._run_over(got.message)
            raise NodeLostError(got.message) from exc

    def _resolve(self, parts: tuple[tuple[str, str, Any], ...]) -> list[tuple[str, str, Any]]:
        """Replace the group objects of step relays by their ``(array, node, ref)`` parts
        (one ``ray.get`` per level of the relay tree)."""
        assert self.info is not None
        relays = set(self.info.relays)
        out = [p for p in parts if p[1] not in relays]
        grouped = [p for p in parts if p[1] in relays]
        if grouped:
            import ray

        while grouped:
            groups = ray.get([ref for _, _, ref in grouped], timeout=self.config.deadline)
            below = [(array, unit, ref) for (array, _, _), pairs in zip(grouped, groups, strict=True)
                     for unit, ref in pairs]  # fmt: skip
            out += [p for p in below if p[1] not in relays]
            grouped = [p for p in below if p[1] in relays]
        return out

    def _owns_chunk(self, ref_hex: str) -> bool:
        """Whether an object ref is one of the chunks our windows hold (the router's question)."""
        return ref_hex in self._where

    def _schedule(self, dsk: Any, keys: Any, **kwargs: Any) -> Any:
        """Our Dask scheduler, for the graphs holding our chunks (the router calls it)."""
        if self.config.scheduler == Scheduler.INSITU:
            from insitu.graph import NodeScheduler

            return NodeScheduler(self._where, self._executor, self._dispatcher, self.config.deadline)(
                dsk, keys, **kwargs
            )
        from ray.util.dask import ray_dask_get

        return ray_dask_get(dsk, keys, **kwargs)

    def _executor(self, node: str) -> Any:
        """The compute actor of ``node`` (owned by this process, created on first use)."""
        if node not in self._executors:
            from insitu.graph import executor_on

            self._executors[node] = executor_on(node, self.config.compute_cpus, self._dispatcher)
        return self._executors[node]

    def _prune(self) -> None:
        """Forget the locations of chunks no window holds any more."""
        keep: set[str] = set()
        for cb in self._callbacks:
            for window in cb.history.values():
                for _, arr in window:
                    keep.update(b.ref.hex() for b in self.blocks(arr).values())
        self._where = {k: v for k, v in self._where.items() if k in keep}

    def _leave(self) -> None:
        import ray

        if self._unroute is not None:
            self._unroute()
            self._unroute = None
        for cb in self._callbacks:
            for window in cb.history.values():
                window.clear()
        self._where.clear()
        if self._head is not None:
            try:
                if self._done is not None:  # a completion not yet reported: before the detach
                    ray.get(self._head.done.remote(self._consumer, *self._done, self._next_seq()), timeout=10)
                    self._done = None
                ray.get(self._head.detach.remote(self._consumer, self._next_seq()), timeout=10)
            except Exception:  # the head may already be gone; nothing left to detach from
                log.debug("head of run %s gone before detach", self.run_name)
        if self._link is not None:
            ray.kill(self._link)
            self._link = None
        for executor in self._executors.values():
            executor.kill()
        self._executors.clear()
        if self._head is not None:
            self._dispatcher.close()  # the run's relay, if any work needed it
        self._head = None
        if self.bypass is not None:
            self.bypass.close()  # its file server (stubs exported to the cluster keep it alive otherwise)
        if self._holds_ray:
            self._holds_ray = False
            release_ray()  # the last Analytics of the process to leave ends a connection insitu made

    def __enter__(self) -> Analytics:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self._leave()
