"""Online training of a surrogate of heat2d on a slice, data-parallel with torch.distributed.

The model predicts the next temperature field from the two previous ones (a 3x3 convolution
over 2 input channels: enough to learn the 5-point stencil). Every analytics step (a window of
3 fields) the pool's slice trains on it:

* each host of the slice reads *its* blocks of the window straight from the chunks' object
  refs (``Analytics.blocks``): nothing is gathered through this process;
* hosts form one ``torch.distributed`` group (gloo on CPU, nccl on GPU) and average gradients
  every iteration, so parameters stay identical on every host;
* the loss on the new step, before training on it (how well the surrogate predicts data it
  has not seen), is reported per step.

Run next to heat2d (the cluster's nodes must carry the slice resource, e.g. ``insitu_slice_a``
on two raylets)::

    DATA=$(insitu config --data)
    mpiexec -n 4 python "$DATA/examples/python/heat2d.py" --nx 32 --ny 32 --steps 40 &
    python "$DATA/analytics/train_surrogate.py" --hosts 2 --out surrogate.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

import insitu
from insitu.pool import Grouping, HostEnv, SlicePool, SliceSpec

SCALE = 100.0  # heat2d's hot square: fields in [0, 100]


def free_port(env: HostEnv) -> tuple[str, int]:
    """On host 0: an address the slice's process group can rendezvous on."""
    with socket.socket() as s:
        s.bind((env.node_ip, 0))
        return env.node_ip, s.getsockname()[1]


def setup(env: HostEnv, master: tuple[str, int], cfg: dict[str, Any]) -> str:
    """Once per host: process group, model and optimizer, kept in the host's state."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    device = torch.device(f"cuda:{0}" if cfg["device"] == "cuda" else "cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{master[0]}:{master[1]}", rank=env.host_index,
                            world_size=env.hosts, timeout=datetime.timedelta(seconds=cfg["timeout"]))  # fmt: skip
    torch.manual_seed(cfg["seed"])
    model = torch.nn.Conv2d(2, 1, kernel_size=3, padding=1).to(device)
    env.state.update(model=model, device=device, opt=torch.optim.Adam(model.parameters(), lr=cfg["lr"]))
    return f"{backend} rank {env.host_index}/{env.hosts} on {env.node_ip} ({env.device_kind.value})"


def train_step(env: HostEnv, shards: list[list[list[insitu.BlockRef]]], cfg: dict[str, Any]) -> float:
    """Read this host's blocks of the window, report the loss on them, train ``iters`` iterations."""
    import numpy as np
    import ray
    import torch
    import torch.distributed as dist

    model, opt, device = env.state["model"], env.state["opt"], env.state["device"]
    mine = shards[env.host_index]  # per block: [older, old, new] block refs
    xs, ys = [], []
    for window in mine:
        fields = [np.asarray(ray.get(b.ref, timeout=cfg["timeout"])[b.index], dtype=np.float32) for b in window]
        xs.append(np.stack(fields[:2]) / SCALE)
        ys.append(fields[2][None] / SCALE)
    x = torch.from_numpy(np.stack(xs)).to(device) if xs else torch.zeros((0, 2, 3, 3), device=device)
    y = torch.from_numpy(np.stack(ys)).to(device) if ys else torch.zeros((0, 1, 3, 3), device=device)
    count = torch.tensor([float(len(xs))], device=device)
    dist.all_reduce(count)

    def loss_sum() -> torch.Tensor:
        if not xs:
            return sum(p.sum() * 0.0 for p in model.parameters())  # joins the all-reduce with zeros
        err = (model(x) - y)[..., 1:-1, 1:-1]  # block edges lack their neighbours: not scored
        return (err**2).mean(dim=(1, 2, 3)).sum()

    with torch.no_grad():
        seen = loss_sum().detach().reshape(1)
    dist.all_reduce(seen)
    for _ in range(cfg["iters"]):
        opt.zero_grad()
        (loss_sum() / count).backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)  # sum of per-host shares of the mean gradient
        opt.step()
    return float(seen.item() / count.item())


def parameters(env: HostEnv) -> list[float]:
    return [float(v) for p in env.state["model"].parameters() for v in p.detach().cpu().flatten()]


def teardown(env: HostEnv) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    env.state.clear()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default=None)
    p.add_argument("--out", type=Path, default=Path("surrogate.json"))
    p.add_argument("--hosts", type=int, default=2, help="hosts per slice")
    p.add_argument("--prefix", default="insitu_slice_", help="custom-resource prefix naming slices")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--iters", type=int, default=10, help="optimizer iterations per simulation step")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds any host may wait for the others")
    p.add_argument("--bypass", type=Path, default=None, help="bypass YAML (docs/record-replay.md)")
    args = p.parse_args(argv)
    cfg = {"device": args.device, "iters": args.iters, "lr": args.lr, "seed": args.seed, "timeout": args.timeout}

    analytics = insitu.Analytics(run=args.run, bypass=insitu.Bypass(args.bypass) if args.bypass else None)
    spec = SliceSpec(hosts=args.hosts, prefix=args.prefix, gpus_per_host=1.0 if args.device == "cuda" else 0.0)
    losses: dict[int, float] = {}
    state: dict[str, Any] = {}

    @analytics.on_step("temperature", window=3)
    def train(step: int, temperature: list) -> None:
        pool: SlicePool | None = state.get("pool")
        if pool is None:  # Ray is connected once the run started: reserve the slice now
            pool = state["pool"] = SlicePool(spec, sizes=[1], name=f"train-{analytics.run_name}")
            pool.scale()
            master = pool.run(free_port, grouping=Grouping.FLAT)[0]  # host 0 of the slice
            state["groups"] = pool.run(setup, master, cfg, grouping=Grouping.FLAT, timeout=args.timeout + 60)
        per_array = [analytics.blocks(u) for u in temperature]
        blocks = sorted(per_array[0])
        windows = [[arr[b] for arr in per_array] for b in blocks]
        shards = [windows[h :: args.hosts] for h in range(args.hosts)]
        t = time.monotonic()
        result = pool.run(train_step, shards, cfg, grouping=Grouping.FLAT, timeout=args.timeout + 60,
                          bypass_tag=f"temperature:{step}")  # fmt: skip
        losses[step] = result[0]
        print(f"step {step:5d} | loss {result[0]:.3e} | {time.monotonic() - t:5.2f} s", flush=True)

    final: dict[str, Any] = {}

    @analytics.on_close
    def collect(summary: insitu.RunSummary) -> None:
        pool = state.get("pool")
        if pool is not None:
            final["params"] = pool.run(parameters, grouping=Grouping.FLAT, timeout=args.timeout)
            pool.run(teardown, timeout=args.timeout)
            pool.drain()

    # if the run fails, the pool's actors and placement group end with this process's Ray job
    summary = analytics.run()
    result = {"loss": losses, "params": final.get("params", []), "groups": state.get("groups", []),
              "steps": summary.steps}  # fmt: skip
    args.out.write_text(json.dumps(result, indent=1))
    print(f"train_surrogate: {len(losses)} training steps, final loss {losses[max(losses)]:.3e}" if losses else
          "train_surrogate: no full window arrived", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
