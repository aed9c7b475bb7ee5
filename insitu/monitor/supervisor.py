"""Modules of ``insitu monitor`` in supervised subprocesses (the rules are in docs/monitoring.md).

Each module is a ``python -m insitu.monitor.child`` process holding one end of a socket pair.
Every ``health_interval`` seconds its supervisor checks that the process is alive and sends a
:class:`~.protocol.Ping` that the module's event loop must answer within ``heartbeat_deadline``
seconds. An unhealthy module (exited, killed, or hung) is logged with the reason and the last
lines of its log, every request in flight to it is answered 503 with that reason (a stream that
had begun gets an ``error`` event, then ends), it is killed if still alive, and restarted as the
next incarnation after ``backoff(restarts)`` seconds, at most ``max_restarts`` times; after that
its routes answer 503 with the last reason. Requests that arrive while it restarts wait for it
(at most ``start_deadline`` seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from insitu.monitor.protocol import Call, Cancel, Chunk, Hello, Ping, Pong, Reply
from insitu.supervise import STDERR_LINES, backoff
from insitu.transport import decode_frames, encode_frame

__all__ = ["Module", "ModuleSpec", "ModuleState", "Settings", "Unavailable"]

log = logging.getLogger("insitu.monitor")


@dataclass(frozen=True, slots=True)
class ModuleSpec:
    """A module: its name, ``package.module:function`` and the routes (paths) it serves."""

    name: str
    target: str
    routes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Settings:
    """Supervision settings (``INSITU_MONITOR_*``, see :class:`insitu.Config`)."""

    health_interval: float = 1.0
    heartbeat_deadline: float = 5.0
    max_restarts: int = 5
    start_deadline: float = 60.0
    backoff_cap: float = 30.0


class ModuleState(enum.Enum):
    """Where a module stands."""

    STARTING = "starting"
    HEALTHY = "healthy"
    RESTARTING = "restarting"
    GAVE_UP = "gave-up"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class Unavailable:
    """The module could not answer (it failed, restarts, or gave up): the reason, for a 503."""

    reason: str


class Module:
    """One supervised module process and the requests in flight to it."""

    def __init__(self, spec: ModuleSpec, settings: Settings, env: dict[str, str]) -> None:
        self.spec = spec
        self.settings = settings
        self.env = env
        self.state = ModuleState.STARTING
        self.incarnation = 0
        self.restarts = 0
        self.pid: int | None = None
        self.last_failure = ""
        self.log_tail: deque[str] = deque(maxlen=STDERR_LINES)
        self._proc: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._calls: dict[int, asyncio.Queue[Reply | Chunk | Unavailable]] = {}
        self._next_id = 0
        self._changed = asyncio.Event()  # set at every change of state (then replaced)
        self._pong = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._logging: asyncio.Task[None] | None = None

    # -- life cycle ---------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """What ``/api/modules`` shows of it."""
        return {"name": self.spec.name, "state": self.state.value, "incarnation": self.incarnation,
                "restarts": self.restarts, "pid": self.pid, "routes": list(self.spec.routes),
                "last_failure": self.last_failure, "in_flight": len(self._calls)}  # fmt: skip

    def _set_state(self, state: ModuleState) -> None:
        self.state = state
        self._changed.set()
        self._changed = asyncio.Event()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def start(self) -> None:
        """Start the next incarnation (the health loop notices if it never says hello)."""
        self.incarnation += 1
        self.log_tail.clear()  # the tail logged at a failure is this incarnation's
        ours, theirs = socket.socketpair()
        env = {**self.env, "INSITU_MONITOR_FD": str(theirs.fileno())}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "insitu.monitor.child", self.spec.name, self.spec.target, env=env,
            pass_fds=(theirs.fileno(),), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        theirs.close()
        self._proc, self.pid = proc, proc.pid
        reader, self._writer = await asyncio.open_unix_connection(sock=ours)
        incarnation = self.incarnation
        self._spawn(self._read(reader, incarnation))
        self._logging = self._spawn(self._log(proc, incarnation))
        self._spawn(self._health(proc, incarnation))

    async def stop(self) -> None:
        """End the module process and every request to it (the monitor stops)."""
        self._set_state(ModuleState.STOPPED)
        self._abort(f"the monitor is stopping (module {self.spec.name})")
        await self._kill()
        for task in list(self._tasks):
            task.cancel()

    async def _kill(self) -> None:
        proc = self._proc
        if self._writer is not None:
            self._writer.close()
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 10)

    async def _read(self, reader: asyncio.StreamReader, incarnation: int) -> None:
        buffer = bytearray()
        while data := await reader.read(1 << 16):
            buffer += data
            for message in decode_frames(buffer):
                if isinstance(message, Hello):
                    log.info("module %s: incarnation %d ready (pid %d)", self.spec.name, incarnation, message.pid)
                    self._set_state(ModuleState.HEALTHY)
                elif isinstance(message, Pong):
                    self._pong = max(self._pong, message.n)
                elif isinstance(message, Reply | Chunk) and message.id in self._calls:
                    self._calls[message.id].put_nowait(message)

    async def _log(self, proc: asyncio.subprocess.Process, incarnation: int) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            text = line.decode(errors="replace").rstrip("\n")
            self.log_tail.append(text)
            print(f"[{self.spec.name}#{incarnation}] {text}", file=sys.stderr, flush=True)

    async def _health(self, proc: asyncio.subprocess.Process, incarnation: int) -> None:
        s = self.settings
        started = time.monotonic()
        n, sent = 0, 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), s.health_interval)
            if proc.returncode is not None:
                code = proc.returncode
                why = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
                return await self._fail(incarnation, why)
            now = time.monotonic()
            if self.state != ModuleState.HEALTHY:
                if now - started > s.start_deadline:
                    return await self._fail(incarnation, f"did not start within {s.start_deadline:.0f} s")
                continue
            if n and self._pong < n and now - sent > s.heartbeat_deadline:
                return await self._fail(
                    incarnation, f"hung: its event loop did not answer a health check within {s.heartbeat_deadline:g} s"
                )
            if self._pong >= n and self._writer is not None:
                n, sent = n + 1, now
                self._writer.write(encode_frame(Ping(n)))

    def _abort(self, reason: str) -> None:
        for queue in self._calls.values():
            queue.put_nowait(Unavailable(reason))

    async def _fail(self, incarnation: int, why: str) -> None:
        if incarnation != self.incarnation or self.state == ModuleState.STOPPED:
            return
        reason = f"module {self.spec.name} (incarnation {incarnation}, pid {self.pid}) {why}"
        self.last_failure = reason
        gave_up = self.restarts >= self.settings.max_restarts
        self._set_state(ModuleState.GAVE_UP if gave_up else ModuleState.RESTARTING)
        if self._logging is not None and self._proc is not None and self._proc.returncode is not None:
            with contextlib.suppress(TimeoutError):  # a dead module's last lines (its traceback) first
                await asyncio.wait_for(asyncio.shield(self._logging), 1.0)
        log.error("%s; its last log lines:\n%s", reason, "\n".join(self.log_tail) or "(none)")
        self._abort(reason)
        await self._kill()
        if gave_up:
            log.error("module %s: not restarted after %d restarts", self.spec.name, self.restarts)
            return
        self.restarts += 1
        await asyncio.sleep(backoff(self.restarts, self.settings.backoff_cap))
        if self.state == ModuleState.RESTARTING:
            self._pong = 0
            await self.start()

    # -- requests -----------------------------------------------------------------------
    async def _wait_ready(self) -> Unavailable | None:
        end = time.monotonic() + self.settings.start_deadline
        while self.state != ModuleState.HEALTHY:
            if self.state == ModuleState.GAVE_UP:
                return Unavailable(f"{self.last_failure}; not restarted after {self.restarts} restarts")
            if self.state == ModuleState.STOPPED or time.monotonic() >= end:
                return Unavailable(f"module {self.spec.name} is not ready ({self.state.value}): {self.last_failure}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), end - time.monotonic())
        return None

    async def request(self, route: str, query: tuple[tuple[str, str], ...], last_event_id: str = "",
                      ) -> AsyncIterator[Reply | Chunk | Unavailable]:  # fmt: skip
        """Send one call; yield its :class:`Reply`, or its chunks in ``seq`` order, or :class:`Unavailable`."""
        gone = await self._wait_ready()
        if gone is not None:
            yield gone
            return
        self._next_id += 1
        cid = self._next_id
        queue: asyncio.Queue[Reply | Chunk | Unavailable] = asyncio.Queue()
        self._calls[cid] = queue
        writer, answered = self._writer, False
        try:
            assert self._writer is not None
            self._writer.write(encode_frame(Call(cid, route, query, last_event_id)))
            expected, early = 0, {}
            while True:
                message = await queue.get()
                if not isinstance(message, Chunk):
                    answered = isinstance(message, Reply)
                    yield message
                    return
                early[message.seq] = message
                while expected in early:  # a stream is written in the module's order
                    chunk = early.pop(expected)
                    expected += 1
                    answered = chunk.last
                    yield chunk
                    if chunk.last:
                        return
        finally:
            del self._calls[cid]
            if not answered and writer is self._writer and writer is not None and not writer.is_closing():
                writer.write(encode_frame(Cancel(cid)))  # the client left: the module stops answering
