"""The monitor's ``snapshot`` module: ``/api/arrays`` and ``/api/snapshot.png?array=NAME``.

The module is an observer consumer of the run (:class:`insitu.Analytics` with
``kind=ConsumerKind.MONITOR``): it sees the latest complete steps, never holds the simulation
back, and its death is only its own. An array someone asked for in the last 30 s is rendered
at most once a second: the field is first thinned to at most 512 points per axis by insitu's
scheduler on the nodes where its blocks live (a strided slice, so only the thinned blocks
travel), then drawn with matplotlib (axes in global indices, colour bar, step in the title).
An array of more than two dimensions is shown at the middle index of its leading ones.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from typing import Any

from insitu.config import Config, resolve_run
from insitu.monitor.child import ModuleRuntime, fatal_in_thread, png_bytes
from insitu.monitor.protocol import Call, Reply

__all__ = ["MAX_POINTS", "Snapshots", "setup", "thinned"]

MAX_POINTS = 512
_WANTED_FOR = 30.0
_EVERY = 1.0
_QUIET_FOR = 30 * 86400.0


def thinned(shape: tuple[int, ...]) -> tuple[tuple[int | slice, ...], tuple[int, ...]]:
    """The index that shows an array of ``shape`` in at most :data:`MAX_POINTS` per axis, and its strides.

    Examples
    --------
    >>> thinned((4, 2000, 100))
    ((2, slice(None, None, 4), slice(None, None, 1)), (4, 1))
    """
    lead = tuple(n // 2 for n in shape[:-2])
    strides = tuple(max(1, math.ceil(n / MAX_POINTS)) for n in shape[-2:])
    return (*lead, *(slice(None, None, s) for s in strides)), strides


class Snapshots:
    """The latest rendered snapshot of each array someone asked for."""

    def __init__(self, run: str, config: Config) -> None:
        self.run, self.config = run, config
        self.arrays: list[str] = []
        self.images: dict[str, tuple[int, bytes, float]] = {}
        self.wanted: dict[str, float] = {}
        self.state = "waiting for the run"
        self.loop: asyncio.AbstractEventLoop | None = None
        self.rendered = asyncio.Event()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Attach to the run from a daemon thread."""
        self.loop = loop
        threading.Thread(target=fatal_in_thread(self._consume), name="insitu-monitor-snapshot", daemon=True).start()

    def _consume(self) -> None:
        import ray

        from insitu.actors.consumers import ConsumerKind
        from insitu.actors.head import find_head
        from insitu.analytics import Analytics
        from insitu.messages import RunEnd, RunInfo
        from insitu.process import acquire_ray

        while True:
            try:
                acquire_ray(self.config, f"insitu monitor --run {self.run}")
                break
            except Exception as exc:  # noqa: BLE001 - shown on the page; tried again
                self.state = f"{type(exc).__name__}: {exc}"
                time.sleep(5.0)
        info = None
        while not isinstance(info, RunInfo):
            try:
                head = find_head(self.run, self.config.namespace)
                info = None if head is None else ray.get(head.run_info.remote(5.0), timeout=30)  # None: not started
            except ray.exceptions.RayError as exc:  # a head that died or did not answer: ask again
                self.state = f"{type(exc).__name__} from the run's head"
            if isinstance(info, RunEnd):
                self.state = f"the run ended before its simulation registered: {info.message}"
                return
            if not isinstance(info, RunInfo):
                time.sleep(1.0)
        self.arrays = [lay.name for lay in info.layouts]
        # an observer waits for steps as long as the run lasts: no deadline on a quiet simulation
        config = self.config.replace(deadline=max(self.config.deadline, _QUIET_FOR))
        analytics = Analytics(self.run, config=config, kind=ConsumerKind.MONITOR)

        @analytics.on_step(*self.arrays, when="any")
        def snapshot(step: int, **arrays: Any) -> None:
            now = time.monotonic()
            for name, steps in arrays.items():
                old = self.images.get(name)
                if steps and now - self.wanted.get(name, -1e9) < _WANTED_FOR and (old is None or now - old[2] > _EVERY):
                    self.images[name] = (step, self.render(name, step, steps[-1]), now)
                    assert self.loop is not None
                    self.loop.call_soon_threadsafe(self.rendered.set)

        self.state = "attached"
        try:
            summary = analytics.run()
            self.state = f"the run ended after step {summary.last_step}"
        except Exception as exc:  # noqa: BLE001 - shown on the page; the module keeps serving what it has
            self.state = f"{type(exc).__name__}: {exc}"

    def render(self, name: str, step: int, field: Any) -> bytes:
        """``field`` (a Dask array) thinned where its blocks live, drawn as a PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        fig, ax = plt.subplots(figsize=(6, 4.5), layout="constrained")
        if field.ndim == 1:
            stride = max(1, math.ceil(field.shape[0] / MAX_POINTS))
            values = np.asarray(field[::stride].compute())
            ax.plot(np.arange(values.size) * stride, values)
            ax.set_xlabel("global index")
        else:
            index, (sy, sx) = thinned(field.shape)
            values = np.asarray(field[index].compute())
            ny, nx = values.shape
            image = ax.imshow(values, origin="lower", extent=(0, nx * sx, 0, ny * sy), aspect="auto")
            fig.colorbar(image, ax=ax, label=name)
            ax.set_xlabel(f"global index {field.ndim - 1}")
            ax.set_ylabel(f"global index {field.ndim - 2}")
        ax.set_title(f"{name}, step {step}")
        return png_bytes(fig)


def setup(rt: ModuleRuntime) -> None:
    """Register the snapshot routes; the consumer attaches once the module's event loop runs."""
    config = Config.from_env()
    snaps = Snapshots(resolve_run(None, config), config)
    rt.on_start(snaps.start)

    @rt.route("/api/arrays")
    async def arrays(call: Call) -> Reply:
        return rt.json(call, {"arrays": snaps.arrays, "state": snaps.state})

    @rt.route("/api/snapshot.png")
    async def snapshot(call: Call) -> Reply:
        name = dict(call.query).get("array") or (snaps.arrays[0] if snaps.arrays else "")
        if snaps.arrays and name not in snaps.arrays:
            return rt.text(call, f"no array {name!r} in run {snaps.run}: it declares {snaps.arrays}", 404)
        snaps.wanted[name] = time.monotonic()
        end = time.monotonic() + 20
        while name not in snaps.images and time.monotonic() < end:
            snaps.rendered.clear()
            try:
                await asyncio.wait_for(snaps.rendered.wait(), max(0.0, end - time.monotonic()))
            except TimeoutError:
                break
        if name not in snaps.images:
            return rt.text(call, f"no snapshot of {name!r} yet ({snaps.state})", 404)
        step, png, _ = snaps.images[name]
        return Reply(call.id, 200, "image/png", png, (("X-Insitu-Step", str(step)),))
