"""The collective tests of ``tests/mpi`` under ``mpiexec`` (pytest-mpi), started from the ordinary suite.

``tests/mpi`` holds tests whose body runs on every rank of one MPI job; the plain run does not
collect them (``tests/conftest.py``). Here they run as ``mpiexec -n N python -m pytest --with-mpi``
on 4 ranks and on 1 (the same bodies on a world of one), with the session's Ray cluster exported
for the one test that needs a ``Bridge``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import ROOT, mpi_command, run_name

pytestmark = pytest.mark.cluster


@pytest.mark.parametrize(("ranks", "expect_skipped"), [(4, False), (1, True)])
def test_collective_tests_pass_on_every_rank(cluster: Any, ranks: int, expect_skipped: bool) -> None:
    env = {**os.environ, **cluster.environment(), "INSITU_RUN": run_name("mpi"), "INSITU_DEADLINE": "60",
           "INSITU_RECLAIM_DEADLINE": "20"}  # fmt: skip
    # --noconftest: tests/conftest.py (the session's cluster and token) is this process's, not the ranks'.
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--with-mpi", "--noconftest",
            "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(ROOT),
            str(ROOT / "tests" / "mpi")]  # fmt: skip
    proc = subprocess.run(mpi_command(ranks, cluster.node_ips[:1], argv), env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=240, check=False)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    summaries = re.findall(r"^(\d+) passed(?:, (\d+) skipped)? in ", proc.stdout, flags=re.MULTILINE)
    assert len(summaries) == ranks, out[-5000:]  # one summary per rank
    assert len(set(summaries)) == 1, summaries  # every rank ran the same tests with the same outcome
    passed, skipped = int(summaries[0][0]), int(summaries[0][1] or 0)
    assert passed >= (9 if ranks == 4 else 3)
    assert (skipped > 0) == expect_skipped, summaries  # min_size tests skip on one rank; none on four
    assert not re.search(r"\b(failed|error)\b", proc.stdout), out[-5000:]
