"""Configurable test simulation: every rank prints JSON lines describing what happened.

The field at step s is ``1000 * s + global_flat_index``, so the analytics can check
values exactly. Usage: ``mpiexec ... python sim.py '<json options>'``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import numpy as np
from mpi4py import MPI

import insitu
from insitu.errors import InsituError

_OUT: list = []


def emit(rank: int, event: str, **kw: object) -> None:
    """One JSON line per event, into this rank's own file (stdout of ranks interleaves)."""
    _OUT[0].write(json.dumps({"rank": rank, "event": event, **kw}) + "\n")
    _OUT[0].flush()


def field(step: int, gshape: tuple[int, ...], start: tuple[int, ...], shape: tuple[int, ...], dtype: str) -> np.ndarray:
    idx = np.indices(shape)
    flat = np.zeros(shape, dtype=np.int64)
    mult = 1
    for axis in reversed(range(len(gshape))):
        flat += (idx[axis] + start[axis]) * mult
        mult *= gshape[axis]
    return (1000 * step + flat).astype(dtype)


def probe_process() -> dict[str, object]:
    """What this rank's process holds of Ray: imported modules, mapped libraries, memory."""
    maps = open("/proc/self/maps").read()
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    return {
        "ray_imported": sorted(m for m in sys.modules if m == "ray" or m.startswith("ray.")),
        "raylet_mapped": "_raylet" in maps,
        "rss_mb": int(status["VmRSS"].split()[0]) / 1024,
        "pid": os.getpid(),
    }


def main() -> int:
    opt = json.loads(sys.argv[1])
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    _OUT.append(open(os.path.join(opt["events"], f"rank{rank}.jsonl"), "a"))  # noqa: SIM115
    gshape = tuple(opt.get("shape", [8, 6]))
    dtype = opt.get("dtype", "f8")
    dims = MPI.Compute_dims(size, len(gshape)) if opt.get("dims") is None else opt["dims"]
    cart = world.Create_cart(dims)
    coords = cart.Get_coords(cart.Get_rank())
    local = []
    for axis, n in enumerate(gshape):
        base, extra = divmod(n, dims[axis])
        local.append(base + (1 if coords[axis] < extra else 0))
    layout = opt.get("layout")
    spec = insitu.ArraySpec.from_cart("u", cart, local, dtype)  # collective: every rank calls it
    if layout == "overlap" and rank == size - 1 and size > 1:
        spec = insitu.ArraySpec("u", gshape, dtype, start=(0,) * len(gshape), shape=tuple(local))
    elif layout == "dtype" and rank == 1:
        spec = insitu.ArraySpec("u", gshape, "f4", start=spec.start, shape=spec.shape)
    extra_specs = []
    if opt.get("empty_array"):
        # a second array of which only rank 0 owns a (whole) block
        if rank == 0:
            extra_specs.append(insitu.ArraySpec("v", (4,), "i4", start=(0,), shape=(4,)))
        else:
            extra_specs.append(insitu.ArraySpec.no_block("v", (4,), "i4"))
    if opt.get("second"):
        # a second field on the same decomposition: w = -u, in float32 (or "second_dtype")
        extra_specs.append(insitu.ArraySpec("w", gshape, opt.get("second_dtype", "f4"), start=spec.start,
                                            shape=spec.shape))  # fmt: skip
    start = spec.start
    try:
        bridge = insitu.Bridge([spec, *extra_specs], comm=cart, run=opt["run"], **opt.get("config", {}))
    except InsituError as exc:
        emit(rank, "init-error", error=f"{type(exc).__name__}: {exc}")
        return 3
    emit(rank, "ready", node=bridge.node, pid=os.getpid())
    faults = {int(k): v for k, v in opt.get("faults", {}).items()}
    stop_at = None
    last_sent = None
    for step in range(opt.get("steps", 5)):
        u = field(step, gshape, start, spec.shape, dtype)
        if opt.get("send_dtype"):  # e.g. big-endian values for a native declaration
            u = u.astype(opt["send_dtype"])
        if opt.get("order") == "F":
            u = np.asfortranarray(u)
        kwargs: dict[str, object] = {"u": u}
        if opt.get("empty_array"):
            kwargs["v"] = np.full(4, step, dtype="i4") if rank == 0 else None
        if opt.get("second"):
            kwargs["w"] = (-u).astype(opt.get("second_dtype", "f4"))
        send_step = step
        fault = faults.get(step)
        if fault and fault.get("rank") in (rank, "all"):
            kind = fault["kind"]
            if kind == "shape":
                kwargs["u"] = u[:-1]
            elif kind == "dtype":
                kwargs["u"] = u.astype("f4")
            elif kind == "unknown":
                kwargs["w"] = u
            elif kind == "missing":
                kwargs.pop("u")
            elif kind == "notarray":
                kwargs["u"] = u.tolist()
            elif kind == "ragged":
                kwargs["u"] = [[1.0, 2.0], [3.0]]
            elif kind == "dict":
                kwargs["u"] = {"u": u}
            elif kind == "bigstep":
                send_step = 2**63
            elif kind == "step":
                send_step = -1
            elif kind == "mismatch":
                send_step = step + 1000
            elif kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
        calls = [kwargs]
        if opt.get("cadence"):  # arrays at their own cadence: {"u": 1, "w": 3}; "split": one call per array
            due = {n: v for n, v in kwargs.items() if step % opt["cadence"].get(n, 1) == 0}
            calls = ([{n: v} for n, v in sorted(due.items())] or [{}]) if opt.get("split") else [due]
            if fault and fault.get("rank") in (rank, "all") and fault["kind"] == "repeat":
                calls[-1] = {**calls[-1], **calls[0]}  # an array of the step's first call again
        before = bridge.stats
        try:
            if len(calls) > 1 or opt.get("cadence"):
                for call in calls:
                    bridge.send(send_step, **call)
                emit(rank, "calls", step=step, arrays=[sorted(c) for c in calls], values={
                    k: bridge.get(k) for k in opt.get("report_keys", [])})  # fmt: skip
                calls = []
            if opt.get("view"):
                ghost = np.zeros(tuple(n + 2 for n in u.shape), dtype=u.dtype)
                ghost[(slice(1, -1),) * u.ndim] = kwargs["u"] if isinstance(kwargs.get("u"), np.ndarray) else 0
                kwargs["u"] = ghost[(slice(1, -1),) * u.ndim]
            if calls:
                bridge.send(send_step, **kwargs)
        except InsituError as exc:
            emit(rank, "send-error", step=step, error=f"{type(exc).__name__}: {exc}")
            if not opt.get("catch", True):
                bridge.close()
                return 4
            continue
        if opt.get("probe") and step == 0:
            emit(rank, "probe", **probe_process())
        after = bridge.stats
        kind = "sent" if after.sent > before.sent else "skipped" if after.skipped > before.skipped else "dropped"
        emit(rank, kind, step=step, ok=bridge.analytics_ok)
        if kind == "sent":
            last_sent = step
        if opt.get("sleep"):
            time.sleep(opt["sleep"])
        if bridge.get(opt.get("stop_key", "stop")):
            stop_at = step
            break
    bridge.close()
    s = bridge.stats
    emit(
        rank,
        "done",
        stop_at=stop_at,
        last_sent=last_sent,
        sent=s.sent,
        skipped=s.skipped,
        dropped=s.dropped,
        ok=bridge.analytics_ok,
        reconnects=s.reconnects,
        gaps=bridge.gaps,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
