"""Layouts and validation: pure, no Ray, no MPI."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from insitu.errors import ContractError
from insitu.layout import ArraySpec, validate_layout


def grid_specs(
    splits: list[list[int]], owners: list[int] | None = None, dtype: str = "f8"
) -> list[dict[str, ArraySpec]]:
    """One spec per grid cell (rank = cell number unless ``owners`` permutes them)."""
    gshape = tuple(sum(s) for s in splits)
    cells = list(np.ndindex(*[len(s) for s in splits]))
    specs: list[dict[str, ArraySpec]] = [{} for _ in cells]
    order = owners or list(range(len(cells)))
    for rank, cell in zip(order, cells, strict=True):
        start = tuple(int(sum(splits[a][: cell[a]])) for a in range(len(splits)))
        shape = tuple(splits[a][cell[a]] for a in range(len(splits)))
        specs[rank] = {"u": ArraySpec("u", gshape, dtype, start=start, shape=shape)}
    return specs


splits_st = st.lists(st.lists(st.integers(1, 7), min_size=1, max_size=4), min_size=1, max_size=3)


@given(splits=splits_st, data=st.data())
@settings(max_examples=150, deadline=None)
def test_any_rectilinear_grid_is_accepted(splits: list[list[int]], data: st.DataObject) -> None:
    n = int(np.prod([len(s) for s in splits]))
    owners = data.draw(st.permutations(list(range(n))))
    lay = validate_layout(grid_specs(splits, owners))["u"]
    assert lay.chunks == tuple(tuple(s) for s in splits)
    assert sorted(owner for _, owner in lay.owners) == list(range(n))
    for rank in range(n):
        assert lay.block_of(rank) is not None


@given(splits=splits_st, data=st.data())
@settings(max_examples=150, deadline=None)
def test_a_moved_block_is_rejected_naming_ranks(splits: list[list[int]], data: st.DataObject) -> None:
    specs = grid_specs(splits)
    victim = data.draw(st.integers(0, len(specs) - 1))
    s = specs[victim]["u"]
    axis = data.draw(st.integers(0, len(splits) - 1))
    shift = data.draw(st.sampled_from([-1, 1]))
    start = list(s.start)
    start[axis] += shift
    if start[axis] < 0 or start[axis] + s.shape[axis] > s.global_shape[axis]:
        return
    specs[victim] = {"u": ArraySpec("u", s.global_shape, s.dtype, start=tuple(start), shape=s.shape)}
    with pytest.raises(ContractError, match="rank"):
        validate_layout(specs)


def test_uneven_split_and_rank_without_block() -> None:
    specs = grid_specs([[4, 3], [5]])
    specs.append({"u": ArraySpec.no_block("u", (7, 5), "f8")})
    lay = validate_layout(specs)["u"]
    assert lay.chunks == ((4, 3), (5,))
    assert lay.block_of(2) is None


def test_zero_extent_block_means_no_block() -> None:
    assert not ArraySpec("u", (4,), "f8", start=(4,), shape=(0,)).owns_block


@pytest.mark.parametrize(
    ("specs", "pattern"),
    [
        ([{"u": ArraySpec("u", (4,), "f8", start=(0,), shape=(4,))},
          {"u": ArraySpec("u", (5,), "f8", start=(0,), shape=(5,))}], "global shape.*rank 0.*rank 1"),
        ([{"u": ArraySpec("u", (4,), "f8", start=(0,), shape=(2,))},
          {"u": ArraySpec("u", (4,), "f4", start=(2,), shape=(2,))}], "dtype"),
        ([{"u": ArraySpec("u", (4,), "f8", start=(0,), shape=(3,))},
          {"u": ArraySpec("u", (4,), "f8", start=(2,), shape=(2,))}], "overlap.*rank 0.*rank 1"),
        ([{"u": ArraySpec("u", (4,), "f8", start=(0,), shape=(1,))},
          {"u": ArraySpec("u", (4,), "f8", start=(2,), shape=(2,))}], r"gap.*\[1, 2\)"),
        ([{"u": ArraySpec("u", (4,), "f8", start=(0,), shape=(2,))},
          {"u": ArraySpec("u", (4,), "f8", start=(0,), shape=(2,))},
          {"u": ArraySpec("u", (4,), "f8", start=(2,), shape=(2,))}], "overlap.*ranks 0, 1"),
        ([{"u": ArraySpec("u", (4,), "f8", start=(0,), shape=(4,))}, {}], "not declared by rank 1"),
        ([{"u": ArraySpec.no_block("u", (4,), "f8")}], "no rank owns"),
    ],
)  # fmt: skip
def test_invalid_layouts(specs: list[dict[str, ArraySpec]], pattern: str) -> None:
    with pytest.raises(ContractError, match=pattern):
        validate_layout(specs)


def test_non_rectilinear_blocks_are_rejected() -> None:
    # an L-shaped tiling: axis splits exist but a cell is covered by nobody
    specs = [
        {"u": ArraySpec("u", (4, 4), "f8", start=(0, 0), shape=(2, 4))},
        {"u": ArraySpec("u", (4, 4), "f8", start=(2, 0), shape=(2, 2))},
        {"u": ArraySpec("u", (4, 4), "f8", start=(2, 2), shape=(2, 2))},
    ]
    with pytest.raises(ContractError, match="rectilinear|overlap"):
        validate_layout(specs)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"name": "not valid", "global_shape": (4,), "dtype": "f8"}, "identifier"),
        ({"name": "u", "global_shape": (4,), "dtype": "f8", "start": (0,)}, "both start and shape"),
        ({"name": "u", "global_shape": (4,), "dtype": "f8", "start": (3,), "shape": (2,)}, "outside"),
        ({"name": "u", "global_shape": (4,), "dtype": "f8", "start": (0, 0), "shape": (2, 2)}, "same number of axes"),
        ({"name": "u", "global_shape": (4,), "dtype": object, "start": (0,), "shape": (4,)}, "object"),
        ({"name": "u", "global_shape": (-1,), "dtype": "f8"}, "negative"),
    ],
)
def test_bad_specs(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ContractError, match=pattern):
        ArraySpec(**kwargs)


class FakeCart:
    """Just enough of an MPI Cartcomm for ArraySpec.from_cart, for a chosen rank of a grid."""

    def __init__(self, dims: list[int], coords: tuple[int, ...], everyone: list) -> None:
        self.dims, self.coords, self.everyone = dims, coords, everyone

    def Get_topo(self):  # noqa: N802 - mpi4py's name
        return self.dims, [False] * len(self.dims), list(self.coords)

    def Get_rank(self) -> int:  # noqa: N802
        return 0

    def Get_coords(self, rank: int) -> list[int]:  # noqa: N802
        return list(self.coords)

    def allgather(self, value):
        return self.everyone


@given(nx=st.integers(1, 40), ny=st.integers(1, 40), px=st.integers(1, 5), py=st.integers(1, 5))
@settings(max_examples=100, deadline=None)
def test_from_cart_matches_validate_layout(nx: int, ny: int, px: int, py: int) -> None:
    def size(n: int, p: int, i: int) -> int:
        return n // p + (1 if i < n % p else 0)

    # what every rank contributes to the collective: coordinates, local shape, local problem
    everyone = [((i, j), (size(nx, px, i), size(ny, py, j)), None) for i in range(px) for j in range(py)]
    specs = []
    for coords, local, _ in everyone:
        specs.append({"u": ArraySpec.from_cart("u", FakeCart([px, py], coords, everyone), local, "f8")})
    if all(not s["u"].owns_block for s in specs):
        return
    lay = validate_layout(specs)["u"]
    assert lay.global_shape == (nx, ny)
    assert sum(lay.chunks[0]) == nx
    assert sum(lay.chunks[1]) == ny


class OneRankCart(FakeCart):
    """A grid of one rank: the collective returns this rank's own contribution."""

    def allgather(self, value):
        return [value]


