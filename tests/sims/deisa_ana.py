"""A deisa-ray-form analytics for test_deisa_compat.py: per-array windows and exception handlers.

``reaction`` reads ``Window("U", 3)`` and ``"V"`` (a window of 1) and records the timesteps it saw;
``flaky`` raises ``ValueError`` at timestep 1, which its ``exception_handler`` records, and the run
goes on. Writes one JSON object to the file named by ``argv[1]``. With ``--cadence`` (``argv[2]``):
"AND" and "OR" callbacks over U and V sent at their own cadence instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from insitu.compat.deisa import Deisa, Window


def cadence() -> dict[str, Any]:
    """``--cadence``: "AND" and "OR" callbacks over U (every timestep) and V (its own cadence)."""
    seen: dict[str, Any] = {"and": [], "or": []}
    d = Deisa()

    @d.register("U", Window("V", size=2))
    def both(U: list[Any], V: list[Any]) -> None:  # noqa: N803
        seen["and"].append({"U": [a.t for a in U], "V": [a.t for a in V]})

    @d.register("U", Window("V", size=2), when="OR")
    def either(U: list[Any], V: list[Any]) -> None:  # noqa: N803
        seen["or"].append({"U": [a.t for a in U], "V": [a.t for a in V], "V_mean": float(V[-1].mean().compute())})

    d.execute_callbacks()
    seen["steps"] = d.summary.steps
    return seen


def main() -> int:
    if sys.argv[2:] == ["--cadence"]:
        Path(sys.argv[1]).write_text(json.dumps(cadence()))
        return 0
    seen: dict[str, Any] = {"reaction": [], "flaky": [], "handled": []}
    d = Deisa()

    @d.register(Window("U", size=3), "V")
    def reaction(U: list[Any], V: list[Any]) -> None:  # noqa: N803 - arrays by name, as deisa-ray passes them
        seen["reaction"].append({"U": [a.t for a in U], "V": [a.timestep for a in V], "step": U[-1].step})

    def handler(exc: BaseException) -> None:
        seen["handled"].append(f"{type(exc).__name__}: {exc}")

    @d.register("V", exception_handler=handler, when="OR")
    def flaky(V: list[Any]) -> None:  # noqa: N803
        seen["flaky"].append(V[-1].t)
        if V[-1].t == 1:
            raise ValueError("planned failure at timestep 1")

    d.execute_callbacks()
    seen["steps"] = d.summary.steps
    seen["summary_handled"] = d.summary.handled
    Path(sys.argv[1]).write_text(json.dumps(seen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
