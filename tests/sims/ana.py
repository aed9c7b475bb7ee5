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
    handled: list[int] = []

    def on_error(s: int, exc: BaseException) -> None:
        handled.append(s)
        print(json.dumps({"handled": s, "error": str(exc)}), flush=True)
        if opt.get("handler_raises"):
            raise RuntimeError(f"handler gave up at step {s}")

    @analytics.on_step(name, window=opt.get("window", 1), partial=opt.get("partial", False),
                       on_error=on_error if opt.get("handle") else None)  # fmt: skip
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
    print(json.dumps({"done": summary.steps, "handled": summary.handled}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
