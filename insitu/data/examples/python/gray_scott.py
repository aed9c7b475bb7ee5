"""Gray-Scott reaction-diffusion on an MPI Cartesian grid, written against deisa-ray's API.

Two fields, U and V, on a periodic square; each rank owns a block with one ghost layer,
exchanged with its four neighbours every step. Every step sends U and V, each in its own
``send(array_name=..., chunk=..., timestep=...)`` call, as deisa-ray simulations do. The
only line that differs from the deisa-ray program is the import of ``Bridge``::

    from deisa.ray.bridge import Bridge          # deisa-ray
    from insitu.compat.deisa import Bridge       # the same program on insitu

Run (next to ``$(insitu config --data)/analytics/gray_scott_stats.py``)::

    mpiexec -n 4 python "$(insitu config --data)/examples/python/gray_scott.py" --n 64 --steps 100

with ``INSITU_ADDRESS`` and ``INSITU_RUN`` set (``RAY_ADDRESS`` works as well). The
insitu-native form of this program is in ``docs/migrating-from-deisa.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from mpi4py import MPI

from insitu.compat.deisa import Bridge


def split(n: int, parts: int, index: int) -> tuple[int, int]:
    """Start and size of block ``index`` of ``n`` cells split into ``parts`` (uneven allowed)."""
    base, extra = divmod(n, parts)
    return index * base + min(index, extra), base + (1 if index < extra else 0)


def initial_fields(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The global initial U, V: U = 1, V = 0, a perturbed square in the middle (the same on every rank)."""
    u, v = np.ones((n, n)), np.zeros((n, n))
    lo, hi = n // 2 - n // 8, n // 2 + n // 8
    u[lo:hi, lo:hi], v[lo:hi, lo:hi] = 0.50, 0.25
    noise = np.random.default_rng(seed).uniform(-0.01, 0.01, (2, n, n))
    return u + noise[0], v + noise[1]


def exchange(cart: MPI.Cartcomm, f: np.ndarray) -> None:
    """Fill the ghost layers of ``f`` from the neighbours (periodic)."""
    for axis in (0, 1):
        lo, hi = cart.Shift(axis, 1)
        first = np.ascontiguousarray(f[1, :] if axis == 0 else f[:, 1])
        last = np.ascontiguousarray(f[-2, :] if axis == 0 else f[:, -2])
        from_lo, from_hi = np.empty_like(first), np.empty_like(last)
        cart.Sendrecv(last, dest=hi, recvbuf=from_lo, source=lo)
        cart.Sendrecv(first, dest=lo, recvbuf=from_hi, source=hi)
        if axis == 0:
            f[0, :], f[-1, :] = from_lo, from_hi
        else:
            f[:, 0], f[:, -1] = from_lo, from_hi


def laplacian(f: np.ndarray) -> np.ndarray:
    """5-point Laplacian of the interior of ``f`` (ghost layers filled)."""
    return f[:-2, 1:-1] + f[2:, 1:-1] + f[1:-1, :-2] + f[1:-1, 2:] - 4 * f[1:-1, 1:-1]


def dump(cart: MPI.Cartcomm, where: Path, step: int, start: tuple[int, int], n: int, u: np.ndarray,
         v: np.ndarray) -> None:  # fmt: skip
    """Test aid: rank 0 writes the global U and V of ``step`` to ``where/stepNNNNN.npz``."""
    blocks = cart.gather((start, u[1:-1, 1:-1].copy(), v[1:-1, 1:-1].copy()), root=0)
    if cart.Get_rank() == 0:
        gu, gv = np.empty((n, n)), np.empty((n, n))
        for (x, y), bu, bv in blocks:
            gu[x : x + bu.shape[0], y : y + bu.shape[1]] = bu
            gv[x : x + bv.shape[0], y : y + bv.shape[1]] = bv
        where.mkdir(parents=True, exist_ok=True)
        np.savez(where / f"step{step:05d}.npz", U=gu, V=gv)


MODEL = {"du": 0.16, "dv": 0.08, "feed": 0.035, "kill": 0.065}  # diffusion of U and V, feed and kill rates


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=64, help="cells per side")
    p.add_argument("--steps", type=int, default=100)
    for name, value in MODEL.items():
        p.add_argument(f"--{name}", type=float, default=value)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--pack",
        action="store_true",
        help="send from one contiguous scratch buffer, reused for U and V (as codes that pack fields do)",
    )
    p.add_argument("--dump", type=Path, default=None, help="test aid: rank 0 saves the global U, V per step here")
    p.add_argument("--v-every", type=int, default=1, help="send V every N timesteps only (arrays at their own cadence)")
    args = p.parse_args(argv)

    world = MPI.COMM_WORLD
    cart = world.Create_cart(MPI.Compute_dims(world.Get_size(), 2), periods=[True, True])
    dims, _, (cx, cy) = cart.Get_topo()
    (x0, lx), (y0, ly) = split(args.n, dims[0], cx), split(args.n, dims[1], cy)
    gu, gv = initial_fields(args.n, args.seed)
    u, v = np.zeros((lx + 2, ly + 2)), np.zeros((lx + 2, ly + 2))
    u[1:-1, 1:-1], v[1:-1, 1:-1] = gu[x0 : x0 + lx, y0 : y0 + ly], gv[x0 : x0 + lx, y0 : y0 + ly]

    # deisa-ray metadata: the chunk's index in the grid of chunks and its extent
    meta = {"global_shape": (args.n, args.n), "chunk_shape": (lx, ly), "chunk_position": (cx, cy)}
    bridge = Bridge(comm=cart, arrays_metadata={"U": dict(meta), "V": dict(meta)})
    scratch = np.empty((lx, ly))
    for step in range(args.steps):
        exchange(cart, u)
        exchange(cart, v)
        uvv = u[1:-1, 1:-1] * v[1:-1, 1:-1] ** 2
        du = args.du * laplacian(u) - uvv + args.feed * (1 - u[1:-1, 1:-1])
        dv = args.dv * laplacian(v) + uvv - (args.feed + args.kill) * v[1:-1, 1:-1]
        u[1:-1, 1:-1] += du
        v[1:-1, 1:-1] += dv
        if args.pack:  # the bridge must not keep a reference to the buffer past send()
            scratch[...] = u[1:-1, 1:-1]
            bridge.send(array_name="U", chunk=scratch, timestep=step)
            scratch[...] = v[1:-1, 1:-1]
            bridge.send(array_name="V", chunk=scratch, timestep=step)
        else:
            bridge.send(array_name="U", chunk=u[1:-1, 1:-1], timestep=step)
            if step % args.v_every == 0:
                bridge.send(array_name="V", chunk=v[1:-1, 1:-1], timestep=step)
        if args.dump is not None:
            dump(cart, args.dump, step, (x0, y0), args.n, u, v)
    # feedback of gray_scott_stats: [(timestep, mean of V), ...] as far as it reached this rank
    reported = bridge.get("V_mean", default=[])
    bridge.close(timestep=args.steps)
    if cart.Get_rank() == 0:
        print(f"gray_scott: {world.Get_size()} ranks ({dims[0]}x{dims[1]}), {args.steps} steps", flush=True)
        print("feedback " + json.dumps(reported), flush=True)
    cart.Free()
    return 0


if __name__ == "__main__":
    sys.exit(main())
