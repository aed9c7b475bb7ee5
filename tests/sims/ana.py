"""Test analytics in its own process: prints one JSON line per step; can park forever."""

from __future__ import annotations

import json
import os
import sys
import time

import insitu


def main() -> int:
    opt = json.loads(sys.argv[1])
    analytics = insitu.Analytics(run=opt.get("run"))  # else INSITU_RUN
    print(json.dumps({"node": os.environ.get("SLURMD_NODENAME")}), flush=True)

    name = opt.get("array", "u")

    @analytics.on_step(name, window=opt.get("window", 1))
    def step(s: int, **arrays: list) -> None:
        u = arrays[name]
        mean = float(u[-1].mean().compute())
        print(json.dumps({"step": s, "mean": mean, "window": [a.step for a in u]}), flush=True)
        time.sleep(opt.get("sleep", 0))
        if opt.get("fail_at") is not None and s >= opt["fail_at"]:
            raise RuntimeError(f"planned failure at step {s}")
        if opt.get("park_at") is not None and s >= opt["park_at"]:
            time.sleep(3600)

    summary = analytics.run()
    print(json.dumps({"done": summary.steps}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
