"""The public API of deisa-ray 0.1.x on top of insitu.

A deisa-ray simulation and its analytics run on insitu by changing only their imports::

    from deisa.ray.bridge import Bridge           ->  from insitu.compat.deisa import Bridge
    from deisa.ray.window_handler import Deisa    ->  from insitu.compat.deisa import Deisa
    from deisa.ray.types import Window            ->  from insitu.compat.deisa import Window
    from deisa.ray import Bridge, Deisa           ->  from insitu.compat.deisa import Bridge, Deisa

Both sides find the cluster and the run as insitu does: ``INSITU_ADDRESS`` (else
``RAY_ADDRESS``) and ``INSITU_RUN`` (else ``SLURM_JOB_ID``), or ``run=``/``address=``.

deisa-ray hands each array of a timestep over in its own ``send(array_name=, chunk=,
timestep=)`` call, while :meth:`insitu.Bridge.send` carries every array of a step in one
collective call. The :class:`Bridge` here therefore keeps a copy of each chunk of a
timestep until every declared array of that timestep was given, then calls insitu's
``send`` once: one extra copy per array but the last of each timestep. Where deisa-ray's
semantics cannot be kept, ``docs/migrating-from-deisa.md`` says so.

Examples
--------
>>> from insitu.compat.deisa import Window
>>> Window("U", size=2)
Window(name='U', size=2)
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import sys
import traceback
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from insitu.comm import agree, raise_common
from insitu.config import When
from insitu.errors import ContractError, InsituError, SendError, SteeringValueError
from insitu.layout import ArraySpec, validate_layout

__all__ = ["Block", "Bridge", "Deisa", "DeisaArray", "Timestep", "Window", "block_layout"]  # noqa: F822 - DeisaArray: __getattr__

log = logging.getLogger(__name__)

Timestep = int
"""deisa-ray's timestep type; insitu's steps are integers that increase from send to send."""

_KEYS = ("global_shape", "chunk_shape", "chunk_position")
_FEEDBACK = "deisa:"  # prefix of the insitu steering keys that carry deisa-ray feedback queues


def _address() -> str | None:
    """``RAY_ADDRESS`` when ``INSITU_ADDRESS`` is unset (deisa-ray reads the former); else ``None``."""
    if os.environ.get("INSITU_ADDRESS"):
        return None
    ray_address = os.environ.get("RAY_ADDRESS", "")
    return ray_address if ray_address and ray_address != "auto" else None


# -- simulation side -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Block:
    """One rank's block of one array, derived from deisa-ray metadata."""

    global_shape: tuple[int, ...]
    start: tuple[int, ...]
    shape: tuple[int, ...]


