"""Collective checks inside one MPI job: ``mpiexec -n 4 python -m pytest --with-mpi --noconftest tests/mpi/``.

Every rank runs the same test body; what is asserted is what a simulation sees: the same
exception (class and message) on every rank when one rank is wrong, and nothing raised when
all are right. Layout and error agreement need no Ray. The step agreement goes through a real
``Bridge`` on the cluster whose address the caller exports (``tests/test_mpi_inprocess.py``
passes the session's), and is skipped without one. Plain ``python -m pytest`` does not collect
this directory (``tests/conftest.py``); ``tests/test_mpi_inprocess.py`` runs it.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

from insitu.comm import agree
from insitu.errors import ContractError, SendError, StepTimeoutError
from insitu.layout import ArraySpec, validate_layout

MPI = pytest.importorskip("mpi4py.MPI")
WORLD = MPI.COMM_WORLD


def _same_everywhere(comm: Any, exc: pytest.ExceptionInfo[BaseException]) -> str:
    """Assert every rank of ``comm`` caught the same exception; its message."""
    seen = comm.allgather((type(exc.value).__name__, str(exc.value)))
    assert len(set(seen)) == 1, seen
    return seen[0][1]


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("which", ["world", "self"])
def test_agree_raises_nothing_when_every_rank_is_fine(which: str) -> None:
    comm = WORLD if which == "world" else MPI.COMM_SELF
    agree(comm, None)  # returns on every rank


@pytest.mark.mpi(min_size=2)
def test_one_bad_rank_gives_every_rank_the_same_error_naming_it() -> None:
    bad = WORLD.size - 1
    local = SendError("sent 'u' with shape (3,); its declared block is (4,)") if WORLD.rank == bad else None
    with pytest.raises(SendError) as exc:
        agree(WORLD, local)
    assert _same_everywhere(WORLD, exc) == f"rank {bad}: sent 'u' with shape (3,); its declared block is (4,)"


@pytest.mark.mpi(min_size=3)
def test_several_bad_ranks_give_the_lowest_ranks_class_and_name_them_all() -> None:
    local: Any = None
    if WORLD.rank == 1:
        local = StepTimeoutError("no answer")
    elif WORLD.rank >= 2:
        local = ContractError("bad dtype")
    with pytest.raises(StepTimeoutError) as exc:
        agree(WORLD, local)
    others = ", ".join(str(r) for r in range(2, WORLD.size))
    who = f"rank {others}" if WORLD.size == 3 else f"ranks {others}"
    assert _same_everywhere(WORLD, exc) == f"rank 1: no answer; {who}: bad dtype"


def _cart() -> Any:
    return WORLD.Create_cart(MPI.Compute_dims(WORLD.size, 2))


@pytest.mark.mpi(min_size=1)
def test_layout_from_a_cartesian_grid_is_the_same_on_every_rank() -> None:
    cart = _cart()
    dims = cart.Get_topo()[0]
    coords = cart.Get_coords(cart.rank)
    local = (4 + coords[0], 3 + coords[1])  # uneven: the extents depend on the grid coordinate
    spec = ArraySpec.from_cart("u", cart, local, "f8")
    layout = validate_layout([{"u": s} for s in cart.allgather(spec)])["u"]
    assert cart.allgather(layout) == [layout] * cart.size
    assert layout.global_shape == (sum(4 + i for i in range(dims[0])), sum(3 + j for j in range(dims[1])))
    assert layout.numblocks == tuple(dims)
    assert layout.block_of(cart.rank) == tuple(coords)
    assert spec.shape == local and spec.start == (sum(4 + i for i in range(coords[0])),
                                                   sum(3 + j for j in range(coords[1])))  # fmt: skip


@pytest.mark.mpi(min_size=4)
def test_a_rank_whose_extent_breaks_the_grid_is_refused_on_every_rank() -> None:
    cart = _cart()
    local = (5, 5) if cart.rank == cart.size - 1 else (4, 4)
    with pytest.raises(ContractError) as exc:
        ArraySpec.from_cart("u", cart, local, "f8")
    message = _same_everywhere(cart, exc)
    assert "ranks in the same slab of axis 0 declare different local extents" in message
    assert f"rank {cart.size - 1}: 5" in message, message


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize(
    ("bad_shape", "expected"),
    [
        ((4,), "local_shape (4,) has 1 axes but the Cartesian communicator has 2 dimensions"),
        ((4, 4, 4), "local_shape (4, 4, 4) has 3 axes but the Cartesian communicator has 2 dimensions"),
        ((4, -1), "local_shape must not be negative; got (4, -1)"),
        ("ab", "local_shape must be a sequence of integers"),
    ],
)
def test_from_cart_with_a_bad_shape_on_one_rank_fails_on_every_rank_and_the_next_call_works(
    bad_shape: Any, expected: str
) -> None:
    cart = _cart()
    bad = cart.size - 1
    with pytest.raises(ContractError) as exc:
        ArraySpec.from_cart("u", cart, bad_shape if cart.rank == bad else (4, 4), "f8")
    message = _same_everywhere(cart, exc)
    assert message.startswith(f"rank {bad}: array 'u': "), message
    assert expected in message, message
    spec = ArraySpec.from_cart("u", cart, (4, 4), "f8")  # nobody was left inside the collective
    dims = cart.Get_topo()[0]
    assert spec.global_shape == (4 * dims[0], 4 * dims[1])


@pytest.mark.mpi(min_size=2)
def test_from_cart_with_a_bad_dtype_on_one_rank_names_it_on_every_rank() -> None:
    cart = _cart()
    with pytest.raises(ContractError) as exc:
        ArraySpec.from_cart("u", cart, (4, 4), object if cart.rank == 1 else "f8")
    assert _same_everywhere(cart, exc).startswith("rank 1: array 'u': object dtypes cannot be shared")


@pytest.mark.mpi(min_size=2)
def test_overlapping_blocks_of_one_rank_are_refused_on_every_rank() -> None:
    n, bad = WORLD.size, WORLD.size - 1
    start = WORLD.rank * 4 if WORLD.rank != bad else (bad - 1) * 4 + 2  # the last block slides onto its neighbour
    spec = ArraySpec("u", (4 * n,), "f8", start=(start,), shape=(4,))
    with pytest.raises(ContractError) as exc:
        validate_layout([{"u": s} for s in WORLD.allgather(spec)])
    message = _same_everywhere(WORLD, exc)
    assert f"rank {bad} cover" in message and "overlap on axis 0" in message


@pytest.mark.mpi(min_size=2)
def test_an_invalid_declaration_on_one_rank_is_agreed_before_anything_else() -> None:
    bad = 0
    local = None
    try:
        start = (40,) if WORLD.rank == bad else (0,)  # outside the global shape on one rank only
        ArraySpec("u", (8,), "f8", start=start, shape=(8,))
    except ContractError as err:
        local = err
    assert (local is not None) == (WORLD.rank == bad)
    with pytest.raises(ContractError) as exc:
        agree(WORLD, local)
    assert _same_everywhere(WORLD, exc).startswith(f"rank {bad}: ")


@pytest.mark.mpi(min_size=2)
@pytest.mark.skipif(not os.environ.get("INSITU_ADDRESS"), reason="needs a Ray cluster (INSITU_ADDRESS)")
def test_ranks_passing_different_steps_get_the_same_send_error_and_go_on() -> None:
    import insitu

    spec = ArraySpec("u", (2 * WORLD.size,), "f8", start=(2 * WORLD.rank,), shape=(2,))
    u = np.full(2, float(WORLD.rank))
    with insitu.Bridge([spec], comm=WORLD) as bridge:
        step = 7 if WORLD.rank == WORLD.size - 1 else 5
        with pytest.raises(SendError) as exc:
            bridge.send(step, u=u)
        assert "ranks passed different steps (5 to 7)" in _same_everywhere(WORLD, exc)
        bridge.send(5, u=u)  # the rejected step went nowhere: 5 is still new, on every rank
        assert bridge.stats.sent == 1