@pytest.mark.parametrize(
    ("dtype", "pattern"),
    [
        ([("x", "f8"), ("y", "i4")], r"structured dtypes are not supported.*\['x', 'y'\].*one array per field"),
        ("(3,)f8", "sub-array"),
        ("V8", "raw void"),
    ],
)
def test_dtypes_that_cannot_travel_are_refused_at_declaration(dtype: object, pattern: str) -> None:
    with pytest.raises(ContractError, match=pattern):
        ArraySpec("u", (4,), dtype, start=(0,), shape=(4,))
    with pytest.raises(ContractError, match=pattern):
        ArraySpec.no_block("u", (4,), dtype)
    # from_cart agrees on it like on any local problem: the error names this rank
    with pytest.raises(ContractError, match="rank 0: .*" + pattern):
        ArraySpec.from_cart("u", OneRankCart([1], (0,), []), (4,), dtype)


def test_byte_order_is_kept_and_a_rank_declaring_the_other_order_is_named() -> None:
    big = ArraySpec("u", (4,), ">f8", start=(0,), shape=(2,))
    assert big.summary()[2] == ">f8"
    assert validate_layout([{"u": big}, {"u": ArraySpec("u", (4,), ">f8", start=(2,), shape=(2,))}])["u"].dtype == ">f8"
    little = ArraySpec("u", (4,), "<f8", start=(2,), shape=(2,))
    with pytest.raises(ContractError, match="disagree on dtype: rank 0 declare >f8; rank 1 declare float64"):
        validate_layout([{"u": big}, {"u": little}])


def test_send_accepts_the_declared_type_in_either_byte_order_and_names_another_type() -> None:
    from insitu.validate import NO_STEP, as_specs, check_send

    specs = as_specs([ArraySpec("u", (2, 3), "<f8", start=(0, 0), shape=(2, 3))])
    value = np.arange(6.0).reshape(2, 3)
    for sent in (value.astype(">f8"), np.asfortranarray(value.astype(">f8")), np.asfortranarray(value)):
        assert check_send(0, {"u": sent}, specs, {"u": (0, 0)}, NO_STEP) == (0, None)
    _, problem = check_send(0, {"u": value.astype(">f4")}, specs, {"u": (0, 0)}, NO_STEP)
    assert str(problem) == (
        "sent 'u' with dtype >f4; declared float64: convert it with .astype('<f8') or declare '>f4' "
        "(either byte order is accepted)"
    )
