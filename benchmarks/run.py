"""insitu against the one-copy floor and its peers, measured side by side in one run.

Usage::

    python -m benchmarks.run                 # every section, every size (about 30 minutes)
    python -m benchmarks.run --quick         # smoke: floor + insitu at 64 KiB, 5 steps
    python -m benchmarks.run --sections floor,insitu --sizes 65536,8388608

Prints each measurement as it is taken, then the ratios and the targets (met / MISSED), and
writes JSON (default ``benchmarks/results/<UTC date>.json``). The method is in
``docs/performance.md``; every ratio is taken between numbers of this one invocation, and a
failed size of any section is run again inside it (``harness.RETRIES``, recorded in the JSON).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.harness import HERE, KIB, MIB, ROOT, Runner, load_average
from insitu.interrupt import Interrupted, terminated_cleanly

# the sections the targets need first: a run cut short still has them
SECTIONS = ("floor", "insitu", "paced", "adios2", "deisa", "startup", "cpu", "hotcore", "posthoc", "memory", "scaling",
            "sched", "relay")  # fmt: skip


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("ray", "dask", "numpy", "mpi4py", "mpich", "adios2"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _git() -> dict[str, Any]:
    def git(*args: str) -> str:
        got = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return got.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "modified": git("status", "--porcelain", "--untracked-files=no")
            .splitlines()}  # fmt: skip


def run_section(section: str, runner: Runner, results: dict[str, Any], sizes: list[int], steps: int, warmup: int,
                quick: bool) -> None:  # fmt: skip
    """Run one named section and store its numbers in ``results``."""
    from benchmarks import sections_insitu as si
    from benchmarks import sections_peers as sp
    from benchmarks import sections_ray as sr

    small_big = [x for x in sizes if x in (64 * KIB, 8 * MIB)] or sizes[:1]
    if section == "floor":
        results.update(si.section_floor(sizes, quick))
    elif section == "insitu":
        results["insitu"] = si.section_insitu(runner, sizes, steps, warmup, quick)
    elif section == "paced":
        results["paced"] = si.section_paced(runner, small_big, steps, warmup)
    elif section == "hotcore":
        results["hotcore"] = si.section_hotcore(runner, small_big, steps, results.get("empty_actor_call_s"))
    elif section == "cpu":
        results["cpu"] = si.section_cpu(runner, small_big, steps, warmup)
    elif section == "startup":
        results["startup"] = si.section_startup(runner)
    elif section == "posthoc":
        results["posthoc"] = sp.section_posthoc(runner, sizes, steps, warmup)
    elif section == "adios2":
        results["adios2"] = sp.section_adios2(runner, sizes, steps, warmup)
    elif section == "deisa":
        results["deisa"] = sp.section_deisa(sizes, steps, warmup)
    elif section == "relay":
        results["relay"] = sr.section_relay(runner, sizes, 10 if quick else 50)
    elif section == "sched":
        results["sched"] = sr.section_sched(50)
    elif section == "scaling":
        results["scaling"] = si.section_scaling(runner, min(steps, 50))
    elif section == "memory":
        results["memory"] = si.section_memory(runner, 1000)
    else:
        raise ValueError(f"unknown section {section!r}; known: {', '.join(SECTIONS)}")


def main(argv: list[str] | None = None) -> int:
    """The command (see the module docstring); returns 1 if a section failed.

    SIGTERM or SIGINT stops it: the private cluster and the simulation of the section under way
    are torn down, the JSON keeps what was measured, and the exit code is 128 + the signal.
    """
    try:
        with terminated_cleanly():
            return _main(argv)
    except Interrupted as exc:
        print(f"benchmarks.run: {exc}; its cluster and simulations were torn down", file=sys.stderr, flush=True)
        return exc.exit_code


def _main(argv: list[str] | None) -> int:
    from benchmarks.targets import compare, print_targets, targets

    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: floor and insitu at 64 KiB, 5 steps")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated, in this order")
    p.add_argument("--sizes", default=f"{64 * KIB},{512 * KIB},{8 * MIB},{32 * MIB}", help="bytes per rank")
    p.add_argument("--steps", type=int, default=200, help="measured steps per run (after 10 warm-up steps)")
    p.add_argument("--out", default=None, help="JSON output (default benchmarks/results/<UTC date>.json)")
    p.add_argument("--allow-skip", action="store_true",
                   help="exit 0 even when a peer or a size was skipped or failed after its retries")  # fmt: skip
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    steps, warmup = args.steps, 10
    if args.quick:
        sizes, steps, warmup, args.sections = [64 * KIB], 5, 2, "floor,insitu"
    sections = args.sections.split(",")
    now = dt.datetime.now(dt.UTC)
    out = Path(args.out or HERE / "results" / f"{now:%Y-%m-%d}.json")
    results: dict[str, Any] = {
        "started_utc": now.isoformat(timespec="seconds"),
        "command": [Path(sys.executable).name, "-m", "benchmarks.run", *(sys.argv[1:] if argv is None else argv)],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), **_versions()},
        "git": _git(),
        "steps": steps,
        "warmup": warmup,
        "sizes": sizes,
        "sections": sections,
        "load_average": {"start": load_average()},
    }
    runner = Runner(nodes=1 if args.quick else 4, dashboard="memory" in sections)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        for section in sections:
            t0 = time.monotonic()
            try:
                run_section(section, runner, results, sizes, steps, warmup, args.quick)
            except Exception as exc:  # noqa: BLE001 - one broken section must not lose the others' numbers
                results.setdefault("errors", {})[section] = f"{type(exc).__name__}: {exc}"
                print(f"{section:7} FAILED: {type(exc).__name__}: {exc}", flush=True)
            results.setdefault("section_seconds", {})[section] = round(time.monotonic() - t0, 1)
            results["load_average"][section] = load_average()
            out.write_text(json.dumps(results, indent=1))
        results["compare"] = compare(results)
        results["targets"] = targets(results)
        print_targets(results["targets"])
    finally:
        results["finished_utc"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        results["load_average"]["end"] = load_average()
        out.write_text(json.dumps(results, indent=1))
        runner.close()
    print(f"results written to {out}")
    skipped = skips(results)
    for what in skipped:
        print(f"SKIPPED {what}", flush=True)
    if skipped and not args.allow_skip:
        print(f"{len(skipped)} measurement(s) skipped or failed: exit 1 (--allow-skip to accept)", flush=True)
        return 1
    return 1 if results.get("errors") else 0


def skips(results: dict[str, Any]) -> list[str]:
    """Every section that was skipped or failed, and every size that failed after its retries.

    Examples
    --------
    >>> skips({"adios2": "skipped: adios2 is not installed", "deisa": [{"size": 65536, "error": "x"}],
    ...        "errors": {"cpu": "boom"}, "insitu": [{"size": 1}]})
    ['adios2: skipped: adios2 is not installed', 'deisa: 64 KiB failed: x', 'cpu: boom']
    """
    out = []
    for section, value in results.items():
        if isinstance(value, str) and value.startswith("skipped"):
            out.append(f"{section}: {value}")
        elif isinstance(value, list):
            out += [f"{section}: {row['size'] // KIB} KiB failed: {row['error']}" for row in value
                    if isinstance(row, dict) and "error" in row and "size" in row]  # fmt: skip
    out += [f"{section}: {why}" for section, why in results.get("errors", {}).items()]
    return out


if __name__ == "__main__":
    sys.exit(main())