def _ints(name: str, key: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence | np.ndarray):
        raise ContractError(f"array {name!r}: {key} must be a sequence of integers; got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int | np.integer):
            raise ContractError(f"array {name!r}: {key} must contain only integers; got {value!r}")
        if v < 0:
            raise ContractError(f"array {name!r}: {key} must not be negative; got {tuple(value)}")
        out.append(int(v))
    return tuple(out)


def _local_metadata(arrays_metadata: Any) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Check this rank's deisa-ray metadata; ``name -> (global_shape, chunk_shape, chunk_position)``."""
    if not isinstance(arrays_metadata, Mapping) or not arrays_metadata:
        raise ContractError(
            "arrays_metadata must be a non-empty dict {name: {'global_shape', 'chunk_shape', 'chunk_position'}}; "
            f"got {arrays_metadata!r}"
        )
    out: dict[str, tuple[tuple[int, ...], ...]] = {}
    for name, meta in arrays_metadata.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ContractError(f"array names must be Python identifiers for insitu; got {name!r}")
        if not isinstance(meta, Mapping):
            raise ContractError(f"array {name!r}: metadata must be a dict with keys {list(_KEYS)}; got {meta!r}")
        missing, unknown = sorted(set(_KEYS) - set(meta)), sorted(set(meta) - set(_KEYS))
        if missing or unknown:
            raise ContractError(
                f"array {name!r}: metadata needs exactly the keys {list(_KEYS)}; missing {missing}, unknown {unknown}"
            )
        gshape, cshape, pos = (_ints(name, k, meta[k]) for k in _KEYS)
        if not len(gshape) == len(cshape) == len(pos):
            raise ContractError(
                f"array {name!r}: global_shape {gshape}, chunk_shape {cshape} and chunk_position {pos} "
                "must have the same number of axes"
            )
        out[name] = (gshape, cshape, pos)
    return out


def _blocks(name: str, per_rank: list[tuple[tuple[int, ...], ...] | None]) -> list[Block]:
    """Every rank's block of ``name``: along each axis, a chunk starts where the chunks at lower
    positions end (so uneven splits work; deisa-ray's ``chunk_position * chunk_shape`` is the even case)."""
    undeclared = [r for r, m in enumerate(per_rank) if m is None]
    if undeclared:
        raise ContractError(f"array {name!r} is not declared by rank(s) {undeclared}; every rank declares every array")
    metas = [m for m in per_rank if m is not None]
    gshapes: dict[tuple[int, ...], list[int]] = {}
    for r, m in enumerate(metas):
        gshapes.setdefault(m[0], []).append(r)
    if len(gshapes) > 1:
        detail = "; ".join(f"rank(s) {rs}: {g}" for g, rs in gshapes.items())
        raise ContractError(f"array {name!r}: ranks declare different global shapes ({detail})")
    gshape = metas[0][0]
    starts: list[dict[int, int]] = []
    for axis, extent in enumerate(gshape):
        sizes: dict[int, dict[int, list[int]]] = {}
        for r, (_, cshape, pos) in enumerate(metas):
            sizes.setdefault(pos[axis], {}).setdefault(cshape[axis], []).append(r)
        bad = [f"position {p}: " + ", ".join(f"rank(s) {rs} say {n}" for n, rs in by.items())
               for p, by in sorted(sizes.items()) if len(by) > 1]  # fmt: skip
        if bad:
            raise ContractError(
                f"array {name!r}: chunks at one position of axis {axis} must have one extent ({'; '.join(bad)})"
            )
        absent = sorted(set(range(max(sizes) + 1)) - set(sizes))
        if absent:
            raise ContractError(f"array {name!r}: no rank declares chunk_position {absent} on axis {axis}")
        extents = [next(iter(sizes[p])) for p in range(len(sizes))]
        if sum(extents) != extent:
            raise ContractError(
                f"array {name!r}: the chunks along axis {axis} (extents {extents}) cover {sum(extents)} cells; "
                f"global_shape says {extent}"
            )
        starts.append({p: sum(extents[:p]) for p in sizes})
    return [Block(gshape, tuple(starts[a][pos[a]] for a in range(len(gshape))), cshape) for _, cshape, pos in metas]


def block_layout(arrays_metadata: Mapping[str, Mapping[str, Any]], comm: Any) -> dict[str, Block]:
    """Map deisa-ray ``arrays_metadata`` to this rank's blocks (collective over ``comm``).

    ``chunk_position`` is the chunk's index in the grid of chunks and ``chunk_shape`` its
    extent, as in deisa-ray; a chunk's global start along an axis is the sum of the extents
    of the chunks at lower positions (``chunk_position * chunk_shape`` for even splits).

    Parameters
    ----------
    arrays_metadata
        ``{name: {"global_shape": ..., "chunk_shape": ..., "chunk_position": ...}}`` of this rank.
    comm
        An mpi4py communicator holding every rank of the simulation.

    Returns
    -------
    dict
        Array name to this rank's :class:`Block`.

    Raises
    ------
    ContractError
        The same on every rank when any rank's metadata is malformed or the ranks' chunks
        do not tile the arrays; the message names the ranks at fault.
    """
    rank = comm.Get_rank()
    mine: dict[str, tuple[tuple[int, ...], ...]] = {}
    problem = None
    try:
        mine = _local_metadata(arrays_metadata)
    except ContractError as exc:
        problem = (rank, type(exc).__name__, str(exc))
    everyone = comm.allgather((mine, problem))
    raise_common([p for _, p in everyone])
    names = sorted(set().union(*(m for m, _ in everyone)))
    blocks = {name: _blocks(name, [m.get(name) for m, _ in everyone]) for name in names}
    per_rank = [
        {
            n: ArraySpec(n, b[r].global_shape, np.dtype("f8"), start=b[r].start, shape=b[r].shape)
            for n, b in blocks.items()
        }
        for r in range(len(everyone))
    ]
    validate_layout(per_rank)  # overlaps, holes: the same verdict on every rank (same data everywhere)
    return {name: b[rank] for name, b in blocks.items()}


class Bridge:
    """deisa-ray's simulation-side ``Bridge`` on an :class:`insitu.Bridge`.

    Collective over ``comm``: every rank constructs one, sends every declared array at
    every timestep and calls :meth:`close` at the end.

    Parameters
    ----------
    comm
        The simulation's mpi4py communicator (``bridge_id`` is its rank).
    arrays_metadata
        ``{name: {"global_shape", "chunk_shape", "chunk_position"}}`` of this rank's chunk
        of each array (see :func:`block_layout`). The dtype is that of the chunks of the
        first timestep.
    run
        Run name shared with the analytics (else ``INSITU_RUN``, else ``SLURM_JOB_ID``).
    **overrides
        :class:`insitu.Config` fields, e.g. ``address=``, ``in_flight=``, ``deadline=``.

    Raises
    ------
    ContractError
        The same on every rank when any rank's metadata is bad.

    Notes
    -----
    The insitu bridge is created at the first timestep, which carries every declared
    array (the chunks' dtypes are known then). Each chunk but the last of a timestep is
    copied until the timestep is complete; then one :meth:`insitu.Bridge.send` carries them
    all (one more copy). Later timesteps may carry a subset (arrays at their own cadence):
    such a timestep is sent when the next one begins, or at :meth:`close`.
    """

    def __init__(
        self, comm: Any, arrays_metadata: dict[str, dict[str, Any]], *, run: str | None = None, **overrides: Any
    ) -> None:
        if comm is None:
            raise ContractError("comm is required: pass the simulation's mpi4py communicator")
        self._closed = True
        self._bridge: Any = None
        self.comm = comm
        self.bridge_id: int = comm.Get_rank()
        self.arrays_metadata = copy.deepcopy(arrays_metadata)
        self._blocks = block_layout(self.arrays_metadata, comm)
        self._run = run
        self._overrides = {"address": _address(), **overrides}
        self._pending: dict[str, Any] = {}
        self._pending_step: Any = None
        self._closed = False

    @property
    def insitu_bridge(self) -> Any:
        """The underlying :class:`insitu.Bridge` (``None`` before the first complete timestep)."""
        return self._bridge

    def send(self, array_name: str, chunk: Any, timestep: int) -> None:
        """Hand this rank's chunk of ``array_name`` at ``timestep`` to the analytics.

        The call that completes a timestep (every declared array given), or that begins the
        next timestep after one carrying a subset, is collective: it makes the one
        :meth:`insitu.Bridge.send` of the step. The others copy the chunk and return. A chunk
        sent again before its timestep is complete replaces the first.

        Parameters
        ----------
        array_name
            A declared array.
        chunk
            This rank's chunk (any array-like; copied).
        timestep
            Integer timestep; increases from timestep to timestep.

        Raises
        ------
        SendError
            On every rank when a timestep begins before the first one was complete, or
            any insitu ``send`` error (unknown array, shape, dtype, timestep order, a chunk
            missing on some ranks).
        """
        if self._closed:
            raise InsituError("send() on a closed Bridge")
        if self._pending and timestep != self._pending_step:
            self._flush()  # a timestep with a subset of the arrays (their own cadence)
        self._pending_step = timestep
        if set(self._blocks) - set(self._pending) - {array_name}:
            try:
                self._pending[array_name] = np.array(chunk, copy=True)  # the caller may reuse its buffer
            except (TypeError, ValueError):  # e.g. a ragged list: insitu's send reports it on every rank
                self._pending[array_name] = chunk
        else:
            self._pending[array_name] = chunk  # completes the timestep: copied once by insitu's send
            self._flush()

    def _flush(self) -> None:
        """The one collective insitu send of the pending timestep."""
        arrays, step = self._pending, self._pending_step
        self._pending = {}
        if self._bridge is None:
            self._connect(arrays)
        try:
            self._bridge.send(step, **arrays)
        except SendError as exc:
            raise SendError(f"timestep {step!r}: {exc}") from None

    def _connect(self, arrays: Mapping[str, Any]) -> None:
        """Collective: the insitu bridge, with the dtypes of the first timestep's chunks."""
        import insitu

        specs, local = [], None
        try:
            for name, b in sorted(self._blocks.items()):
                if name not in arrays:
                    raise SendError(
                        f"the first timestep {self._pending_step!r} lacks array {name!r}; the first timestep "
                        f"carries every declared array ({sorted(self._blocks)}): their dtypes are learnt from it"
                    )
                try:
                    dtype = np.asarray(arrays[name]).dtype
                except (TypeError, ValueError) as exc:
                    raise SendError(f"array {name!r}: not an array ({type(exc).__name__}: {exc})") from None
                specs.append(ArraySpec(name, b.global_shape, dtype, start=b.start, shape=b.shape))
        except InsituError as exc:
            local = exc
        agree(self.comm, local)
        self._bridge = insitu.Bridge(specs, comm=self.comm, run=self._run, **self._overrides)

    def get(self, key: str, timestep: int | None = None, default: Any = None) -> Any:
        """Feedback the analytics published with ``Deisa.set(key, value, timestep)``.

        The same on every rank: values change only at a :meth:`send` that completes a
        timestep (insitu's steering rule), never while the simulation waits.

        Parameters
        ----------
        key
            Feedback key.
        timestep
            The timestep the value was set for; ``None`` returns the retained
            ``[(timestep, value), ...]`` queue.
        default
            Returned when there is no such feedback.
        """
        raw = None if self._bridge is None else self._bridge.get(_FEEDBACK + key)
        if raw is None:
            return default
        queue = [(t, v) for t, v in json.loads(raw)]
        if timestep is None:
            return queue
        return next((v for t, v in reversed(queue) if t == timestep), default)

    def close(self, timestep: int | None = None) -> None:
        """End the stream: send a pending complete timestep, then close the insitu bridge.

        ``timestep`` (deisa-ray's end marker) is accepted and not needed: the analytics
        learns the end from insitu. Collective only if a timestep is still pending.
        """
        if self._closed:
            return
        self._closed = True
        try:
            if self._pending:
                self._flush()
        finally:
            if self._bridge is not None:
                self._bridge.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True) and self._bridge is not None:
            self._closed = True
            self._bridge.close()  # local: no MPI call (deisa-ray closes on deletion too)


