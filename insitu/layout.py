"""Array declarations and whole-run decomposition checks (pure: no Ray, no MPI at import).

A run's array is split into a rectilinear grid of blocks: along every axis the
blocks' extents partition ``[0, global_shape[axis])``, and each cell of the grid
is owned by exactly one rank. Ranks may own no block. Sizes need not divide
evenly.

Examples
--------
>>> from insitu.layout import ArraySpec, validate_layout
>>> a = ArraySpec("u", (4, 6), "f8", start=(0, 0), shape=(4, 4))
>>> b = ArraySpec("u", (4, 6), "f8", start=(0, 4), shape=(4, 2))
>>> lay = validate_layout([{"u": a}, {"u": b}])["u"]
>>> lay.chunks
((4,), (4, 2))
>>> lay.block_of(1)
(0, 1)
"""

from __future__ import annotations

import operator
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from insitu.errors import ContractError

__all__ = ["ArrayLayout", "ArraySpec", "validate_layout"]


def _shape(value: Any, what: str, name: str) -> tuple[int, ...]:
    try:
        out = tuple(operator.index(v) for v in value)
    except TypeError:
        raise ContractError(f"array {name!r}: {what} must be a sequence of integers; got {value!r}") from None
    if any(v < 0 for v in out):
        raise ContractError(f"array {name!r}: {what} must not be negative; got {out}")
    return out


def _cart_local(name: str, local_shape: Any, ndims: int) -> tuple[int, ...]:
    local = _shape(local_shape, "local_shape", name)
    if len(local) != ndims:
        raise ContractError(
            f"array {name!r}: local_shape {local} has {len(local)} axes but the Cartesian "
            f"communicator has {ndims} dimensions"
        )
    return local


def _check_dtype(name: str, dtype: np.dtype[Any]) -> None:
    """Refuse dtypes that cannot travel as ``dtype.str`` (objects, records, sub-arrays, raw voids).

    Byte order travels: a big-endian declaration gives big-endian arrays to the analytics.
    """
    if dtype.hasobject:
        raise ContractError(f"array {name!r}: object dtypes cannot be shared; got {dtype}")
    if dtype.names is not None:
        raise ContractError(
            f"array {name!r}: structured dtypes are not supported; got {dtype} with fields {list(dtype.names)}. "
            f"Declare one array per field instead (e.g. ArraySpec({name + '_' + dtype.names[0]!r}, ..., "
            f"{dtype[dtype.names[0]].str!r}) and send value[{dtype.names[0]!r}])"
        )
    if dtype.subdtype is not None or dtype.kind == "V" or np.dtype(dtype.str) != dtype:
        raise ContractError(
            f"array {name!r}: dtype {dtype} is not supported (sub-array and raw void dtypes lose their meaning "
            "on the way); declare a numeric, boolean, string or datetime dtype and put sub-array axes "
            "into the array's shape"
        )


