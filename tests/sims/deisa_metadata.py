"""Run under ``mpiexec -n 4`` by test_deisa_compat.py (no cluster needed): deisa-ray metadata to insitu blocks.

Rank 0 prints one JSON list, an object per rank: its blocks of an uneven 2x2 split, and what the compat
``Bridge`` and ``block_layout`` raised for a malformed entry on rank 2, for two ranks claiming one chunk,
for a timestep that begins before the previous one was complete, and for a ragged chunk on rank 1.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
from mpi4py import MPI

from insitu.compat.deisa import Bridge, block_layout
from insitu.errors import InsituError

ROWS, COLS = (6, 4), (4, 3)  # uneven: global shape (10, 7)


def metadata(px: int, py: int) -> dict[str, Any]:
    meta = {"global_shape": (10, 7), "chunk_shape": (ROWS[px], COLS[py]), "chunk_position": (px, py)}
    return {"U": dict(meta), "V": dict(meta)}


def outcome(call: Any) -> dict[str, Any]:
    try:
        call()
    except InsituError as exc:
        return {"raised": type(exc).__name__, "message": str(exc)}
    return {"raised": None}


def main() -> int:
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    px, py = divmod(rank, 2)
    good = block_layout(metadata(px, py), comm)
    bad = metadata(px, py)
    if rank == 2:
        bad["V"]["chunk_shape"] = (4, "3")
    malformed = outcome(lambda: Bridge(comm=comm, arrays_metadata=bad))
    twice = metadata(px, py)
    if rank == 3:
        twice["U"].update(chunk_position=(1, 0), chunk_shape=(4, 4))  # rank 2's chunk
    overlap = outcome(lambda: block_layout(twice, comm))
    after = block_layout(metadata(px, py), comm)  # the next call works
    bridge = Bridge(comm=comm, arrays_metadata=metadata(px, py))
    chunk = np.zeros((ROWS[px], COLS[py]))
    bridge.send(array_name="U", chunk=chunk, timestep=0)
    incomplete = outcome(lambda: bridge.send(array_name="U", chunk=chunk, timestep=1))  # V of timestep 0 missing
    ragged = Bridge(comm=comm, arrays_metadata=metadata(px, py))
    ragged.send(array_name="U", chunk=[[1.0, 2.0], [3.0]] if rank == 1 else chunk, timestep=0)
    not_array = outcome(lambda: ragged.send(array_name="V", chunk=chunk, timestep=0))
    out = {
        "rank": rank,
        "blocks": {n: {"global_shape": b.global_shape, "start": b.start, "shape": b.shape} for n, b in good.items()},
        "malformed": malformed,
        "overlap": overlap,
        "after_ok": after == good,
        "incomplete": incomplete,
        "not_array": not_array,
    }
    everyone = comm.gather(out, root=0)
    if rank == 0:
        print(json.dumps(everyone), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
