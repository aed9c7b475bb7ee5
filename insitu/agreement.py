"""The vector of a send's one allreduce, and what every rank decides from it (no MPI here).

Every ``Bridge.send`` reduces one int64 vector with ``MAX`` (values wanted as a minimum are
negated): eleven fixed slots, then two per declared array (sorted by name): "some rank passed
it in this call" and "some rank owning a block of it did not". From the agreed vector every
rank knows the call's arrays, and a rank owning a block it did not pass knows it is to blame.

Examples
--------
>>> a = Agreement(("u", "v"), owns=lambda name: True)
>>> a.fill({"u"})
>>> a.agreed[:] = a.vec  # one rank: the reduction is the identity
>>> a.call(), a.blamed()
(('u',), False)
>>> a.missing({"u"}, lambda name: (0, 0), 3) is None
True
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import numpy as np

from insitu.errors import SendError

__all__ = ["BROKEN", "COMPLETED", "ERR", "FAILED", "NO_SLOT", "STATE", "STATE_MAX", "STEP_MAX", "STEP_MIN",
           "TIMED_OUT", "VERSION", "Agreement", "Fate"]  # fmt: skip

ERR, STEP_MAX, STEP_MIN, COMPLETED, VERSION, FAILED, NO_SLOT, TIMED_OUT, STATE, BROKEN, STATE_MAX = range(11)
FIXED = 11


class Fate(enum.Enum):
    """What became of the current step at its first call (its later calls follow it)."""

    NONE = 0
    SENT = 1
    SKIPPED = 2
    DROPPED = 3


class Agreement:
    """The send vector of one rank (``vec``) and the agreed one (``agreed``, filled by the allreduce)."""

    def __init__(self, names: tuple[str, ...], owns: Callable[[str], bool]) -> None:
        self.names = names
        self._owns = owns
        self.vec = np.zeros(FIXED + 2 * len(names), dtype=np.int64)
        self.agreed = np.zeros_like(self.vec)

    def fill(self, passed: set[str] | None) -> None:
        """The per-array slots: ``passed`` is what this rank passed in the call (``None``: not a call)."""
        for i, name in enumerate(self.names):
            sent = passed is not None and name in passed
            self.vec[FIXED + 2 * i] = int(sent)
            self.vec[FIXED + 2 * i + 1] = int(passed is not None and not sent and self._owns(name))

    def call(self) -> tuple[str, ...]:
        """The arrays of the agreed call: those any rank passed (sorted)."""
        return tuple(n for i, n in enumerate(self.names) if self.agreed[FIXED + 2 * i])

    def blamed(self) -> bool:
        """Whether a rank owning a block of an array of the call did not pass it (that rank reports it)."""
        return any(self.agreed[FIXED + 2 * i] and self.agreed[FIXED + 2 * i + 1] for i in range(len(self.names)))

    def missing(self, passed: set[str], block_of: Callable[[str], tuple[int, ...]], step: int) -> SendError | None:
        """This rank's error if it owns a block of an array of the call and did not pass it."""
        for i, name in enumerate(self.names):
            if self.agreed[FIXED + 2 * i] and name not in passed and self._owns(name):
                return SendError(
                    f"array {name!r} is missing (this rank owns block {block_of(name)}; other ranks sent it at "
                    f"step {step}): every rank owning a block of an array passes it in the same call"
                )
        return None
