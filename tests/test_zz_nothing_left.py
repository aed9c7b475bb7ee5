"""Runs last (file name): nothing of the suite's runs may survive them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.cluster


# class names as Ray reports them may be qualified (``_relay_class.<locals>.Relay``): the last part counts
RUN_ACTORS = ("HeadActor", "NodeActor", "StepRelay", "AnalyticsLink", "NodeExecutor", "Relay", "_Slice", "_Host",
              "FileServer")  # fmt: skip


def test_no_actor_process_or_staging_file_is_left(cluster: Any) -> None:
    from ray.util.state import list_actors

    end = time.monotonic() + 60
    while True:
        alive = [
            a
            for a in list_actors(
                address=cluster.address, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False
            )
            if a.class_name.split(".")[-1] in RUN_ACTORS
        ]
        if not alive or time.monotonic() > end:
            break
        time.sleep(0.5)
    assert alive == [], [(a.class_name, a.name) for a in alive]
    assert list(Path("/dev/shm").glob("insitu-*")) == []
    sims = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "tests/sims/" in cmd:
                sims.append((proc.name, cmd.replace("\0", " ")[:120]))
    assert sims == []
