"""In-situ statistics for heat2d: min/mean/max per step, the time derivative over a
window of two steps, a steering rule that stops the simulation once the plate has
cooled, and pictures: a snapshot of the field every K steps and a time series of the
statistics.

Run next to a simulation (``insitu demo`` does this for you)::

    python "$(insitu config --data)/analytics/heat_stats.py" --run demo --out results/ --threshold 5 --png-every 25

Written to ``--out``:

* ``stats.jsonl``: one JSON object per step (``step``, ``min``, ``mean``, ``max`` and, from
  the second step on, ``dmean_dt`` and ``dmax_dt``), appended and flushed as each step is
  computed, so a run that is killed keeps what it computed;
* ``stats.json``: the same statistics by step and the step the stop was requested at,
  written at the end;
* with matplotlib (``pip install 'insitu[plot]'``): ``temperature_<step>.png`` every
  ``--png-every`` steps (global indices on the axes, a colour bar, one colour range for
  the whole run: ``--vmin``/``--vmax`` or else the first snapshot's range), recorded in
  ``snapshots.json``; ``timeseries.png``, min/mean/max against step, rewritten every
  ``--plot-every`` steps and at the end. Every PNG is written to a temporary file and
  renamed, so a reader never sees half a picture.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import dask
import numpy as np

import insitu

NO_MATPLOTLIB = "heat_stats: matplotlib is not installed (pip install 'insitu[plot]'): plots are off"


def write_atomic(path: Path, write: Any) -> None:
    """Call ``write(binary_file)`` on a temporary file next to ``path``, then rename it to ``path``.

    Parameters
    ----------
    path : Path
        The file to (re)place.
    write : callable
        Writes the content to the open binary file it is given.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")  # mode from the umask, as for any file
    try:
        with tmp.open("xb") as fh:
            write(fh)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class Plots:
    """The run's pictures, drawn with matplotlib's object-oriented API (no backend is selected).

    Parameters
    ----------
    out : Path
        Directory of the pictures.
    vmin, vmax : float or None
        Colour range of the snapshots; a bound left ``None`` is taken from the first snapshot
        and kept for the rest of the run.
    threshold : float or None
        The steering threshold, drawn in the time series.
    """

    def __init__(self, out: Path, vmin: float | None, vmax: float | None, threshold: float | None) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self._figure, self._canvas = Figure, FigureCanvasAgg
        self.out = out
        self.vmin, self.vmax = vmin, vmax
        self.range_from = "options" if vmin is not None and vmax is not None else "first snapshot"
        self.threshold = threshold
        self.snapshots: dict[int, tuple[float, float]] = {}

    @classmethod
    def load(cls, out: Path, vmin: float | None, vmax: float | None, threshold: float | None) -> Plots | None:
        """The plots, or ``None`` (said once on stderr) when matplotlib is not installed.

        Parameters
        ----------
        out, vmin, vmax, threshold
            As for :class:`Plots`.

        Returns
        -------
        Plots or None
            ``None`` without matplotlib.
        """
        try:
            return cls(out, vmin, vmax, threshold)
        except ImportError:
            print(NO_MATPLOTLIB, file=sys.stderr, flush=True)
            return None

    def _save(self, fig: Any, path: Path) -> None:
        self._canvas(fig)
        write_atomic(path, lambda fh: fig.savefig(fh, format="png"))

    def snapshot(self, step: int, field: np.ndarray) -> Path:
        """Write ``temperature_<step>.png`` of the global ``field`` and record its colour range.

        Parameters
        ----------
        step : int
            The simulation step (in the title and the file name).
        field : numpy.ndarray
            The global 2-D field; axis 0 is drawn downwards, axis 1 across.

        Returns
        -------
        Path
            The PNG written.
        """
        if self.vmin is None:
            self.vmin = float(np.min(field))
        if self.vmax is None:
            self.vmax = float(np.max(field))
        fig = self._figure(figsize=(6.0, 5.0), layout="constrained")
        ax = fig.add_subplot()
        image = ax.imshow(field, vmin=self.vmin, vmax=self.vmax, cmap="inferno", interpolation="nearest")
        fig.colorbar(image, ax=ax, label="temperature")
        ax.set_title(f"temperature, step {step}")
        ax.set_xlabel("global index, axis 1")
        ax.set_ylabel("global index, axis 0")
        path = self.out / f"temperature_{step:05d}.png"
        self._save(fig, path)
        used = image.get_clim()  # what the picture was drawn with
        self.snapshots[step] = (float(used[0]), float(used[1]))
        record = {"vmin": self.vmin, "vmax": self.vmax, "range_from": self.range_from,
                  "snapshots": {str(s): list(r) for s, r in sorted(self.snapshots.items())}}  # fmt: skip
        write_atomic(self.out / "snapshots.json", lambda fh: fh.write(json.dumps(record, indent=1).encode()))
        return path

    def timeseries(self, stats: dict[int, dict[str, float]]) -> Path:
        """(Re)write ``timeseries.png``: min, mean and max against step.

        Parameters
        ----------
        stats : dict
            Statistics by step, each with ``min``, ``mean`` and ``max``.

        Returns
        -------
        Path
            The PNG written.
        """
        steps = sorted(s for s, v in stats.items() if "mean" in v)
        lo, mean, hi = ([stats[s][k] for s in steps] for k in ("min", "mean", "max"))
        fig = self._figure(figsize=(7.0, 4.0), layout="constrained")
        ax = fig.add_subplot()
        ax.fill_between(steps, lo, hi, color="tab:orange", alpha=0.2, linewidth=0)
        ax.plot(steps, hi, color="tab:red", label="max")
        ax.plot(steps, mean, color="black", label="mean")
        ax.plot(steps, lo, color="tab:blue", label="min")
        if self.threshold is not None:
            ax.axhline(self.threshold, color="grey", linestyle="--", label="stop threshold (max)")
        ax.set_xlabel("step")
        ax.set_ylabel("temperature")
        ax.set_title(f"temperature statistics, steps {steps[0]}-{steps[-1]}" if steps else "temperature statistics")
        ax.legend(loc="best")
        ax.grid(alpha=0.3)
        path = self.out / "timeseries.png"
        self._save(fig, path)
        return path


