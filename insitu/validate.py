"""Local checks of the simulation side, run before every collective (no MPI, no Ray here).

Each check returns (or raises) an :mod:`insitu.errors` exception instead of letting any
other exception escape on one rank: the collective that follows carries it to every rank,
so one bad rank never hangs or splits the others. Also the guard that keeps the
simulation's signal handlers (:func:`kept_signals`).

Examples
--------
>>> import numpy as np
>>> from insitu.layout import ArraySpec
>>> specs = as_specs([ArraySpec("u", (4,), "f8", start=(0,), shape=(4,))])
>>> check_send(3, {"u": np.zeros(4)}, specs, {"u": (0,)}, last_step=2)
(3, None)
>>> check_send(2**63, {"u": np.zeros(4)}, specs, {"u": (0,)}, last_step=2)[1]
SendError('step 9223372036854775808 is outside the 64-bit range of steps [-4611686018427387903, 2**63 - 1]')
>>> check_send(3, {"u": {"a": 1}}, specs, {"u": (0,)}, last_step=2)[1]
SendError("'u' must be a numpy.ndarray; got dict")
"""

from __future__ import annotations

import operator
import signal
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np

from insitu.errors import ContractError, SendError
from insitu.layout import ArraySpec

__all__ = ["KEPT_SIGNALS", "MIN_STEP", "as_specs", "check_send", "kept_signals"]

NO_STEP = -(2**62)
"""The previous step of a bridge that has not sent yet (below every valid step)."""
MIN_STEP = NO_STEP + 1
MAX_STEP = 2**63 - 1
KEPT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
"""Signals whose handlers belong to the simulation: insitu leaves them as it found them."""


def as_specs(arrays: Iterable[ArraySpec] | Mapping[str, ArraySpec]) -> dict[str, ArraySpec]:
    """This rank's declarations by name (``ContractError`` for anything else)."""
    try:
        items = list(arrays.values()) if isinstance(arrays, Mapping) else list(arrays)
    except TypeError:
        raise ContractError(
            f"arrays must be a sequence or mapping of insitu.ArraySpec; got {type(arrays).__name__}"
        ) from None
    out: dict[str, ArraySpec] = {}
    for spec in items:
        if not isinstance(spec, ArraySpec):
            raise ContractError(f"arrays must be insitu.ArraySpec objects; got {type(spec).__name__}")
        if spec.name in out:
            raise ContractError(f"array {spec.name!r} is declared twice on this rank")
        out[spec.name] = spec
    if not out:
        raise ContractError("a Bridge needs at least one ArraySpec")
    return out


def check_send(
    step: Any,
    arrays: Mapping[str, Any],
    specs: Mapping[str, ArraySpec],
    blocks: Mapping[str, tuple[int, ...] | None],
    last_step: int,
) -> tuple[int, SendError | None]:
    """Check one rank's ``send`` input; return the step (0 if unusable) and the problem, if any.

    Never raises: whatever the input (ragged lists, dicts, huge integers, objects whose
    ``__len__`` fails), the problem is returned, to be agreed by every rank.

    Parameters
    ----------
    step
        The step passed to ``send``.
    arrays
        Array name to value, as passed to ``send``.
    specs
        This rank's declarations.
    blocks
        The block index this rank owns of each array (for the messages).
    last_step
        The previous step sent (``NO_STEP`` before the first). The same step again is a
        further call of that step (its arrays must differ from the earlier calls': checked
        collectively by the bridge, which knows what every rank sent).
    """
    try:
        step = operator.index(step)
    except TypeError:
        return 0, SendError(f"step must be an integer; got {type(step).__name__}")
    if not MIN_STEP <= step <= MAX_STEP:
        return 0, SendError(f"step {step} is outside the 64-bit range of steps [{MIN_STEP}, 2**63 - 1]")
    if step < last_step:
        return step, SendError(f"step {step} is below the previous step {last_step} (steps never decrease)")
    try:
        return step, _check_arrays(arrays, specs, blocks)
    except Exception as exc:  # noqa: BLE001 - any surprise on one rank becomes that rank's agreed SendError
        return step, SendError(f"could not check the arrays: {type(exc).__name__}: {exc}")


def _check_arrays(
    arrays: Mapping[str, Any], specs: Mapping[str, ArraySpec], blocks: Mapping[str, tuple[int, ...] | None]
) -> SendError | None:
    unknown = sorted(set(arrays) - set(specs))
    if unknown:
        return SendError(f"unknown array(s) {unknown}; declared: {sorted(specs)}")
    for name, spec in specs.items():
        value = arrays.get(name)
        if not spec.owns_block:
            if value is not None and _size(value) != 0:
                return SendError(f"sent {name!r} although it owns no block of it (send None or omit it)")
            continue
        if value is None:
            continue  # not sent in this call: the bridge checks that no other rank sent it
        if not isinstance(value, np.ndarray):
            return SendError(f"{name!r} must be a numpy.ndarray; got {type(value).__name__}")
        if value.shape != spec.shape:
            return SendError(
                f"sent {name!r} with shape {value.shape}; its declared block is {spec.shape} at {spec.start}"
            )
        if value.dtype.newbyteorder("=") != spec.dtype.newbyteorder("="):
            return SendError(
                f"sent {name!r} with dtype {value.dtype}; declared {spec.dtype}: convert it with "
                f".astype({spec.dtype.str!r}) or declare {value.dtype.str!r} (either byte order is accepted)"
            )
    return None


def _size(value: Any) -> int:
    """Element count of anything array-like; -1 when numpy cannot tell (e.g. a ragged list)."""
    try:
        return int(np.size(value))
    except (ValueError, TypeError):
        return -1


@contextmanager
def kept_signals() -> Iterator[None]:
    """Restore the Python-level handlers of :data:`KEPT_SIGNALS` on exit, if anything changed them.

    Only the main thread may set handlers; elsewhere this only observes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {sig: signal.getsignal(sig) for sig in KEPT_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in before.items():
            # always set again: Ray's core worker puts its C-level handler back to SIG_DFL when it
            # shuts down while Python still reports the handler it knew
            if handler is not None:
                signal.signal(sig, handler)
