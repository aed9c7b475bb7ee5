"""``insitu analytics --supervise``: run an analytics in a child process and restart it when it dies or hangs.

The child gets ``INSITU_HEARTBEAT_FILE`` (its :class:`insitu.Analytics` touches the file at every
poll, at least once a second while idle, and before every callback), ``INSITU_RESTARTS_LEFT`` and
``INSITU_RESTART_GRACE``. The supervisor restarts the child when it exits non-zero, is killed by a
signal, or leaves its heartbeat older than ``heartbeat_deadline`` seconds (then it gets SIGKILL;
before its first heartbeat, while Python and Ray start, the deadline is at least 60 s), after
``1, 2, 4, ...`` seconds (at most ``backoff_cap``), up to ``max_restarts`` times, unless the child
reported that the run itself ended (the simulation failed or a node was lost:
``<heartbeat file>.over``), which no restart can help. A restarted analytics attaches to the run
again as a new consumer (a higher incarnation) and resumes at the next complete step with its
windows refilled; the run's head keeps the ranks dropping steps, under either failure policy,
until it attaches or ``INSITU_RESTART_GRACE`` seconds pass. Once restarts are exhausted the last
failure is final: policy ``raise`` applies and the supervisor exits with the child's code
(128 + signal for a signal). The child's stderr passes through the supervisor, which keeps
its last 50 lines; the next incarnation gets them (``INSITU_PREVIOUS_STDERR``) and hands them
to the run's head with its attach, where ``insitu status`` shows them with the failed consumer.

Examples
--------
>>> command_of(["stats.py", "--out", "x"])[1:]
['stats.py', '--out', 'x']
>>> backoff(3, cap=30.0)
4.0
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from insitu.errors import ContractError

__all__ = ["STDERR_LINES", "backoff", "command_of", "supervise"]

_START_ALLOWANCE = 60.0  # seconds a restarted analytics may take to import and attach
STDERR_LINES = 50
"""Lines of a failed analytics' stderr its restart hands to the run (``insitu status``)."""


def command_of(argv: Sequence[str]) -> list[str]:
    """The child's command: a ``.py`` script runs with this Python, anything else as given."""
    if not argv:
        raise ContractError("insitu analytics needs a script or command to run (e.g. stats.py --out dir)")
    return [sys.executable, *argv] if argv[0].endswith(".py") else list(argv)


def backoff(attempt: int, cap: float) -> float:
    """Seconds before restart number ``attempt`` (1, 2, 4, ... at most ``cap``)."""
    return float(min(cap, 2 ** (attempt - 1)))


def _stop(proc: subprocess.Popen[bytes], hung: bool = False) -> None:
    """SIGTERM to the child's process group, SIGKILL after 5 s; a hung child gets SIGKILL at once (on
    SIGTERM it could still detach from the run cleanly, which is not the failure it is)."""
    for sig, wait in ((signal.SIGKILL, 30.0),) if hung else ((signal.SIGTERM, 5.0), (signal.SIGKILL, 30.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
        if proc.poll() is not None:
            return


def _relay_stderr(proc: subprocess.Popen[bytes], tail: deque[str]) -> None:
    """Copy the child's stderr to ours, keeping its last lines (the failure's context)."""
    assert proc.stderr is not None
    for raw in iter(proc.stderr.readline, b""):
        line = raw.decode(errors="replace")
        tail.append(line)
        sys.stderr.write(line)
        sys.stderr.flush()
    proc.stderr.close()


def _watch(proc: subprocess.Popen[bytes], beat: Path, deadline: float) -> tuple[int, str]:
    """Wait for the child to end or hang; its exit code and what happened.

    Until the child's first heartbeat (Python and Ray starting, attaching) the deadline is at
    least ``_START_ALLOWANCE``.
    """
    started = beat.stat().st_mtime
    while True:
        try:
            code = proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            last = beat.stat().st_mtime
            silent = time.time() - last
            if silent > (deadline if last != started else max(deadline, _START_ALLOWANCE)):
                _stop(proc, hung=True)
                return 1, f"the analytics gave no heartbeat for {silent:.0f} s (deadline {deadline:.0f} s): hung"
            continue
        if code < 0:
            return 128 - code, f"the analytics was killed by {signal.Signals(-code).name}"
        return code, f"the analytics exited with status {code}"


def supervise(argv: Sequence[str], max_restarts: int = 3, heartbeat_deadline: float = 300.0,
              backoff_cap: float = 30.0) -> int:  # fmt: skip
    """Run the analytics ``argv`` and restart it as the module docstring says; return the exit code.

    Parameters
    ----------
    argv
        The analytics script and its arguments (a ``.py`` file runs with this Python).
    max_restarts
        Restarts allowed after the first start.
    heartbeat_deadline
        Seconds without a heartbeat after which the analytics counts as hung (a callback that
        legitimately runs longer needs a larger value).
    backoff_cap
        Longest pause before a restart.
    """
    if max_restarts < 0 or heartbeat_deadline <= 0:
        raise ContractError(f"--max-restarts must be >= 0 and --heartbeat-deadline > 0; got {max_restarts}, "
                            f"{heartbeat_deadline}")  # fmt: skip
    cmd = command_of(argv)
    attempt = 0
    with tempfile.TemporaryDirectory(prefix="insitu-supervise-") as tmp:
        beat, tail_file = Path(tmp) / "heartbeat", Path(tmp) / "stderr-tail"
        while True:
            beat.touch()
            left = max_restarts - attempt
            grace = (backoff(attempt + 1, backoff_cap) if left else 0.0) + _START_ALLOWANCE
            env = {**os.environ, "INSITU_HEARTBEAT_FILE": str(beat), "INSITU_RESTARTS_LEFT": str(left),
                   "INSITU_RESTART_GRACE": str(grace)}  # fmt: skip
            if tail_file.exists():  # the previous incarnation's last stderr lines, for the run's status
                env["INSITU_PREVIOUS_STDERR"] = str(tail_file)
            proc = subprocess.Popen(cmd, env=env, start_new_session=True, stderr=subprocess.PIPE)
            tail: deque[str] = deque(maxlen=STDERR_LINES)
            relay = threading.Thread(target=_relay_stderr, args=(proc, tail), daemon=True)
            relay.start()
            try:
                code, what = _watch(proc, beat, heartbeat_deadline)
            finally:
                if proc.poll() is None:  # interrupted (SIGTERM/SIGINT to the supervisor): the child goes too
                    _stop(proc)
                relay.join(10)
            tail_file.write_text("".join(tail))
            if code == 0:
                return 0
            over = beat.with_name(beat.name + ".over")
            if over.exists():  # the run itself ended badly (simulation failed, node lost): nothing to resume
                print(f"insitu analytics: {what}; not restarted, the run ended: {over.read_text()[:500]}",
                      file=sys.stderr, flush=True)  # fmt: skip
                return code
            if not left:
                print(f"insitu analytics: {what}; no restart left ({max_restarts} used)", file=sys.stderr, flush=True)
                return code
            attempt += 1
            pause = backoff(attempt, backoff_cap)
            print(f"insitu analytics: {what}; restart {attempt} of {max_restarts} in {pause:.0f} s", file=sys.stderr,
                  flush=True)  # fmt: skip
            time.sleep(pause)
