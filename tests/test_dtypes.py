"""Byte order and memory order end to end: mpiexec ranks send, the analytics sees exactly the values."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tests.conftest import expected_field, finish_sim, run_name, start_sim

pytestmark = pytest.mark.cluster


def test_big_endian_fortran_ordered_blocks_arrive_with_exactly_their_values(cluster: Any) -> None:
    """``u`` is declared native ``<i4`` and sent big-endian (swapped in the one copy); ``w = -u`` is declared
    and sent big-endian ``>f4`` (stored and analysed big-endian); both are sent Fortran-ordered."""
    import insitu

    run = run_name("dtype")
    shape, steps = (8, 6), 3  # 4 ranks on 2 raylets: (4, 3) blocks, not square, so a transposition shows
    options = {"run": run, "steps": steps, "shape": list(shape), "dtype": "<i4", "send_dtype": ">i4", "order": "F",
               "second": True, "second_dtype": ">f4"}  # fmt: skip
    proc = start_sim(cluster, 4, options)
    analytics = insitu.Analytics(run=run, deadline=60)
    seen: dict[int, dict[str, np.ndarray]] = {}
    dtypes: dict[str, set[str]] = {"u": set(), "w": set()}

    @analytics.on_step("u", "w")
    def record(step: int, u: list, w: list) -> None:
        seen[step] = {"u": u[0].compute(), "w": w[0].compute()}
        for name, arr in (("u", u[0]), ("w", w[0])):
            dtypes[name] |= {arr.dtype.str, seen[step][name].dtype.str}

    analytics.run()
    result = finish_sim(proc)
    assert result.returncode == 0, result.stderr[-2000:]
    assert dtypes == {"u": {"<i4"}, "w": {">f4"}}
    assert sorted(seen) == list(range(steps))
    for step, got in seen.items():
        u = expected_field(step, shape, "<i4")
        assert got["u"].tobytes() == u.tobytes(), (step, got["u"], u)
        assert got["w"].tobytes() == (-u).astype(">f4").tobytes(), (step, got["w"])
