"""Per-step statistics of Gray-Scott's U and V, written against deisa-ray's analytics API.

For every timestep: the mean and maximum of U and V and, from the second timestep on, the
change of the mean of V over a window of two timesteps; the mean of V goes back to the
simulation as feedback (``Bridge.get("V_mean", timestep=t)``). The only line that differs from the
deisa-ray program is the import::

    from deisa.ray import Deisa, Window          # deisa-ray
    from insitu.compat.deisa import Deisa, Window  # the same program on insitu

Run next to ``$(insitu config --data)/examples/python/gray_scott.py``::

    python "$(insitu config --data)/analytics/gray_scott_stats.py" --out stats.json

(with ``INSITU_ADDRESS`` and ``INSITU_RUN`` set). Writes ``{timestep: {...}}`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import dask

from insitu.compat.deisa import Deisa, Window


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="JSON file of the statistics by timestep")
    args = p.parse_args(argv)

    stats: dict[int, dict[str, Any]] = {}
    d = Deisa()

    @d.register(Window("U", size=2), Window("V", size=2))
    def reaction(U: list[Any], V: list[Any]) -> None:  # noqa: N803 - deisa-ray passes the arrays by name
        u, v = U[-1], V[-1]
        umean, umax, vmean, vmax = dask.compute(u.mean(), u.max(), v.mean(), v.max())
        row = {"U_mean": float(umean), "U_max": float(umax), "V_mean": float(vmean), "V_max": float(vmax),
               "window": [a.t for a in V]}  # fmt: skip
        if len(V) == 2:
            row["dV_mean"] = float((V[1] - V[0]).mean().compute())
        stats[v.t] = row
        d.set("V_mean", row["V_mean"], timestep=v.t)  # feedback: Bridge.get("V_mean", timestep=t)

    d.execute_callbacks()
    args.out.write_text(json.dumps(stats, indent=1))
    print(f"gray_scott_stats: {len(stats)} timesteps", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
