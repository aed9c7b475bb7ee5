"""The monitor's ``status`` module: ``/api/status``, ``/api/events`` and ``/api/plot.png``.

A thread polls :func:`insitu.status.collect` (the document of ``insitu status --json``) every
half second and keeps a history of the last 10 minutes. ``/api/events`` streams a
server-sent event whenever the last complete step advanced (``id:`` is the step, so a client reconnecting with
``Last-Event-ID`` after a restart of this module gets only later steps: the stream stays in
order), then an ``end`` event when the run ends. ``/api/plot.png`` draws step rate, lag per
consumer and insitu's store bytes per node with matplotlib.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from typing import Any

from insitu.config import Config, resolve_run
from insitu.errors import InsituError
from insitu.monitor.child import ModuleRuntime, fatal_in_thread, png_bytes
from insitu.monitor.protocol import Call, Reply

__all__ = ["Poller", "event_of", "setup"]

_PERIOD = 0.5
_HISTORY = 1200


def event_of(doc: dict[str, Any]) -> dict[str, Any]:
    """The compact per-step record streamed to pages (and plotted).

    Examples
    --------
    >>> doc = {"state": "running", "steps": {"last": 7, "assembled": 8}, "dropped": 0, "skipped": 1,
    ...        "consumers": [{"incarnation": 1, "state": "attached", "lag": 2, "completed": 5}],
    ...        "simulation": {"nodes": [{"id": "abc", "ip": "10.0.0.1", "store_bytes": 64}]}}
    >>> event_of(doc)["lag"], event_of(doc)["store_bytes"]
    ({'1': 2}, {'10.0.0.1': 64})
    """
    nodes = (doc.get("simulation") or {}).get("nodes", [])
    return {
        "state": doc.get("state"), "step": (doc.get("steps") or {}).get("last"),
        "assembled": (doc.get("steps") or {}).get("assembled"),
        "dropped": doc.get("dropped", 0), "skipped": doc.get("skipped", 0),
        "lag": {str(c["incarnation"]): c["lag"] for c in doc.get("consumers", []) if c["state"] == "attached"},
        "store_bytes": {n.get("ip") or n["id"][:12]: n.get("store_bytes", 0) for n in nodes},
        "consumers": [{k: c.get(k) for k in ("incarnation", "kind", "state", "completed", "lag", "failure")}
                      for c in doc.get("consumers", [])],
    }  # fmt: skip


class Poller:
    """The latest status document and a history of compact records, refreshed by a thread."""

    def __init__(self, run: str, config: Config, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.run, self.config, self.loop = run, config, loop
        self.doc: dict[str, Any] = {"run": run, "state": "waiting",
                                    "message": f"connecting to the Ray cluster at {config.address}"}  # fmt: skip
        self.history: deque[tuple[float, dict[str, Any]]] = deque(maxlen=_HISTORY)
        self.changed = asyncio.Condition()
        self._stop = threading.Event()

    def start(self) -> None:
        """Poll in a daemon thread (it connects to Ray there)."""
        threading.Thread(target=fatal_in_thread(self._poll), name="insitu-monitor-status", daemon=True).start()

    def _poll(self) -> None:
        from insitu.process import acquire_ray
        from insitu.status import collect, fixed

        while not self._stop.is_set():
            try:
                acquire_ray(self.config, f"insitu monitor --run {self.run}")
                break
            except Exception as exc:  # noqa: BLE001 - shown on the page; tried again
                self.doc = {"run": self.run, "state": "unknown", "message": f"{type(exc).__name__}: {exc}"}
                self._stop.wait(5.0)
        nodes: list[dict[str, Any]] | None = None
        info: Any = None
        while not self._stop.is_set():
            try:
                if nodes is None:
                    nodes, info = fixed(self.run, self.config)
                doc = collect(self.run, self.config, nodes=nodes, info=info)
            except InsituError as exc:
                doc = {"run": self.run, "state": "waiting", "message": str(exc)}
            except Exception as exc:  # noqa: BLE001 - a failed poll is shown, the next one may work
                doc = {"run": self.run, "state": "unknown", "message": f"{type(exc).__name__}: {exc}"}
            self.doc = doc
            if doc.get("steps"):
                self.history.append((time.time(), event_of(doc)))
            if self.loop is not None:
                asyncio.run_coroutine_threadsafe(self._notify(), self.loop)
            if doc.get("state") == "ended":
                return
            self._stop.wait(_PERIOD)

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    def plot(self) -> bytes:
        """Step rate, lag per consumer and store bytes per node over the history, as a PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        hist = list(self.history)
        fig, (rate, lag, store) = plt.subplots(3, 1, figsize=(7, 6.5), sharex=True, layout="constrained")
        if hist:
            t0 = hist[0][0]
            times = [t - t0 for t, _ in hist]
            steps = [e["step"] if e["step"] is not None else 0 for _, e in hist]
            rates = [0.0] + [max(0.0, (steps[i] - steps[i - 1]) / max(times[i] - times[i - 1], 1e-9))
                             for i in range(1, len(hist))]  # fmt: skip
            rate.plot(times, rates)
            for cid in sorted({c for _, e in hist for c in e["lag"]}, key=int):
                lag.plot(times, [e["lag"].get(cid) for _, e in hist], label=f"consumer #{cid}")
            for node in sorted({n for _, e in hist for n in e["store_bytes"]}):
                store.plot(times, [e["store_bytes"].get(node, 0) / 2**20 for _, e in hist], label=node)
            if lag.lines:
                lag.legend(loc="upper left", fontsize="small")
            if store.lines:
                store.legend(loc="upper left", fontsize="small")
        rate.set_ylabel("steps / s")
        lag.set_ylabel("lag (steps)")
        store.set_ylabel("store (MiB)")
        store.set_xlabel("seconds since the monitor saw the run")
        rate.set_title(f"run {self.run}: {self.doc.get('state')}, last complete step "
                       f"{(self.doc.get('steps') or {}).get('last')}")  # fmt: skip
        return png_bytes(fig)


def setup(rt: ModuleRuntime) -> None:
    """Register the status routes (the poller starts with the module's event loop)."""
    config = Config.from_env()
    run = resolve_run(None, config)
    poller = Poller(run, config)

    @rt.route("/api/status")
    async def status(call: Call) -> Reply:
        return rt.json(call, poller.doc)

    @rt.route("/api/plot.png")
    async def plot(call: Call) -> Reply:
        return Reply(call.id, 200, "image/png", await asyncio.to_thread(poller.plot))

    @rt.route("/api/events")
    async def events(call: Call) -> Any:
        after = int(call.last_event_id) if call.last_event_id.lstrip("-").isdigit() else None
        yield b"retry: 1000\n\n"
        while True:
            doc = poller.doc
            step = (doc.get("steps") or {}).get("last")
            if step is not None and (after is None or step > after):
                after = step
                yield f"id: {step}\nevent: status\ndata: {json.dumps(event_of(doc))}\n\n".encode()
            if doc.get("state") == "ended":
                yield f"event: end\ndata: {json.dumps(doc.get('end'))}\n\n".encode()
                return
            async with poller.changed:
                try:
                    await asyncio.wait_for(poller.changed.wait(), 15)
                except TimeoutError:
                    yield b": keep-alive\n\n"

    @rt.on_start
    def begin(loop: asyncio.AbstractEventLoop) -> None:
        poller.loop = loop
        poller.start()
