"""The Python half of ``libinsitu``, the C-callable shim (``sim_adapters/c``).

``libinsitu.so`` embeds CPython and calls the functions below with plain Python values
(ints, strings, tuples, ``None`` for NULL pointers). They never raise: each returns a
status code of ``insitu.h`` and a message, so no Python exception crosses into C.
Every validation that could differ between ranks is folded into the collective
``Bridge`` calls, so a bad call on one rank never leaves the others waiting.

Examples
--------
>>> CStatus.OK.value, CStatus.DISABLED.name
(0, 'DISABLED')
>>> DTYPES[CDtype.FLOAT64]
dtype('float64')
"""

from __future__ import annotations

import ctypes
import logging
import math
import sys
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np

from insitu.errors import (
    AnalyticsFailedError,
    ContractError,
    InsituError,
    SendError,
    StepTimeoutError,
)

__all__ = ["CBridge", "CDtype", "COrder", "CStatus", "DTYPES", "check_mpi", "finalize", "get", "init", "mpi_needed",
           "send"]  # fmt: skip

log = logging.getLogger(__name__)

_MAX_NDIM = 8


class CStatus(IntEnum):
    """``insitu_status_t`` (values must match ``insitu.h``; a test checks)."""

    OK = 0
    ERR_NULL = 1
    ERR_ARG = 2
    ERR_NAME = 3
    ERR_SIZE = 4
    ERR_DTYPE = 5
    ERR_STATE = 6
    ERR_SEND = 7
    ERR_CONTRACT = 8
    ERR_TIMEOUT = 9
    ERR_ANALYTICS = 10
    ERR_RUNTIME = 11
    ERR_VERSION = 12
    DISABLED = 13
    ERR_MPI_MISMATCH = 14


FATAL = frozenset({CStatus.ERR_CONTRACT, CStatus.ERR_TIMEOUT, CStatus.ERR_ANALYTICS, CStatus.ERR_RUNTIME,
                   CStatus.ERR_MPI_MISMATCH})  # fmt: skip


class CDtype(IntEnum):
    """``insitu_dtype_t``."""

    FLOAT64 = 0
    FLOAT32 = 1
    INT64 = 2
    INT32 = 3
    UINT8 = 4
    INT8 = 5


class COrder(IntEnum):
    """``insitu_order_t``."""

    C = 0
    F = 1


class SteeringKind(IntEnum):
    """Which ``insitu_get_*`` asks."""

    INT = 0
    DOUBLE = 1
    STRING = 2


DTYPES: dict[int, np.dtype[Any]] = {
    CDtype.FLOAT64: np.dtype("f8"),
    CDtype.FLOAT32: np.dtype("f4"),
    CDtype.INT64: np.dtype("i8"),
    CDtype.INT32: np.dtype("i4"),
    CDtype.UINT8: np.dtype("u1"),
    CDtype.INT8: np.dtype("i1"),
}


