"""A monitor module for the supervision tests (``--module probe=tests.monitor.probe_module:setup@...``):
a slow request, one that blocks the module's event loop, its pid, and a numbered event stream that
resumes after ``Last-Event-ID``."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator

from insitu.monitor.child import ModuleRuntime
from insitu.monitor.protocol import Call, Reply

ROUTES = ("/api/probe/pid", "/api/probe/slow", "/api/probe/hang", "/api/probe/stream")


def setup(rt: ModuleRuntime) -> None:
    @rt.route("/api/probe/pid")
    async def pid(call: Call) -> Reply:
        return rt.json(call, {"pid": os.getpid()})

    @rt.route("/api/probe/slow")
    async def slow(call: Call) -> Reply:
        await asyncio.sleep(float(dict(call.query).get("seconds", "30")))
        return rt.json(call, {"pid": os.getpid()})

    @rt.route("/api/probe/hang")
    async def hang(call: Call) -> Reply:
        time.sleep(3600)  # blocks the event loop: the heartbeat goes unanswered
        return rt.json(call, {})

    @rt.route("/api/probe/stream")
    async def stream(call: Call) -> AsyncIterator[bytes]:
        first = int(call.last_event_id or 0) + 1
        for i in itertools.count(first):
            yield f"id: {i}\nevent: tick\ndata: {os.getpid()}\n\n".encode()
            await asyncio.sleep(0.05)
