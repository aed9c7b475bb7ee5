"""ADIOS2 SST peer: a reader process computing the global mean per step of N writer streams.

The ``adios2`` wheel is a serial build, so each simulation rank writes its own SST stream
(``<name>-r<rank>``) and the reader opens them all; everything stays on loopback.
Usage: ``python peer_adios2.py '<json: name, ranks, steps, out>'`` (the reader).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np

PARAMS = {
    "NetworkInterface": "lo",
    "ControlInterface": "lo",
    "DataInterface": "lo",
    "RendezvousReaderCount": "1",
    "QueueLimit": "2",
    "QueueFullPolicy": "Block",
    "OpenTimeoutSecs": "120",
}


def io_for(adios: Any, name: str) -> Any:
    """An SST IO kept on loopback, with ADIOS2's back-pressure set like insitu's (2 steps, block)."""
    io = adios.declare_io(name)
    io.set_engine("SST")
    io.set_parameters(PARAMS)
    return io


def writer(name: str, rank: int) -> Any:
    """Open the SST writer stream of ``rank`` (used by ``sim_bench.py``)."""
    import adios2

    adios = adios2.Adios()
    return adios2.Stream(io_for(adios, f"w{rank}"), f"{name}-r{rank}", "w"), adios


def main() -> int:
    import adios2

    opt = json.loads(sys.argv[1])
    adios = adios2.Adios()
    streams = [adios2.Stream(io_for(adios, f"r{r}"), f"{opt['name']}-r{r}", "r") for r in range(opt["ranks"])]
    means = []
    t_end = None
    for _ in range(opt["steps"]):
        parts = []
        for s in streams:
            s.begin_step()
            parts.append(np.asarray(s.read("u")))
            s.end_step()
        means.append(float(np.mean(np.concatenate([p.ravel() for p in parts]))))
        t_end = time.time()
    for s in streams:
        s.close()
    with open(opt["out"], "w") as fh:
        json.dump({"t_end": t_end, "steps": len(means)}, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
