"""In-situ statistics for heat2d: min/mean/max per step, the time derivative over a
window of two steps, a steering rule that stops the simulation once the plate has
cooled, and a PNG of the field every K steps.

Run next to a simulation (``insitu demo`` does this for you)::

    python "$(insitu config --data)/analytics/heat_stats.py" --run demo --out results/ --threshold 5 --png-every 25
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import dask
import numpy as np
from PIL import Image

import insitu


def to_png(field: np.ndarray, path: Path, vmax: float = 100.0) -> None:
    """Write ``field`` as a PNG with a blue-to-red colour map."""
    x = np.clip(field / vmax, 0.0, 1.0)
    rgb = np.stack([x, 1.0 - 2.0 * np.abs(x - 0.5), 1.0 - x], axis=-1)
    Image.fromarray((rgb * 255).astype(np.uint8), "RGB").resize((field.shape[1] * 2, field.shape[0] * 2)).save(path)


def bar(done: int, total: int | None, width: int = 24) -> str:
    """A text progress bar."""
    if not total:
        return ""
    filled = min(width, width * done // total)
    return "[" + "#" * filled + "." * (width - filled) + f"] {done}/{total}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default=None)
    p.add_argument("--out", type=Path, default=Path("heat_stats_out"))
    p.add_argument("--threshold", type=float, default=None, help="stop once max temperature falls below this")
    p.add_argument("--png-every", type=int, default=0, help="write a PNG every K steps (0: never)")
    p.add_argument("--total-steps", type=int, default=None, help="for the progress bar")
    p.add_argument("--print-every", type=int, default=1)
    p.add_argument("--npy-every", type=int, default=0, help="save the field as .npy every K steps (0: never)")
    p.add_argument("--placement", type=Path, default=None, help="write each block's node and route (step 0)")
    p.add_argument("--fail-at", type=int, default=None, help="test aid: raise in the callback at this step")
    p.add_argument("--park-at", type=int, default=None, help="test aid: sleep 3600 s at this step")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    analytics = insitu.Analytics(run=args.run)
    stats: dict[int, dict[str, float]] = {}
    started = time.monotonic()
    stop_sent: list[int] = []

    @analytics.on_step("temperature", window=2)
    def derivative(step: int, temperature: list) -> None:
        older, newer = temperature
        dt = newer.step - older.step
        diff = (newer - older) / dt
        dmean, dmax = dask.compute(diff.mean(), abs(diff).max())
        stats.setdefault(step, {}).update(dmean_dt=float(dmean), dmax_dt=float(dmax))

    @analytics.on_step("temperature")
    def summary(step: int, temperature: list) -> None:
        u = temperature[0]
        if args.fail_at is not None and step == args.fail_at:
            raise RuntimeError(f"injected failure at step {step}")
        if args.park_at is not None and step == args.park_at:
            time.sleep(3600)
        lo, mean, hi = dask.compute(u.min(), u.mean(), u.max())
        if args.placement is not None and step == 0:
            where = {",".join(map(str, b)): [ip] for b, ip in analytics.block_nodes(u).items()}
            layout = next(lay for lay in analytics.info.layouts if lay.name == "temperature")
            owners = {",".join(map(str, b)): r for b, r in layout.owners}
            args.placement.write_text(json.dumps({"blocks": where, "owners": owners, "routes": analytics.routes()}))
        stats.setdefault(step, {}).update(min=float(lo), mean=float(mean), max=float(hi))
        if args.threshold is not None and hi < args.threshold and not stop_sent:
            analytics.set("stop", True)
            stop_sent.append(step)
        if args.npy_every and step % args.npy_every == 0:
            np.save(args.out / f"temperature_{step:05d}.npy", u.compute())
        if args.png_every and step % args.png_every == 0:
            to_png(u.compute(), args.out / f"temperature_{step:05d}.png")
        if step % args.print_every == 0:
            rate = stats[step].get("dmean_dt")
            shown = "     n/a" if rate is None else format(rate, "+.2e")
            print(
                f"step {step:6d} | min {lo:8.3f} | mean {mean:8.4f} | max {hi:8.3f} | d(mean)/dt {shown} "
                f"| {time.monotonic() - started:6.1f} s {bar(step + 1, args.total_steps)}",
                flush=True,
            )

    summary_ = analytics.run()
    (args.out / "stats.json").write_text(json.dumps({"stats": stats, "stop_sent_at": stop_sent[:1]}, indent=1))
    print(
        f"heat_stats: {summary_.steps} steps, last {summary_.last_step}, "
        f"stop requested at {stop_sent[0] if stop_sent else 'never'}; results in {args.out}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