def bar(done: int, total: int | None, width: int = 24) -> str:
    """A text progress bar.

    Parameters
    ----------
    done, total : int
        Steps done and expected (no bar when ``total`` is unknown).
    width : int
        Characters between the brackets.

    Returns
    -------
    str
        The bar, or ``""``.
    """
    if not total:
        return ""
    filled = min(width, width * done // total)
    return "[" + "#" * filled + "." * (width - filled) + f"] {done}/{total}"


def resume_lines(path: Path, stats: dict[int, dict[str, float]]) -> TextIO:
    """Load the complete lines of an earlier incarnation's ``stats.jsonl`` into ``stats``, drop a
    line cut short by its death, and open the file for appending.

    Examples
    --------
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "stats.jsonl"
    >>> _ = path.write_text('{"step": 0, "min": 1.0}\\n{"step": 1, "mi')
    >>> stats = {}
    >>> resume_lines(path, stats).close()
    >>> stats, path.read_text()
    ({0: {'min': 1.0}}, '{"step": 0, "min": 1.0}\\n')
    """
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    complete = text[: text.rfind("\n") + 1]
    for line in complete.splitlines():
        record = json.loads(line)
        stats[int(record.pop("step"))] = record
    path.write_text(complete, encoding="utf-8")
    return path.open("a", encoding="utf-8")


def append_line(fh: TextIO, step: int, values: dict[str, float]) -> None:
    """Append one step's statistics to ``stats.jsonl`` and flush it.

    Parameters
    ----------
    fh : TextIO
        The open ``stats.jsonl``.
    step : int
        The step.
    values : dict
        Its statistics.
    """
    fh.write(json.dumps({"step": step, **values}) + "\n")
    fh.flush()


def main(argv: list[str] | None = None) -> int:
    """Run the analytics until the simulation closes.

    Parameters
    ----------
    argv : list of str, optional
        Command-line arguments (``sys.argv[1:]`` when ``None``).

    Returns
    -------
    int
        The exit status.
    """
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default=None)
    p.add_argument("--out", type=Path, default=Path("heat_stats_out"))
    p.add_argument("--threshold", type=float, default=None, help="stop once max temperature falls below this")
    p.add_argument("--png-every", type=int, default=0, help="write a snapshot PNG every K steps (0: never)")
    p.add_argument("--vmin", type=float, default=None, help="snapshot colour range (default: the first snapshot's)")
    p.add_argument("--vmax", type=float, default=None, help="snapshot colour range (default: the first snapshot's)")
    p.add_argument("--plot-every", type=int, default=20,
                   help="rewrite timeseries.png every K steps and at the end (0: no time series)")  # fmt: skip
    p.add_argument("--total-steps", type=int, default=None, help="for the progress bar")
    p.add_argument("--print-every", type=int, default=1)
    p.add_argument("--npy-every", type=int, default=0, help="save the field as .npy every K steps (0: never)")
    p.add_argument("--placement", type=Path, default=None, help="write each block's node and route (step 0)")
    p.add_argument("--fail-at", type=int, default=None, help="test aid: raise in the callback at this step")
    p.add_argument("--park-at", type=int, default=None, help="test aid: sleep 3600 s at this step")
    p.add_argument("--bypass", type=Path, default=None, help="bypass YAML (docs/record-replay.md)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    plots = None
    if args.png_every or args.plot_every:
        plots = Plots.load(args.out, args.vmin, args.vmax, args.threshold)

    analytics = insitu.Analytics(run=args.run, bypass=insitu.Bypass(args.bypass) if args.bypass else None)
    stats: dict[int, dict[str, float]] = {}
    started = time.monotonic()
    stop_sent: list[int] = []
    # a supervised restart resumes the statistics of the incarnations before it
    lines = resume_lines(args.out / "stats.jsonl", stats) if analytics.restarted else (
        (args.out / "stats.jsonl").open("w", encoding="utf-8"))  # fmt: skip

    # callbacks of a step run in the order they are registered: the derivative first, so that
    # the summary finds it and writes the step's complete line
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
            info = analytics.info
            assert info is not None  # set before the first callback
            layout = next(lay for lay in info.layouts if lay.name == "temperature")
            owners = {",".join(map(str, b)): r for b, r in layout.owners}
            args.placement.write_text(json.dumps({"blocks": where, "owners": owners, "routes": analytics.routes()}))
        stats[step] = {"min": float(lo), "mean": float(mean), "max": float(hi), **stats.get(step, {})}
        append_line(lines, step, stats[step])
        if args.threshold is not None and hi < args.threshold and not stop_sent:
            analytics.set("stop", True)
            stop_sent.append(step)
        npy = bool(args.npy_every) and step % args.npy_every == 0
        png = bool(args.png_every) and step % args.png_every == 0 and plots is not None
        if npy or png:
            field = u.compute()
            if npy:
                np.save(args.out / f"temperature_{step:05d}.npy", field)
            if png and plots is not None:
                plots.snapshot(step, field)
        if plots is not None and args.plot_every and step % args.plot_every == 0:
            plots.timeseries(stats)
        if step % args.print_every == 0:
            rate = stats[step].get("dmean_dt")
            shown = "     n/a" if rate is None else format(rate, "+.2e")
            print(
                f"step {step:6d} | min {lo:8.3f} | mean {mean:8.4f} | max {hi:8.3f} | d(mean)/dt {shown} "
                f"| {time.monotonic() - started:6.1f} s {bar(step + 1, args.total_steps)}",
                flush=True,
            )

    with lines:
        summary_ = analytics.run()
    (args.out / "stats.json").write_text(json.dumps({"stats": stats, "stop_sent_at": stop_sent[:1]}, indent=1))
    if plots is not None and args.plot_every and stats:
        plots.timeseries(stats)
    print(
        f"heat_stats: {summary_.steps} steps, last {summary_.last_step}, "
        f"stop requested at {stop_sent[0] if stop_sent else 'never'}; results in {args.out}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