class _LocalError(Exception):
    def __init__(self, status: CStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class CBridge:
    """One ``insitu_bridge_t`` on the Python side."""

    bridge: Any = None
    rank: int = 0
    names: dict[str, tuple[np.dtype[Any], tuple[int, ...] | None]] = field(default_factory=dict)
    disabled: str = ""


def _status_of(exc: BaseException) -> CStatus:
    if isinstance(exc, AnalyticsFailedError):
        return CStatus.ERR_ANALYTICS
    if isinstance(exc, StepTimeoutError):
        return CStatus.ERR_TIMEOUT
    if isinstance(exc, SendError):
        return CStatus.ERR_SEND
    if isinstance(exc, ContractError):
        # the Bridge reports every set-up failure as one agreed ContractError; an unreachable
        # cluster or node actor is a run-time condition, not inconsistent declarations
        return CStatus.ERR_RUNTIME if "cannot reach" in str(exc) else CStatus.ERR_CONTRACT
    return CStatus.ERR_RUNTIME


def _disable(h: CBridge, status: CStatus, message: str) -> tuple[int, str]:
    """Fatal error: log it once (rank 0) and turn every later call into a no-op."""
    h.disabled = message
    if h.bridge is not None:
        try:
            h.bridge.close()
        except Exception:  # noqa: BLE001 - already failing; the first error is the one reported
            log.debug("close after a fatal error failed", exc_info=True)
        h.bridge = None
    if h.rank == 0:
        print(f"insitu: error: {status.name}: {message}; insitu is disabled for the rest of the run",
              file=sys.stderr, flush=True)  # fmt: skip
    return int(status), message


def _shape(value: tuple[int, ...] | None, ndim: int, what: str) -> tuple[int, ...]:
    if value is None:
        raise _LocalError(CStatus.ERR_NULL, f"{what} is NULL")
    if len(value) != ndim:
        raise _LocalError(CStatus.ERR_ARG, f"{what} has {len(value)} entries; ndim is {ndim}")
    return tuple(int(v) for v in value)


def _dtype(code: int, what: str) -> np.dtype[Any]:
    if code not in DTYPES:
        raise _LocalError(CStatus.ERR_ARG, f"{what}: unknown dtype code {code} (see insitu_dtype_t)")
    return DTYPES[code]


def _required(items: list[tuple[Any, ...]] | None, what: str) -> list[tuple[Any, ...]]:
    if items is None:
        raise _LocalError(CStatus.ERR_NULL, f"{what} is NULL")
    if not items:
        raise _LocalError(CStatus.ERR_ARG, f"the number of {what} must be at least 1")
    return items


def _decl(decl: tuple[Any, ...], cart: Any) -> Any:
    from insitu.layout import ArraySpec

    name, dtype_code, ndim, gshape, lshape, start = decl
    if not name:
        raise _LocalError(CStatus.ERR_NULL, "an array declaration has a NULL or empty name")
    if not 1 <= ndim <= _MAX_NDIM:
        raise _LocalError(CStatus.ERR_ARG, f"array {name!r}: ndim {ndim} is outside 1..{_MAX_NDIM}")
    dtype = _dtype(dtype_code, f"array {name!r}")
    g = _shape(gshape, ndim, f"array {name!r}: global_shape")
    local = _shape(lshape, ndim, f"array {name!r}: local_shape")
    if math.prod(local) == 0:
        return ArraySpec.no_block(name, g, dtype)
    if start is None:
        if cart is None:
            raise _LocalError(CStatus.ERR_ARG, f"array {name!r}: start is NULL but the communicator is not Cartesian")
        spec = ArraySpec.from_cart(name, cart, local, dtype)
        if spec.global_shape != g:
            raise _LocalError(CStatus.ERR_SIZE, f"array {name!r}: global_shape {g} but the blocks add up to "
                                                f"{spec.global_shape}")  # fmt: skip
        return spec
    return ArraySpec(name, g, dtype, start=_shape(start, ndim, f"array {name!r}: start"), shape=local)


def mpi_needed() -> tuple[int, str, str, str]:
    """First half of ``insitu_start_mpi``: (status, message, mpi4py's MPI extension, the libmpi it needs).

    Never imports ``mpi4py.MPI`` (:func:`insitu.mpilib.mpi4py_extension`).
    """
    from insitu.mpilib import mpi4py_extension

    try:
        extension, soname = mpi4py_extension()
    except Exception as exc:  # noqa: BLE001 - no exception may cross into C
        return int(CStatus.ERR_MPI_MISMATCH), f"cannot tell which MPI library mpi4py would use: {exc}", "", ""
    return int(CStatus.OK), "", str(extension), soname


def check_mpi(program_version: str | None, program_path: str | None, extension: str, soname: str,
              loaded_path: str | None, same: int) -> tuple[int, str]:  # fmt: skip
    """Second half of ``insitu_start_mpi``: the verdict of :func:`insitu.mpilib.verdict` as (status, message)."""
    from insitu.mpilib import locate, verdict

    try:
        elsewhere = None if loaded_path else locate(soname)
        why = verdict(program_version or "", program_path, extension, soname, loaded_path, bool(same),
                      str(elsewhere) if elsewhere else None)  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - no exception may cross into C
        return int(CStatus.ERR_MPI_MISMATCH), f"cannot compare the MPI libraries: {exc}"
    return (int(CStatus.OK), "") if why is None else (int(CStatus.ERR_MPI_MISMATCH), why)


def init(comm_f: int, run: str | None, decls: list[tuple[Any, ...]] | None) -> tuple[int, str, CBridge]:
    """``insitu_init_f``: collective. Returns (status, message, handle); a fatal error disables the handle."""
    h = CBridge()
    return (*_init(h, comm_f, run, decls), h)


def _init(h: CBridge, comm_f: int, run: str | None, decls: list[tuple[Any, ...]] | None) -> tuple[int, str]:
    try:
        import mpi4py

        mpi4py.rc.initialize = False  # the simulation owns MPI_Init / MPI_Finalize
        mpi4py.rc.finalize = False
        from mpi4py import MPI

        if not MPI.Is_initialized() or MPI.Is_finalized():
            return _disable(h, CStatus.ERR_STATE, "MPI is not initialised (call MPI_Init before insitu_init)")
        comm = MPI.Comm.f2py(comm_f)
        h.rank = comm.Get_rank()
    except Exception as exc:  # noqa: BLE001 - no exception may cross into C
        return _disable(h, CStatus.ERR_RUNTIME, f"could not load mpi4py for the simulation's MPI: {exc}")
    from insitu.bridge import Bridge
    from insitu.comm import agree

    specs = []
    local: InsituError | None = None
    own: CStatus | None = None
    try:
        cart = comm if comm.Get_topology() == MPI.CART else None
        specs = [_decl(d, cart) for d in _required(decls, "arrays")]
    except _LocalError as exc:
        local, own = ContractError(str(exc)), exc.status
    except InsituError as exc:
        local = exc
    try:
        agree(comm, local)  # the same error on every rank, before anything connects
        h.bridge = Bridge(specs, comm=comm, run=run or None)
    except Exception as exc:  # noqa: BLE001 - no exception may cross into C
        return _disable(h, own or _status_of(exc), str(exc))
    h.names = {s.name: (s.dtype, s.shape) for s in specs}
    return int(CStatus.OK), ""


def _field(h: CBridge, f: tuple[Any, ...]) -> tuple[str, np.ndarray]:
    name, addr, dtype_code, order, ndim, mem, sel_start, sel_count, nelems = f
    if not name:
        raise _LocalError(CStatus.ERR_NULL, "a field has a NULL or empty name")
    if name not in h.names:
        raise _LocalError(CStatus.ERR_NAME, f"unknown array {name!r}; declared: {sorted(h.names)}")
    declared, local = h.names[name]
    if not addr:
        raise _LocalError(CStatus.ERR_NULL, f"field {name!r}: data is NULL")
    dtype = _dtype(dtype_code, f"field {name!r}")
    if dtype != declared:
        raise _LocalError(CStatus.ERR_DTYPE, f"field {name!r} is {dtype}; declared {declared}")
    if order not in (COrder.C, COrder.F):
        raise _LocalError(CStatus.ERR_ARG, f"field {name!r}: unknown order code {order}")
    if not 1 <= ndim <= _MAX_NDIM:
        raise _LocalError(CStatus.ERR_ARG, f"field {name!r}: ndim {ndim} is outside 1..{_MAX_NDIM}")
    mem = _shape(mem, ndim, f"field {name!r}: mem_shape")
    start = _shape(sel_start, ndim, f"field {name!r}: sel_start")
    count = _shape(sel_count, ndim, f"field {name!r}: sel_count")
    if math.prod(mem) != nelems or min(mem) < 0:
        raise _LocalError(CStatus.ERR_SIZE, f"field {name!r}: mem_shape {mem} holds {math.prod(mem)} elements; "
                                            f"nelems says {nelems}")  # fmt: skip
    if any(s < 0 or c < 0 or s + c > m for s, c, m in zip(start, count, mem, strict=True)):
        raise _LocalError(CStatus.ERR_SIZE, f"field {name!r}: selection start {start} count {count} does not fit "
                                            f"in mem_shape {mem}")  # fmt: skip
    if count != local:
        raise _LocalError(CStatus.ERR_SIZE, f"field {name!r}: sel_count {count}; the declared block is {local}")
    raw = (ctypes.c_char * (nelems * dtype.itemsize)).from_address(addr)
    whole = np.frombuffer(raw, dtype=dtype).reshape(mem, order="F" if order == COrder.F else "C")
    return name, whole[tuple(slice(s, s + c) for s, c in zip(start, count, strict=True))]


def send(h: CBridge, step: int, fields: list[tuple[Any, ...]] | None) -> tuple[int, str]:
    """``insitu_send``: collective; a local error rejects the step on every rank."""
    if h.disabled:
        return int(CStatus.DISABLED), f"insitu is disabled: {h.disabled}"
    arrays: dict[str, Any] = {}
    local: _LocalError | None = None
    try:
        for f in _required(fields, "fields"):
            name, view = _field(h, f)
            arrays[name] = view
    except _LocalError as exc:
        local = exc
    try:
        h.bridge._send(step, arrays, SendError(str(local)) if local else None)
    except SendError as exc:
        return int(local.status if local else CStatus.ERR_SEND), str(exc)
    except Exception as exc:  # noqa: BLE001 - no exception may cross into C
        return _disable(h, _status_of(exc), str(exc))
    return int(CStatus.OK), ""


def get(h: CBridge, key: str | None, kind: int) -> tuple[int, str, int, Any]:
    """``insitu_get_*``: (status, message, found, value); local, never blocks."""
    if h.disabled:
        return int(CStatus.DISABLED), f"insitu is disabled: {h.disabled}", 0, None
    if not key:
        return int(CStatus.ERR_NULL), "key is NULL or empty", 0, None
    missing = object()
    value = h.bridge.get(key, missing)
    if value is missing:
        return int(CStatus.OK), "", 0, None
    want = SteeringKind(kind)
    ok = {
        SteeringKind.INT: isinstance(value, (bool, int, np.integer)),
        SteeringKind.DOUBLE: isinstance(value, (bool, int, float, np.integer, np.floating)),
        SteeringKind.STRING: isinstance(value, str),
    }[want]
    if not ok:
        return (int(CStatus.ERR_DTYPE), f"steering value {key!r} is a {type(value).__name__}; "
                f"asked for {want.name.lower()}", 1, None)  # fmt: skip
    if want == SteeringKind.INT:
        return int(CStatus.OK), "", 1, int(value)
    if want == SteeringKind.DOUBLE:
        return int(CStatus.OK), "", 1, float(value)
    return int(CStatus.OK), "", 1, value.encode()


def finalize(h: CBridge) -> tuple[int, str]:
    """``insitu_finalize``: not collective."""
    if h.bridge is None:
        return int(CStatus.OK), ""
    bridge, h.bridge = h.bridge, None
    try:
        bridge.close()
    except Exception as exc:  # noqa: BLE001 - no exception may cross into C
        return int(_status_of(exc)), str(exc)
    return int(CStatus.OK), ""
