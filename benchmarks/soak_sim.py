"""Soak simulation (``benchmarks/soak.py``): every rank sends a block of ``chunk`` bytes per step.

Usage (under mpiexec): ``python soak_sim.py '<json options>'``. The block of rank ``r`` at step
``s`` is filled with ``s + r / 1000`` so the analytics can check every value. Each rank writes
``pid<r>`` at start and ``rank<r>.json`` at the end (counters, the gaps ``bridge.gaps`` reported,
the steps it dropped) into ``options["out"]``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

import insitu


def main() -> int:
    opt = json.loads(sys.argv[1])
    out = Path(opt["out"])
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    (out / f"pid{rank}").write_text(str(os.getpid()))
    cols = 128
    rows = max(1, opt["chunk"] // 8 // cols)
    spec = insitu.ArraySpec("u", (rows * size, cols), "f8", start=(rows * rank, 0), shape=(rows, cols))
    block = np.empty((rows, cols))
    dropped: list[int] = []
    with insitu.Bridge([spec], comm=world, run=opt["run"]) as bridge:
        for step in range(opt["steps"]):
            block.fill(step + rank / 1000)
            before = bridge.stats.dropped
            bridge.send(step, u=block)
            if bridge.stats.dropped > before:
                dropped.append(step)
            time.sleep(opt.get("pace", 0.0))
        bridge.close()
        stats = bridge.stats
        gaps = bridge.gaps
    result = {"rank": rank, "sent": stats.sent, "skipped": stats.skipped, "dropped": stats.dropped,
              "reconnects": stats.reconnects, "gaps": gaps, "dropped_steps": dropped}  # fmt: skip
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
