"""A 2D heat equation on an MPI Cartesian grid, coupled to insitu.

Explicit finite differences (5-point stencil), one ghost layer exchanged with
the four neighbours every step, a hot square in the middle of a cold plate
with fixed cold edges. Every step sends the field's interior (a view) to
insitu and reads the ``stop`` steering value.

Run::

    mpiexec -n 4 python "$(insitu config --data)/examples/python/heat2d.py" --run demo --nx 256 --ny 256 --steps 200

(with ``INSITU_ADDRESS`` and, on a token-protected cluster, ``INSITU_AUTH_TOKEN_PATH`` set).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

import insitu


def split(n: int, parts: int, index: int) -> tuple[int, int]:
    """Start and size of block ``index`` of ``n`` cells split into ``parts`` (uneven allowed)."""
    base, extra = divmod(n, parts)
    size = base + (1 if index < extra else 0)
    return index * base + min(index, extra), size


def initial_field(nx: int, ny: int, x0: int, y0: int, lx: int, ly: int) -> np.ndarray:
    """This rank's block (with one ghost layer) of the initial condition."""
    u = np.zeros((lx + 2, ly + 2))
    gx = np.arange(x0, x0 + lx)[:, None]
    gy = np.arange(y0, y0 + ly)[None, :]
    hot = (abs(gx - nx / 2) < nx / 16) & (abs(gy - ny / 2) < ny / 16)
    u[1:-1, 1:-1] = np.where(hot, 100.0, 0.0)
    return u


def exchange(cart: MPI.Cartcomm, u: np.ndarray) -> None:
    """Fill the ghost layers from the neighbours (edges of the plate stay at 0)."""
    for axis in (0, 1):
        lo, hi = cart.Shift(axis, 1)
        first = u[1, :] if axis == 0 else u[:, 1]
        last = u[-2, :] if axis == 0 else u[:, -2]
        recv_lo = np.zeros_like(first)
        recv_hi = np.zeros_like(last)
        cart.Sendrecv(np.ascontiguousarray(last), dest=hi, recvbuf=recv_lo, source=lo)
        cart.Sendrecv(np.ascontiguousarray(first), dest=lo, recvbuf=recv_hi, source=hi)
        if axis == 0:
            u[0, :], u[-1, :] = recv_lo, recv_hi
        else:
            u[:, 0], u[:, -1] = recv_lo, recv_hi


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default=None, help="run name (default: INSITU_RUN / SLURM_JOB_ID)")
    p.add_argument("--nx", type=int, default=128)
    p.add_argument("--ny", type=int, default=128)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--alpha", type=float, default=0.2, help="diffusion number (stable below 0.25)")
    p.add_argument("--dump", type=Path, default=None, help="test aid: rank 0 saves the global field per step here")
    p.add_argument("--sleep", type=float, default=0.0, help="seconds per step spent idle (paces a demo or a test)")
    args = p.parse_args(argv)

    world = MPI.COMM_WORLD
    dims = MPI.Compute_dims(world.Get_size(), 2)
    cart = world.Create_cart(dims, periods=[False, False])
    cx, cy = cart.Get_coords(cart.Get_rank())
    x0, lx = split(args.nx, dims[0], cx)
    y0, ly = split(args.ny, dims[1], cy)
    u = initial_field(args.nx, args.ny, x0, y0, lx, ly)

    spec = insitu.ArraySpec.from_cart("temperature", cart, (lx, ly), u.dtype)
    last = -1
    with insitu.Bridge([spec], comm=cart, run=args.run) as bridge:
        for step in range(args.steps):
            exchange(cart, u)
            lap = u[:-2, 1:-1] + u[2:, 1:-1] + u[1:-1, :-2] + u[1:-1, 2:] - 4 * u[1:-1, 1:-1]
            u[1:-1, 1:-1] += args.alpha * lap
            bridge.send(step, temperature=u[1:-1, 1:-1])
            if args.dump is not None:
                blocks = cart.gather((x0, y0, u[1:-1, 1:-1].copy()), root=0)
                if cart.Get_rank() == 0:
                    field = np.empty((args.nx, args.ny))
                    for bx, by, b in blocks:
                        field[bx : bx + b.shape[0], by : by + b.shape[1]] = b
                    args.dump.mkdir(parents=True, exist_ok=True)
                    np.save(args.dump / f"step{step:05d}.npy", field)
            last = step
            if args.sleep:
                time.sleep(args.sleep)
            if bridge.get("stop"):
                break
        stats = bridge.stats
    if cart.Get_rank() == 0:
        print(
            f"heat2d: {world.Get_size()} ranks ({dims[0]}x{dims[1]}), last step {last}, "
            f"sent {stats.sent}, skipped {stats.skipped}, dropped {stats.dropped}",
            flush=True,
        )
    print(f"rank {world.Get_rank()} stopped after step {last}", file=sys.stderr, flush=True)
    host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    cpus = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    print(f"rank {world.Get_rank()} host {host} insitu node {os.environ.get('INSITU_NODE', '')} cpus {cpus}",
          file=sys.stderr)  # fmt: skip
    cart.Free()
    return 0


if __name__ == "__main__":
    sys.exit(main())
