"""Benchmark simulation: every rank sends a block of CHUNK bytes per step and times each send.

Usage (under mpiexec): ``python sim_bench.py '<json options>'``; writes ``rank<r>.json`` into
``options["out"]`` with the per-step send times, loop times, the CPU time of the measured loop,
the RSS before and after the set-up and (rank 0) the wall times of the end of the set-up (after a
barrier: every rank is ready) and of the first send.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI


def stencil(u: np.ndarray, reps: int) -> None:
    """A busy numpy 5-point stencil, standing in for compute."""
    for _ in range(reps):
        u[1:-1, 1:-1] = 0.25 * (u[:-2, 1:-1] + u[2:, 1:-1] + u[1:-1, :-2] + u[1:-1, 2:])


def main() -> int:
    opt = json.loads(sys.argv[1])
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    n = max(1, opt["chunk"] // 8)
    rows = max(1, int(np.sqrt(n)))
    cols = max(1, n // rows)
    block = np.random.default_rng(rank).random((rows, cols))
    steps, warmup = opt["steps"], opt.get("warmup", 10)
    pace, pace_arg = opt.get("pace", "none"), opt.get("pace_arg", 0)
    work = np.random.default_rng(0).random((256, 256))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t_init = time.perf_counter()
    bridge = None
    if opt.get("insitu", True):
        import insitu

        spec = insitu.ArraySpec("u", (rows * size, cols), "f8", start=(rows * rank, 0), shape=(rows, cols))
        bridge = insitu.Bridge([spec], comm=world, run=opt["run"], in_flight=opt.get("in_flight", 2))
    adios_stream = None
    if opt.get("adios2"):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from peer_adios2 import writer

        adios_stream, _adios = writer(opt["adios2"], rank)
    deisa = None
    if opt.get("deisa"):
        from deisa.ray import Bridge as DeisaBridge

        meta = {"u": {"global_shape": (rows * size, cols), "chunk_shape": (rows, cols), "chunk_position": (rank, 0)}}
        deisa = DeisaBridge(comm=world, arrays_metadata=meta)
    init_s = time.perf_counter() - t_init
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sends, loops = [], []
    world.Barrier()
    ready_wall = time.time()  # every rank has finished its set-up
    first_send_wall = None
    cpu0 = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            cpu0 = time.process_time()
        t0 = time.perf_counter()
        if pace == "sleep":
            time.sleep(pace_arg)
        elif pace == "stencil":
            stencil(work, pace_arg)
        elif pace == "spin":  # a compute phase that keeps the core busy (and hot)
            end = time.perf_counter() + pace_arg
            while time.perf_counter() < end:
                pass
        block += 1.0
        t1 = time.perf_counter()
        if step == 0 and rank == 0:
            first_send_wall = time.time()
        if bridge is not None:
            bridge.send(step, u=block)
        elif deisa is not None:
            deisa.send("u", block, step)
        elif adios_stream is not None:
            adios_stream.begin_step()
            adios_stream.write("u", block, block.shape, (0, 0), block.shape)
            adios_stream.end_step()
        elif opt.get("posthoc"):
            np.save(os.path.join(opt["posthoc"], f"s{step:06d}-r{rank:04d}.npy"), block)
        t2 = time.perf_counter()
        if step >= warmup:
            sends.append(t2 - t1)
            loops.append(t2 - t0)
    loop_cpu = time.process_time() - cpu0
    if bridge is not None:
        bridge.close()
    if adios_stream is not None:
        adios_stream.close()
    if deisa is not None:  # its ranks own the chunks: wait until the analytics has read the last one
        end = time.monotonic() + opt["deisa"]["deadline"]
        while deisa.get(opt["deisa"]["done_key"], timestep=warmup + steps - 1) is None:
            if world.bcast(time.monotonic() > end, root=0):  # the same decision on every rank
                raise TimeoutError(f"rank {rank}: the deisa-ray analytics did not read step {warmup + steps - 1}")
            time.sleep(0.05)
        deisa.close(warmup + steps)
    rss2 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {
        "rank": rank,
        "send_s": sends,
        "loop_s": loops,
        "first_send_wall": first_send_wall,
        "ready_wall": ready_wall,
        "loop_cpu_s": loop_cpu,
        "init_s": init_s,
        "rss_before_kb": rss0,
        "rss_after_init_kb": rss1,
        "rss_end_kb": rss2,
    }
    with open(os.path.join(opt["out"], f"rank{rank}.json"), "w") as fh:
        json.dump(out, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
