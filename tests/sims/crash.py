"""A simulation whose last rank exits with code 3 after a few steps, without closing (launch tests)."""

from __future__ import annotations

import os
import sys

import numpy as np
from mpi4py import MPI

import insitu


def main() -> int:
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    spec = insitu.ArraySpec("temperature", (4 * size, 4), "f8", start=(4 * rank, 0), shape=(4, 4))
    bridge = insitu.Bridge([spec], comm=comm)
    for step in range(5):
        bridge.send(step, temperature=np.full((4, 4), float(step)))
    if rank == size - 1:
        os._exit(3)
    bridge.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