# -- analytics side ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Window:
    """An array a callback reads and how many of its latest timesteps (deisa-ray's ``Window``)."""

    name: str
    size: int = 1


@functools.cache
def _deisa_array_class() -> Any:
    """Built on first use, so that a simulation importing this module never imports dask."""
    import dask.array as da

    class DeisaArray(da.Array):  # type: ignore[misc]
        """A Dask array of one timestep, with deisa-ray's ``t`` and ``timestep`` (and insitu's ``step``).

        Parameters are those of :class:`dask.array.Array`, with the timestep ``t`` after ``chunks``.
        """

        t: int
        step: int

        def __new__(cls, dask: Any, name: str, chunks: Any, t: int, dtype: Any = None, meta: Any = None,
                    shape: Any = None) -> Any:  # fmt: skip
            self = super().__new__(cls, dask, name, chunks, dtype=dtype, meta=meta, shape=shape)
            self.t = t
            self.step = t
            return self

        @property
        def timestep(self) -> int:
            """The timestep (deisa-ray's name)."""
            return int(self.t)

        @classmethod
        def of(cls, array: Any) -> Any:
            """The insitu array ``array`` (a step's Dask array) with ``t`` set to its ``step``."""
            return cls(array.dask, array.name, array.chunks, array.step, dtype=array.dtype, meta=array)

    DeisaArray.__module__ = __name__
    DeisaArray.__qualname__ = "DeisaArray"
    return DeisaArray


