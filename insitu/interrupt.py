"""SIGTERM and SIGINT as an exception in a command's main thread, so that its clean-ups run.

A command of insitu (``insitu demo``, ``record``, ``replay``, ``launch``, ...) or the benchmark
harness starts things it must end: a private Ray cluster, subprocesses, a consumer of a run.
They are released by the ``with``/``finally`` blocks they were made in; Python runs those on
an exception but not when SIGTERM's default action ends the process. :func:`terminated_cleanly`
turns either signal into :class:`Interrupted` while the block runs, and puts the previous
handlers back after. Simulation processes never use it: their signals are their own.

Examples
--------
>>> import os, signal
>>> from insitu.interrupt import Interrupted, terminated_cleanly
>>> try:
...     with terminated_cleanly():
...         try:
...             os.kill(os.getpid(), signal.SIGTERM)
...         finally:
...             print("cleaned up")
... except Interrupted as exc:
...     print(exc, exc.exit_code)
cleaned up
interrupted by SIGTERM 143
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = ["Interrupted", "end_processes", "terminated_cleanly"]


class Interrupted(BaseException):
    """SIGTERM or SIGINT reached a command: unwinds it like ``KeyboardInterrupt`` (not caught by
    ``except Exception``), so its clean-ups run.

    Parameters
    ----------
    signum
        The signal received.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by the signal: 128 + its number."""
        return 128 + self.signum


@contextlib.contextmanager
def terminated_cleanly() -> Iterator[None]:
    """While the block runs (in the main thread), SIGTERM and SIGINT raise :class:`Interrupted`.

    The previous handlers come back when the block ends. A second signal during the clean-ups
    raises again, so a hung clean-up can still be interrupted.
    """

    def interrupt(signum: int, _frame: object) -> None:
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def end_processes(procs: Sequence[subprocess.Popen[Any]], grace: float = 10.0) -> None:
    """End the processes a command started: SIGTERM to each one still running (``mpiexec`` forwards
    it to its ranks and removes its own files), then SIGKILL to any not gone ``grace`` s later.

    Examples
    --------
    >>> import subprocess, sys
    >>> proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    >>> end_processes([proc], grace=5)
    >>> proc.returncode
    -15
    """
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
