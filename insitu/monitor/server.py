"""``insitu monitor --run RUN [--host 127.0.0.1] [--port P]``: a run's live page (docs/monitoring.md).

The aiohttp server serves the page and ``/api/modules`` itself; every other ``/api/`` route is
answered by a module in a supervised subprocess (:mod:`insitu.monitor.supervisor`): ``status``
(``/api/status``, the ``/api/events`` server-sent-events stream, ``/api/plot.png``) and
``snapshot`` (``/api/arrays``, ``/api/snapshot.png``). Bound to loopback by default; bound
elsewhere, every request needs the token printed once at start (``?token=`` once, which sets a
cookie, or ``Authorization: Bearer``). Requests are not logged, so the token never is.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import secrets
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources

from aiohttp import web

from insitu.config import Config
from insitu.errors import ConfigError
from insitu.monitor.protocol import Chunk, Reply
from insitu.monitor.supervisor import Module, ModuleSpec, Settings, Unavailable

__all__ = ["MODULES", "TOKEN_COOKIE", "make_app", "parse_module", "serve"]

log = logging.getLogger("insitu.monitor")

MODULES = (
    ModuleSpec("status", "insitu.monitor.status_module:setup", ("/api/status", "/api/events", "/api/plot.png")),
    ModuleSpec("snapshot", "insitu.monitor.snapshot_module:setup", ("/api/arrays", "/api/snapshot.png")),
)
"""The monitor's own modules."""

TOKEN_COOKIE = "insitu_token"


def parse_module(text: str) -> ModuleSpec:
    """``NAME=package.module:function@/route[,/route...]`` (``--module``), e.g. a site's own page.

    Examples
    --------
    >>> parse_module("gpu=site_mon:setup@/api/gpu,/api/gpu.png")
    ModuleSpec(name='gpu', target='site_mon:setup', routes=('/api/gpu', '/api/gpu.png'))
    """
    name, _, rest = text.partition("=")
    target, _, routes = rest.partition("@")
    paths = tuple(r for r in routes.split(",") if r)
    if not name or ":" not in target or not paths or not all(r.startswith("/api/") for r in paths):
        raise ConfigError(f"--module {text!r}: expected NAME=package.module:function@/api/route[,/api/route...]")
    return ModuleSpec(name, target, paths)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_app(modules: Sequence[Module], token: str | None) -> web.Application:
    """The monitor's aiohttp application over started ``modules`` (``token``: required off loopback)."""
    routes = {r: m for m in modules for r in m.spec.routes}

    @web.middleware
    async def check_token(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                          ) -> web.StreamResponse:  # fmt: skip
        if token is None:
            return await handler(request)
        given = request.query.get("token") or request.cookies.get(TOKEN_COOKIE, "")
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            given = auth.removeprefix("Bearer ")
        if not hmac.compare_digest(given.encode(), token.encode()):
            return web.Response(status=401, text="insitu monitor: a valid token is required (printed at start)\n")
        response = await handler(request)
        if "token" in request.query and not response.prepared:
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict")
        return response

    async def page(_: web.Request) -> web.Response:
        html = resources.files("insitu").joinpath("data/monitor/index.html").read_text()
        return web.Response(text=html, content_type="text/html")

    async def listing(_: web.Request) -> web.Response:
        return web.json_response({"modules": [m.status() for m in modules]})

    async def forward(request: web.Request) -> web.StreamResponse:
        module = routes.get(request.path)
        if module is None:
            return web.Response(status=404, text=f"no route {request.path}\n")
        query = tuple((k, v) for k, v in request.query.items() if k != "token")
        stream: web.StreamResponse | None = None
        answer = module.request(request.path, query, request.headers.get("Last-Event-ID", ""))
        async with contextlib.aclosing(answer):  # a client that leaves cancels the module's work for it
            async for message in answer:
                if isinstance(message, Unavailable):
                    if stream is None:
                        return web.Response(status=503, text=message.reason + "\n", headers={"Retry-After": "1"})
                    with contextlib.suppress(ConnectionError):
                        await stream.write(f"event: error\ndata: {json.dumps(message.reason)}\n\n".encode())
                    break
                if isinstance(message, Reply):
                    return web.Response(status=message.status, body=message.body, content_type=message.content_type,
                                        headers=dict(message.headers))  # fmt: skip
                assert isinstance(message, Chunk)
                if stream is None:
                    stream = web.StreamResponse(headers={"Content-Type": message.content_type,
                                                         "Cache-Control": "no-cache"})  # fmt: skip
                    await stream.prepare(request)
                if message.data:
                    try:
                        await stream.write(message.data)
                    except ConnectionError:  # the client left; closing the answer cancels it in the module
                        return stream
        if stream is None:
            return web.Response(status=503, text=f"module {module.spec.name} ended the request without answer\n")
        with contextlib.suppress(ConnectionError):
            await stream.write_eof()
        return stream

    app = web.Application(middlewares=[check_token])
    app.router.add_get("/", page)
    app.router.add_get("/api/modules", listing)
    app.router.add_get("/api/{tail:.*}", forward)
    return app


async def serve(run: str, config: Config, host: str = "127.0.0.1", port: int = 0,
                extra: Sequence[ModuleSpec] = (), settings: Settings | None = None) -> int:  # fmt: skip
    """Run the monitor of ``run`` until SIGTERM or SIGINT; its modules and their processes go with it."""
    import os

    settings = settings or Settings(config.monitor_health_interval, config.monitor_heartbeat_deadline,
                                    config.monitor_max_restarts)  # fmt: skip
    token = None if _loopback(host) else secrets.token_urlsafe(24)
    env = {**os.environ, "INSITU_RUN": run, "INSITU_ADDRESS": config.require_address()}
    modules = [Module(spec, settings, env) for spec in (*MODULES, *extra)]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(make_app(modules, token), access_log=None)
    await runner.setup()
    try:
        for m in modules:
            await m.start()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}; choose another --port") from None
        site = web.SockSite(runner, sock)
        await site.start()
        bound = sock.getsockname()[1]
        print(f"insitu monitor: run {run} at http://{host}:{bound}/", flush=True)
        if token is not None:
            print(f"insitu monitor: bound off loopback; open http://{host}:{bound}/?token={token} (token shown once)",
                  flush=True)  # fmt: skip
        await stop.wait()
        return 0
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        for m in modules:
            await m.stop()
        await runner.cleanup()
