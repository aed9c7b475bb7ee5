"""Test analytics: save every step of the named arrays as ``<out>/<name>_<step>.npy`` (and their dtypes).

Usage: ``python save_steps.py --out DIR [--each] U V ...`` (run name from ``INSITU_RUN``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

import insitu


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--each", action="store_true", help="one callback per array; steps.json maps array -> steps")
    p.add_argument("arrays", nargs="+")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    analytics = insitu.Analytics()
    steps: dict[str, list[int]] = {}

    def save(step: int, **arrays: Any) -> None:
        for name, window in arrays.items():
            np.save(args.out / f"{name}_{step}.npy", np.asarray(window[-1].compute()))
            steps.setdefault(name, []).append(int(step))

    for group in [[a] for a in args.arrays] if args.each else [args.arrays]:
        analytics.on_step(*group)(save)
    analytics.run()
    (args.out / "steps.json").write_text(json.dumps(steps if args.each else steps[args.arrays[0]]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
