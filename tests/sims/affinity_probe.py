"""Watch every process of this SLURM job while the rest of the command line runs (an analytics prefix).

``affinity_probe.py OUT CMD...``: runs CMD; meanwhile, every 0.3 s, records each process whose
environment has this job's ``SLURM_JOB_ID`` (pid, command line, ``Cpus_allowed_list``) and, once,
the job's ``scontrol show job -d``; writes them as JSON to OUT and exits with CMD's code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path


def _job_processes(job: str) -> dict[int, dict[str, str]]:
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
            if f"SLURM_JOB_ID={job}".encode() not in env:
                continue
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            cpus = next(line.split(":", 1)[1].strip() for line in (d / "status").read_text().splitlines()
                        if line.startswith("Cpus_allowed_list"))  # fmt: skip
        except (OSError, StopIteration):
            continue  # gone meanwhile
        found[int(d.name)] = {"cmd": cmd, "cpus": cpus}
    return found


def main() -> int:
    out, rest = sys.argv[1], sys.argv[2:]
    job = os.environ["SLURM_JOB_ID"]
    scontrol = subprocess.run(["scontrol", "show", "job", "-d", job], capture_output=True, text=True,
                              check=True, timeout=60).stdout  # fmt: skip
    seen: dict[int, dict[str, str]] = {}
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.3):
            seen.update(_job_processes(job))

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    code = subprocess.run(rest, check=False).returncode
    done.set()
    t.join(timeout=5)
    Path(out).write_text(json.dumps({"scontrol": scontrol, "processes": seen}))
    return code


if __name__ == "__main__":
    sys.exit(main())
