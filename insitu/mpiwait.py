"""Waiting for the other ranks without spinning: non-blocking collectives polled with short sleeps.

A rank that reaches a blocking MPI collective first busy-polls until the last one arrives
(MPICH spins, ``sched_yield`` at best). When ranks share cores with insitu's node process,
Ray and the analytics (a node with more ranks than cores, or any node during set-up, when
rank 0 registers the run and the others wait), the spinning ranks take the CPU from exactly
the processes they wait for. Every collective of a rank's set-up and of each ``send`` waits
here instead: it polls ``Test`` for ``spin`` seconds (ranks that arrive together lose no
latency), then sleeps between polls, each pause a tenth of the time waited so far (so the
sleeps add at most ~10 % to a wait, never more than ``cap``).

Examples
--------
>>> from mpi4py import MPI  # doctest: +SKIP
>>> wait_gently(MPI.COMM_WORLD.Ibarrier())  # doctest: +SKIP
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["SETUP_CAP_S", "SPIN_S", "STEP_CAP_S", "gentle_barrier", "wait_gently"]

SPIN_S = 1e-4
"""Seconds of busy polling before the first sleep."""
STEP_CAP_S = 1e-3
"""Longest pause between polls in a step's agreement: at most this much latency is added."""
SETUP_CAP_S = 1e-2
"""Longest pause during set-up, where waits last seconds (rank 0 registering the run)."""


def wait_gently(request: Any, spin: float = SPIN_S, cap: float = STEP_CAP_S) -> None:
    """Wait for an MPI ``request``: poll ``request.Test()`` for ``spin`` s, then between sleeps of a
    tenth of the time waited, at most ``cap`` s."""
    start = time.perf_counter()
    while time.perf_counter() - start < spin:
        if request.Test():
            return
    while not request.Test():
        # a pause of at most a tenth of the time waited so far: the latency a sleep adds stays
        # under 10 % of the imbalance that made this rank wait
        time.sleep(min(cap, max(1e-5, 0.1 * (time.perf_counter() - start))))


def gentle_barrier(comm: Any, cap: float = SETUP_CAP_S) -> None:
    """A barrier on ``comm`` that waits with :func:`wait_gently` (a blocking collective right after
    it then finds every rank there and does not spin)."""
    wait_gently(comm.Ibarrier(), cap=cap)
