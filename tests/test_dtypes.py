"""Byte order and memory order end to end: mpiexec ranks send, the analytics sees exactly the values."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tests.conftest import expected_field, finish_sim, run_name, start_sim

pytestmark = pytest.mark.cluster


@pytest.mark.parametrize(
    ("declared", "sent"),
    [
        (">f8", ">f8"),  # declared big-endian: stored and analysed big-endian
        ("<i4", ">i4"),  # declared native, sent big-endian: swapped in the one copy
    ],
)
def test_big_endian_fortran_ordered_blocks_arrive_with_exactly_their_values(
    cluster: Any, declared: str, sent: str
) -> None:
    import insitu

    run = run_name("dtype")
    shape, steps = (8, 6), 3  # 4 ranks on 2 raylets: (4, 3) blocks, not square, so a transposition shows
    options = {"run": run, "steps": steps, "shape": list(shape), "dtype": declared, "send_dtype": sent, "order": "F"}
    proc = start_sim(cluster, 4, options)
    analytics = insitu.Analytics(run=run, deadline=60)
    seen: dict[int, np.ndarray] = {}
    dtypes: set[str] = set()

    @analytics.on_step("u")
    def record(step: int, u: list) -> None:
        dtypes.add(u[0].dtype.str)
        seen[step] = u[0].compute()
        dtypes.add(seen[step].dtype.str)

    analytics.run()
    result = finish_sim(proc)
    assert result.returncode == 0, result.stderr[-2000:]
    assert dtypes == {declared}
    assert sorted(seen) == list(range(steps))
    for step, value in seen.items():
        expected = expected_field(step, shape, declared)
        assert value.tobytes() == expected.tobytes(), (step, value, expected)