@dataclass(frozen=True, slots=True)
class ArraySpec:
    """One rank's declaration of one array.

    Parameters
    ----------
    name
        Array name, the same on every rank (a Python identifier).
    global_shape
        Shape of the whole array, the same on every rank.
    dtype
        Element type, the same on every rank: any numpy dtype but object, structured
        (record), sub-array and raw void dtypes (``ContractError``). Byte order is kept:
        a big-endian declaration reaches the analytics big-endian.
    start
        Global index of this rank's first element along every axis.
        ``None`` (with ``shape=None``) when the rank owns no block.
    shape
        Shape of this rank's block. A block with a zero extent is no block.

    Examples
    --------
    >>> ArraySpec("t", (10,), "f4", start=(5,), shape=(5,)).nbytes
    20
    >>> ArraySpec.no_block("t", (10,), "f4").owns_block
    False
    """

    name: str
    global_shape: tuple[int, ...]
    dtype: np.dtype[Any]
    start: tuple[int, ...] | None = None
    shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ContractError(f"array name must be a Python identifier; got {self.name!r}")
        gshape = _shape(self.global_shape, "global_shape", self.name)
        object.__setattr__(self, "global_shape", gshape)
        try:
            object.__setattr__(self, "dtype", np.dtype(self.dtype))
        except TypeError:
            raise ContractError(f"array {self.name!r}: {self.dtype!r} is not a numpy dtype") from None
        _check_dtype(self.name, self.dtype)
        if (self.start is None) != (self.shape is None):
            raise ContractError(
                f"array {self.name!r}: give both start and shape, or neither (no block); "
                f"got start={self.start!r}, shape={self.shape!r}"
            )
        if self.shape is None:
            return
        start = _shape(self.start, "start", self.name)
        shape = _shape(self.shape, "shape", self.name)
        if not (len(start) == len(shape) == len(gshape)):
            raise ContractError(
                f"array {self.name!r}: global_shape {gshape}, start {start} and shape {shape} "
                "must have the same number of axes"
            )
        if 0 in shape:
            object.__setattr__(self, "start", None)
            object.__setattr__(self, "shape", None)
            return
        for axis, (s, n, g) in enumerate(zip(start, shape, gshape, strict=True)):
            if s + n > g:
                raise ContractError(
                    f"array {self.name!r}: block [{s}, {s + n}) on axis {axis} lies outside the global extent {g}"
                )
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "shape", shape)

    @classmethod
    def no_block(cls, name: str, global_shape: Sequence[int], dtype: Any) -> ArraySpec:
        """Declare an array of which this rank owns no block."""
        return cls(name, tuple(global_shape), dtype)

    @classmethod
    def from_cart(cls, name: str, cart: Any, local_shape: Sequence[int], dtype: Any) -> ArraySpec:
        """Declare this rank's block from an MPI Cartesian communicator (collective on ``cart``).

        Every rank passes its local (interior) shape; offsets and the global shape are
        derived from the process grid, so uneven splits just work. The array's axes
        follow the communicator's dimensions.

        Parameters
        ----------
        name
            Array name.
        cart
            An ``mpi4py.MPI.Cartcomm``.
        local_shape
            This rank's block shape, one entry per Cartesian dimension.
        dtype
            Element type.

        Examples
        --------
        >>> from mpi4py import MPI  # doctest: +SKIP
        >>> cart = MPI.COMM_WORLD.Create_cart([2, 2])  # doctest: +SKIP
        >>> spec = ArraySpec.from_cart("u", cart, (64, 64), "f8")  # doctest: +SKIP
        """
        from insitu.comm import raise_common

        dims = list(cart.Get_topo()[0])
        coords = tuple(cart.Get_coords(cart.Get_rank()))
        local: tuple[int, ...] = ()
        problem = None
        try:  # every local problem is agreed below: no rank leaves the collective alone
            local = _cart_local(name, local_shape, len(dims))
            cls.no_block(name, local, dtype)  # name and dtype, checked before the collective
        except ContractError as exc:
            problem = (cart.Get_rank(), type(exc).__name__, str(exc))
        except Exception as exc:  # noqa: BLE001 - agreed like any other problem, never raised alone
            problem = (cart.Get_rank(), "ContractError", f"array {name!r}: {type(exc).__name__}: {exc}")
        everyone = cart.allgather((coords, local, problem))
        raise_common([p for _, _, p in everyone])
        start, gshape = [], []
        for axis, ndim in enumerate(dims):
            extent: dict[int, set[int]] = defaultdict(set)
            for c, shp, _ in everyone:
                extent[c[axis]].add(shp[axis])
            bad = {c: sorted(v) for c, v in extent.items() if len(v) > 1}
            if bad:
                who = [f"rank {r}: {shp[axis]}" for r, (c, shp, _) in enumerate(everyone) if c[axis] in bad]
                raise ContractError(
                    f"array {name!r}: ranks in the same slab of axis {axis} declare different "
                    f"local extents {bad} ({', '.join(who[:8])}); along an axis all ranks at one "
                    "coordinate must agree"
                )
            sizes = [next(iter(extent[c])) for c in range(ndim)]
            start.append(sum(sizes[: coords[axis]]))
            gshape.append(sum(sizes))
        return cls(name, tuple(gshape), dtype, start=tuple(start), shape=local)

    @property
    def owns_block(self) -> bool:
        """Whether this rank owns a block of the array."""
        return self.shape is not None

    @property
    def nbytes(self) -> int:
        """Bytes of this rank's block (0 without a block)."""
        if self.shape is None:
            return 0
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def summary(self) -> tuple[str, tuple[int, ...], str, tuple[int, ...] | None, tuple[int, ...] | None]:
        """A small picklable tuple for the validation collective."""
        return (self.name, self.global_shape, self.dtype.str, self.start, self.shape)


@dataclass(frozen=True, slots=True)
class ArrayLayout:
    """The validated decomposition of one array over all ranks.

    ``chunks`` is Dask's chunks tuple; ``owners`` maps block index to rank.
    """

    name: str
    global_shape: tuple[int, ...]
    dtype: str
    chunks: tuple[tuple[int, ...], ...]
    owners: tuple[tuple[tuple[int, ...], int], ...]

    def block_of(self, rank: int) -> tuple[int, ...] | None:
        """Block index owned by ``rank`` or ``None``."""
        for block, owner in self.owners:
            if owner == rank:
                return block
        return None

    @property
    def numblocks(self) -> tuple[int, ...]:
        """Blocks per axis."""
        return tuple(len(c) for c in self.chunks)


def _fmt_ranks(ranks: Sequence[int]) -> str:
    ranks = sorted(ranks)
    shown = ", ".join(str(r) for r in ranks[:8])
    return f"rank{'s' if len(ranks) > 1 else ''} {shown}{', ...' if len(ranks) > 8 else ''}"


