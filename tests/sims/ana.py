"""Test analytics in its own process: prints one JSON line per step; can park forever."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import insitu


def main() -> int:
    opt = json.loads(sys.argv[1])
    analytics = insitu.Analytics(run=opt.get("run"))  # else INSITU_RUN
    print(json.dumps({"node": os.environ.get("SLURMD_NODENAME")}), flush=True)

    name = opt.get("array", "u")
    handled: list[int] = []
    processed: list[int] = []  # steps this process handled

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
        inc = analytics.incarnation
        print(json.dumps({"step": s, "mean": mean, "window": [a.step for a in u], "incarnation": inc}), flush=True)
        processed.append(s)
        mine = len(processed)
        if opt.get("stderr"):
            print(f"ana incarnation {inc} step {s}", file=sys.stderr, flush=True)
        if opt.get("crash", {}).get(str(inc)) == mine:  # supervised runs: this incarnation dies at its k-th step
            os.kill(os.getpid(), signal.SIGKILL)
        if opt.get("hang", {}).get(str(inc)) == mine:  # ... or hangs there (no heartbeat any more)
            time.sleep(3600)
        time.sleep(opt.get("sleep", 0))
        if opt.get("fail_at") is not None and s >= opt["fail_at"]:
            raise RuntimeError(f"planned failure at step {s}")
        if opt.get("park_at") is not None and s >= opt["park_at"]:
            time.sleep(3600)

    summary = analytics.run()
    print(json.dumps({"done": summary.steps, "handled": summary.handled, "incarnation": summary.incarnation,
                      "resumed_after": summary.resumed_after, "dropped_before": summary.dropped_before_attach}),
          flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