def __getattr__(name: str) -> Any:
    """``DeisaArray``: a :class:`dask.array.Array` subclass, created on first access."""
    if name == "DeisaArray":
        return _deisa_array_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _print_exception(exception: BaseException) -> None:
    """deisa-ray's default: print the exception and go on."""
    traceback.print_exception(exception, file=sys.stderr)


@dataclass(frozen=True, slots=True)
class _Registered:
    fn: Callable[..., Any]
    windows: tuple[Window, ...]
    handler: Callable[[BaseException], Any]
    when: str = "AND"


class Deisa:
    """deisa-ray's analytics entry point on an :class:`insitu.Analytics`.

    Parameters
    ----------
    feedback_queue_size
        Feedback values kept per key (for ``Bridge.get(key)`` without a timestep).
    max_simulation_ahead
        Accepted for compatibility; on insitu the simulation side sets how far it may run
        ahead (``INSITU_IN_FLIGHT``).
    ray_start
        Not supported: insitu connects to ``INSITU_ADDRESS`` (else ``RAY_ADDRESS``) itself.
    run
        Run name (else ``INSITU_RUN``, else ``SLURM_JOB_ID``).
    address
        Ray address (else ``INSITU_ADDRESS``, else ``RAY_ADDRESS``).
    **overrides
        :class:`insitu.Config` fields (``deadline=``, ...).

    Examples
    --------
    >>> from insitu.compat.deisa import Deisa, Window  # doctest: +SKIP
    >>> d = Deisa()  # doctest: +SKIP
    >>> @d.register(Window("U", size=2), "V")  # doctest: +SKIP
    ... def stats(U, V):
    ...     print(U[-1].t, float(U[-1].mean().compute()))
    >>> d.execute_callbacks()  # doctest: +SKIP
    """

    def __init__(self, feedback_queue_size: int = 1024, *, max_simulation_ahead: int = 1,
                 ray_start: Callable[[], None] | None = None, run: str | None = None, address: str | None = None,
                 **overrides: Any) -> None:  # fmt: skip
        if ray_start is not None:
            raise ContractError(
                "ray_start is not supported: insitu connects to INSITU_ADDRESS (else RAY_ADDRESS) itself"
            )
        if int(feedback_queue_size) <= 0:
            raise ContractError(f"feedback_queue_size must be > 0; got {feedback_queue_size}")
        self.feedback_queue_size = int(feedback_queue_size)
        self.max_simulation_ahead = max_simulation_ahead
        self.registered_callbacks: list[_Registered] = []
        self.analytics: Any = None
        self.summary: Any = None
        self._run, self._address, self._overrides = run, address, overrides
        self._feedback: dict[str, deque[tuple[Any, Any]]] = {}

    def register(
        self,
        *callback_args: str | Window,
        exception_handler: Callable[[BaseException], Any] = _print_exception,
        when: Literal["AND", "OR"] = "AND",
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: run ``fn(**{name: [arrays, oldest first]})`` at every timestep.

        Parameters
        ----------
        *callback_args
            Array names (window of 1) or :class:`Window` objects.
        exception_handler
            Called with the callback's exception; the run goes on (``TimeoutError`` and
            ``AssertionError`` still end it, as in deisa-ray).
        when
            ``"AND"``: run at the timesteps every array has. ``"OR"``: run at the timesteps any
            of them has, once each was seen; an array without the timestep passes its latest
            window (as in deisa-ray).
        """

        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            return self.register_callback(fn, *callback_args, exception_handler=exception_handler, when=when)

        return deco

    def register_callback(self, callback: Callable[..., Any], *callback_args: str | Window,
                          exception_handler: Callable[[BaseException], Any] = _print_exception,
                          when: Literal["AND", "OR"] = "AND") -> Callable[..., Any]:  # fmt: skip
        """Register ``callback`` (see :meth:`register`); returns it."""
        if when not in ("AND", "OR"):
            raise ContractError(f"when must be 'AND' or 'OR'; got {when!r}")
        windows = []
        for arg in callback_args:
            w = Window(arg) if isinstance(arg, str) else arg
            if not isinstance(w, Window):
                raise ContractError(f"callback arguments are array names or Window objects; got {arg!r}")
            windows.append(Window(w.name, 1 if w.size is None else int(w.size)))
        if not windows:
            raise ContractError(f"callback {callback.__name__} reads no array: name at least one")
        if any(w.size < 1 for w in windows):
            raise ContractError(f"window sizes must be >= 1; got {[(w.name, w.size) for w in windows]}")
        self.registered_callbacks.append(_Registered(callback, tuple(windows), exception_handler, when))
        return callback

    def execute_callbacks(self) -> None:
        """Run the callbacks on every timestep until the simulation closes (blocking).

        Raises
        ------
        insitu.errors.CallbackError
            A callback raised ``TimeoutError`` or ``AssertionError``, or its handler raised.
        insitu.errors.SimulationFailedError
            A simulation rank died before closing.
        """
        import insitu

        if not self.registered_callbacks:
            raise ContractError("register at least one callback before calling execute_callbacks()")
        self.analytics = insitu.Analytics(run=self._run, address=self._address or _address(), **self._overrides)
        for reg in self.registered_callbacks:
            self._on_step(reg)
        try:
            self.summary = self.analytics.run()
        finally:
            self.analytics = None

    def _on_step(self, reg: _Registered) -> None:
        names = list(dict.fromkeys(w.name for w in reg.windows))
        sizes = {w.name: w.size for w in reg.windows}

        def handle(step: int, exc: BaseException) -> None:
            if isinstance(exc, TimeoutError | AssertionError):
                raise exc
            reg.handler(exc)

        wrap = _deisa_array_class().of

        latest: dict[str, list[Any]] = {}  # "OR": each array's latest window (insitu's "any" passes [])

        def call(step: int, **arrays: list[Any]) -> None:
            latest.update({n: a for n, a in arrays.items() if a})
            if any(n not in latest for n in names):
                return  # deisa-ray's "OR" waits until every array was seen once
            reg.fn(**{n: [wrap(a) for a in latest[n][-sizes[n] :]] for n in names})

        call.__name__ = getattr(reg.fn, "__name__", "callback")
        when = When.ANY if reg.when == "OR" else When.ALL
        self.analytics.on_step(*names, window=max(sizes.values()), partial=True, on_error=handle, when=when)(call)

    def set(self, key: str, value: Any, timestep: int) -> None:
        """Publish feedback for ``Bridge.get(key, timestep)`` (while :meth:`execute_callbacks` runs).

        Timesteps of one key must increase. Values travel as JSON (numbers, strings,
        booleans, ``None``, lists, dicts).

        Raises
        ------
        ContractError
            Outside :meth:`execute_callbacks`, or a timestep that does not increase.
        SteeringValueError
            A key that is not a string, or a value JSON cannot carry.
        """
        if not isinstance(key, str):
            raise SteeringValueError(f"feedback keys are strings; got {key!r}")
        if self.analytics is None:
            raise ContractError("Deisa.set is available while execute_callbacks() runs (from a callback)")
        queue = self._feedback.setdefault(key, deque(maxlen=self.feedback_queue_size))
        if queue and not timestep > queue[-1][0]:
            raise ContractError(
                f"feedback timestep {timestep!r} for key {key!r} does not follow {queue[-1][0]!r}; "
                "timesteps of one key must increase"
            )
        try:
            payload = json.dumps([*([t, v] for t, v in queue), [timestep, value]])
        except (TypeError, ValueError) as exc:
            raise SteeringValueError(f"feedback {key!r}: on insitu values travel as JSON; {exc}") from None
        queue.append((timestep, value))
        self.analytics.set(_FEEDBACK + key, payload)