def validate_layout(per_rank: Sequence[Mapping[str, ArraySpec]]) -> dict[str, ArrayLayout]:
    """Check that the ranks' declarations form one rectilinear grid per array.

    Parameters
    ----------
    per_rank
        ``per_rank[r]`` maps array name to rank ``r``'s :class:`ArraySpec`.

    Returns
    -------
    dict
        Array name to :class:`ArrayLayout`.

    Raises
    ------
    ContractError
        Naming the arrays and ranks at fault (missing or extra arrays, disagreeing
        global shapes or dtypes, overlaps, gaps, blocks not on a grid).
    """
    problems: list[str] = []
    names = [set(m) for m in per_rank]
    all_names = sorted(set().union(*names)) if names else []
    for name in all_names:
        missing = [r for r, n in enumerate(names) if name not in n]
        if missing:
            problems.append(f"array {name!r} is not declared by {_fmt_ranks(missing)}")
    if problems:
        raise ContractError("; ".join(problems))
    layouts: dict[str, ArrayLayout] = {}
    for name in all_names:
        try:
            layouts[name] = _validate_one(name, [m[name] for m in per_rank])
        except ContractError as exc:
            problems.append(str(exc))
    if problems:
        raise ContractError("; ".join(problems))
    return layouts


def _validate_one(name: str, specs: Sequence[ArraySpec]) -> ArrayLayout:
    for attr in ("global_shape", "dtype"):
        values: dict[Any, list[int]] = defaultdict(list)
        for r, s in enumerate(specs):
            values[getattr(s, attr)].append(r)
        if len(values) > 1:
            detail = "; ".join(f"{_fmt_ranks(rs)} declare {v}" for v, rs in values.items())
            raise ContractError(f"array {name!r}: ranks disagree on {attr.replace('_', ' ')}: {detail}")
    gshape, dtype = specs[0].global_shape, specs[0].dtype
    owned = [(r, s.start, s.shape) for r, s in enumerate(specs) if s.shape is not None]
    if not owned:
        raise ContractError(f"array {name!r}: no rank owns a block of it")
    ndim = len(gshape)
    splits: list[list[tuple[int, int]]] = []
    for axis in range(ndim):
        intervals: dict[tuple[int, int], list[int]] = defaultdict(list)
        for r, start, shape in owned:
            assert start is not None
            assert shape is not None
            intervals[(start[axis], start[axis] + shape[axis])].append(r)
        ordered = sorted(intervals)
        pos = 0
        for lo, hi in ordered:
            if lo < pos:
                prev = next(iv for iv in ordered if iv[1] > lo and iv != (lo, hi))
                raise ContractError(
                    f"array {name!r}: blocks overlap on axis {axis}: {_fmt_ranks(intervals[prev])} "
                    f"cover [{prev[0]}, {prev[1]}) and {_fmt_ranks(intervals[(lo, hi)])} cover [{lo}, {hi})"
                )
            if lo > pos:
                raise ContractError(
                    f"array {name!r}: gap on axis {axis}: no block covers [{pos}, {lo}) "
                    f"(next block: {_fmt_ranks(intervals[(lo, hi)])} at [{lo}, {hi}))"
                )
            pos = hi
        if pos != gshape[axis]:
            lo, hi = ordered[-1]
            raise ContractError(
                f"array {name!r}: gap on axis {axis}: no block covers [{pos}, {gshape[axis]}) "
                f"(last block: {_fmt_ranks(intervals[(lo, hi)])} at [{lo}, {hi}))"
            )
        splits.append(ordered)
    index = [{iv: i for i, iv in enumerate(axis_splits)} for axis_splits in splits]
    cells: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for r, start, shape in owned:
        assert start is not None
        assert shape is not None
        cell = tuple(index[a][(start[a], start[a] + shape[a])] for a in range(ndim))
        cells[cell].append(r)
    doubled = {c: rs for c, rs in cells.items() if len(rs) > 1}
    if doubled:
        cell, rs = next(iter(sorted(doubled.items())))
        raise ContractError(f"array {name!r}: blocks overlap: {_fmt_ranks(rs)} all declare block {cell}")
    total = int(np.prod([len(s) for s in splits]))
    if len(cells) != total:
        have = set(cells)
        missing = [c for c in np.ndindex(*[len(s) for s in splits]) if c not in have][:4]
        where = ", ".join(
            "[" + ", ".join(f"{splits[a][c[a]][0]}:{splits[a][c[a]][1]}" for a in range(ndim)) + "]" for c in missing
        )
        raise ContractError(
            f"array {name!r}: blocks do not form a rectilinear grid: no rank covers {where} "
            f"({total - len(cells)} of {total} grid cells uncovered)"
        )
    chunks = tuple(tuple(hi - lo for lo, hi in axis_splits) for axis_splits in splits)
    owners = tuple(sorted((c, rs[0]) for c, rs in cells.items()))
    return ArrayLayout(name, gshape, dtype.str, chunks, owners)
