"""The module side of ``insitu monitor``: ``python -m insitu.monitor.child NAME TARGET``.

A module is a subprocess serving some of the monitor's routes. ``TARGET`` is
``package.module:function``; the function gets the :class:`ModuleRuntime` and registers its
handlers (and may start threads of its own). The runtime answers each :class:`~.protocol.Ping`
from its event loop, so a handler that blocks the loop makes the module unhealthy, and exits
when the monitor's socket (fd ``INSITU_MONITOR_FD``) closes.

Examples
--------
A module with one route:

>>> def setup(rt: ModuleRuntime) -> None:
...     @rt.route("/api/hello")
...     async def hello(call: Call) -> Reply:
...         return rt.json(call, {"hello": "world"})
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from insitu.monitor.protocol import Call, Cancel, Chunk, Hello, Ping, Pong, Reply
from insitu.transport import decode_frames, encode_frame

__all__ = ["Handler", "ModuleRuntime", "fatal_in_thread", "main", "png_bytes"]

log = logging.getLogger("insitu.monitor")

Handler = Callable[[Call], Awaitable[Reply] | AsyncIterator[bytes]]
"""An ``async def`` returning a :class:`Reply`, or an ``async`` generator of stream parts."""


class ModuleRuntime:
    """Routes of one module and its connection to the monitor."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.handlers: dict[str, Handler] = {}
        self._on_start: list[Callable[[asyncio.AbstractEventLoop], None]] = []
        self._writer: asyncio.StreamWriter | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def route(self, path: str) -> Callable[[Handler], Handler]:
        """Register the handler of ``path`` (exact match)."""

        def register(fn: Handler) -> Handler:
            self.handlers[path] = fn
            return fn

        return register

    def on_start(self, fn: Callable[[asyncio.AbstractEventLoop], None]) -> Callable[[asyncio.AbstractEventLoop], None]:
        """Call ``fn(loop)`` once the module's event loop runs (to start threads that talk to it)."""
        self._on_start.append(fn)
        return fn

    @staticmethod
    def json(call: Call, doc: Any, status: int = 200) -> Reply:
        """A JSON answer."""
        return Reply(call.id, status, "application/json", json.dumps(doc).encode())

    @staticmethod
    def text(call: Call, text: str, status: int = 200) -> Reply:
        """A plain-text answer."""
        return Reply(call.id, status, "text/plain", text.encode())

    def _send(self, message: Any) -> None:
        assert self._writer is not None
        self._writer.write(encode_frame(message))

    async def _answer(self, call: Call) -> None:
        handler = self.handlers.get(call.route)
        if handler is None:
            self._send(self.text(call, f"module {self.name} has no route {call.route}", 404))
            return
        try:
            result = handler(call)
            if isinstance(result, AsyncIterator):
                seq = 0
                async for part in result:
                    self._send(Chunk(call.id, seq, part))
                    seq += 1
                self._send(Chunk(call.id, seq, b"", last=True))
            else:
                self._send(await result)
        except Exception as exc:  # noqa: BLE001 - one request's failure is that request's answer
            log.exception("module %s: %s failed", self.name, call.route)
            self._send(self.text(call, f"module {self.name}: {type(exc).__name__}: {exc}", 500))
        assert self._writer is not None
        await self._writer.drain()

    async def serve(self, sock: socket.socket) -> None:
        """Say hello, then answer calls and pings until the monitor closes the socket."""
        self.loop = asyncio.get_running_loop()
        reader, self._writer = await asyncio.open_unix_connection(sock=sock)
        for fn in self._on_start:
            fn(self.loop)
        self._send(Hello(self.name, os.getpid(), tuple(self.handlers)))
        buffer = bytearray()
        tasks: dict[int, asyncio.Task[None]] = {}
        while data := await reader.read(1 << 16):
            buffer += data
            for message in decode_frames(buffer):
                if isinstance(message, Ping):
                    self._send(Pong(message.n))
                elif isinstance(message, Call):
                    tasks[message.id] = asyncio.create_task(self._answer(message))
                    tasks[message.id].add_done_callback(lambda _, cid=message.id: tasks.pop(cid, None))
                elif isinstance(message, Cancel) and message.id in tasks:
                    tasks[message.id].cancel()
            await self._writer.drain()


def fatal_in_thread(fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` for a module's own thread: an exception it lets through ends the module's process
    (exit code 70, after logging it), so that its supervisor sees a failure and restarts the
    module, instead of a module that answers its health checks with a dead worker inside."""

    def run() -> None:
        try:
            fn()
        except BaseException:
            log.exception("a thread of this module died; the module exits so that it is restarted")
            sys.stderr.flush()
            os._exit(70)

    return run


def png_bytes(fig: Any) -> bytes:
    """A matplotlib figure as PNG bytes (the figure is closed)."""
    import io

    import matplotlib.pyplot as plt

    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=80)
    plt.close(fig)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    """Entry point of a module subprocess."""
    name, target = (argv if argv is not None else sys.argv[1:])[:2]
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=f"%(asctime)s {name} %(levelname)s %(message)s")
    module_name, _, function = target.partition(":")
    runtime = ModuleRuntime(name)
    getattr(importlib.import_module(module_name), function)(runtime)
    sock = socket.socket(fileno=int(os.environ["INSITU_MONITOR_FD"]))
    asyncio.run(runtime.serve(sock))
    return 0


if __name__ == "__main__":
    sys.exit(main())
