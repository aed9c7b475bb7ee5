"""The per-node actor: one per Ray node and run, pinned to its node.

It serves the node's ranks over a Unix socket, copies each staged block into
the node's object store (off the ranks' threads), frees the staging slot and,
once every local rank delivered a step, sends exactly one message to the head.
It is owned by the head actor, so it dies with it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import mmap
import os
import pickle
import struct
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from insitu.messages import NodeStep, Status, SteeringUpdate, Wire
from insitu.transport import encode_frame

__all__ = ["NodeActor"]

log = logging.getLogger(__name__)
_HEADER_FMT = "<I"


@dataclass
class _RankState:
    rank: int
    map: mmap.mmap
    arrays: tuple[tuple[str, tuple[int, ...], tuple[int, ...], str, int], ...]  # name, block, shape, dtype, offset
    stride: int
    writer: asyncio.StreamWriter
    closed: bool = False
    times: deque[float] = dataclasses.field(default_factory=lambda: deque(maxlen=200))
    """Seconds of this rank's recent send calls (insitu status)."""
    sent: int = 0
    skipped: int = 0
    dropped: int = 0
    reason: str = ""


@ray.remote(num_cpus=0, max_restarts=0)
class NodeActor:
    """Holds the chunks of its node's ranks for one run (see module docstring)."""

    def __init__(self, run: str, node: str, head: Any, ranks: tuple[int, ...]) -> None:
        self._run = run
        self._node = node
        self._head = head
        self._parent = head  # the head, or the relay of this node's group (set by start)
        self._expected = frozenset(ranks)
        self._ranks: dict[int, _RankState] = {}
        self._pending: dict[int, dict[int, tuple[_RankState, int]]] = {}  # step -> rank -> (rank, slot)
        self._status: Status | None = None
        self._history: dict[str, SteeringUpdate] = {}  # the last update per key, in version order
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="insitu-put")
        self._server: asyncio.AbstractServer | None = None
        self._messages = 0
        self._early: dict[int, Status] = {}
        self._next_seq = 0
        self._last_step = -1
        self._epoch = 0

    async def start(self, status: Status, parent: Any = None, address: str = "", epoch: int = 0,
                    ranks: tuple[int, ...] | None = None) -> str:  # fmt: skip
        """Open the rank socket (abstract Unix namespace) and return its address.

        ``parent`` receives this node's step and close messages: the head, or the
        :class:`~insitu.actors.relay.StepRelay` of its group on large runs. ``address``
        and ``epoch``: a restarted process (Ray re-ran the constructor) opens the address of
        its first incarnation, where the ranks reconnect, and numbers its messages anew in
        its ``epoch``. ``ranks``: the ranks of this node, for a process started before the
        simulation registered (:mod:`insitu.actors.warm`) or restarted from such a one.
        """
        if ranks is not None:
            self._expected = frozenset(ranks)
        if parent is not None:
            self._parent = parent
        self._epoch = epoch
        self._status = status
        self._history = {}
        self._remember(status.updates)
        self._next_seq = status.seq + 1
        self._apply_statuses()
        address = address or f"\0insitu-{self._run}-{self._node[:12]}-{uuid.uuid4().hex[:8]}"
        self._server = await asyncio.start_unix_server(self._serve, path=address)
        return address

    async def update(self, status: Status) -> None:
        """Receive a status from the head and forward it to every connected rank, in push order."""
        self._early[status.seq] = status
        self._apply_statuses()

    def _apply_statuses(self) -> None:
        for seq in [q for q in self._early if q < self._next_seq]:
            del self._early[seq]
        while self._next_seq in self._early:
            status = self._early.pop(self._next_seq)
            self._next_seq += 1
            self._remember(status.updates)
            self._status = status
            frame = encode_frame((Wire.STATUS, status))
            for st in self._ranks.values():
                if not st.closed:
                    st.writer.write(frame)

    def _remember(self, updates: tuple[SteeringUpdate, ...]) -> None:
        """Keep the last update per key (what a rank connecting later receives)."""
        for u in updates:
            self._history.pop(u.key, None)
            self._history[u.key] = u

    async def stats(self) -> dict[str, int]:
        """Messages sent to the head, steps still waiting for local ranks, steering keys remembered, pid."""
        return {"messages": self._messages, "pending": len(self._pending), "history": len(self._history),
                "pid": os.getpid()}  # fmt: skip

    async def status(self) -> dict[str, Any]:
        """This node's part of ``insitu status``: per rank, send time p50/p95 (ms) over its recent calls,
        calls sent, steps skipped and dropped and the last reason."""
        ranks: dict[int, dict[str, Any]] = {}
        for rank, st in sorted(self._ranks.items()):
            times = sorted(st.times)
            pct = {q: 1e3 * times[min(len(times) - 1, int(q / 100 * len(times)))] if times else None for q in (50, 95)}
            ranks[rank] = {"send_p50_ms": pct[50], "send_p95_ms": pct[95], "calls": st.sent, "skipped": st.skipped,
                           "dropped": st.dropped, "reason": st.reason, "closed": st.closed}  # fmt: skip
        return {"pid": os.getpid(), "messages": self._messages, "pending": len(self._pending), "ranks": ranks}

    async def park(self) -> None:
        """Never returns: the head awaits it to learn at once that this process died."""
        await asyncio.Event().wait()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state: _RankState | None = None
        try:
            while True:
                (n,) = struct.unpack(_HEADER_FMT, await reader.readexactly(4))
                msg = pickle.loads(await reader.readexactly(n))
                tag = msg[0]
                if tag == Wire.CHUNKS and state is not None:
                    _, step, slot, part, seconds = msg
                    state.times.append(seconds)
                    state.sent += 1
                    key = (step, part)
                    have = self._pending.setdefault(key, {})
                    have[state.rank] = (state, slot)
                    if len(have) == len(self._expected):  # the node's part of this call is complete
                        del self._pending[key]
                        await self._complete(step, part, have)
                        del have  # this frame keeps no chunk alive (retention rule)
                elif tag == Wire.COUNTS and state is not None:
                    _, state.skipped, state.dropped, state.reason = msg
                elif tag == Wire.HELLO:
                    state = self._hello(msg, writer)
                elif tag == Wire.CLOSE and state is not None:
                    state.closed = True
                    self._last_step = max(self._last_step, int(msg[1]))
                    writer.write(encode_frame((Wire.CLOSED,)))
                    await writer.drain()
                    if all(s.closed for s in self._ranks.values()) and len(self._ranks) == len(self._expected):
                        self._parent.node_closed.remote(self._node, self._last_step, self._messages, self._epoch)
                    return
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            if state is not None and not state.closed:
                log.warning("rank %d of run %s disconnected without closing", state.rank, self._run)
                self._head.rank_failed.remote(self._node, state.rank)
        except Exception as exc:  # report, never swallow: the rank sees ERROR and raises
            log.exception("node actor of run %s failed serving a rank", self._run)
            writer.write(encode_frame((Wire.ERROR, f"{type(exc).__name__}: {exc}")))
            if state is not None:
                self._head.rank_failed.remote(self._node, state.rank)
        finally:
            writer.close()

    async def _complete(self, step: int, part: tuple[str, ...] | None, have: dict[int, tuple[_RankState, int]]) -> None:
        """Store the node's blocks of one call (one put per array), free the slots, tell the head once.

        ``part`` names the call's arrays (``None``: every declared array); a rank holding no
        block of them staged nothing (slot -1).

        A method of its own so that no local of a long-lived coroutine keeps the chunks'
        refs: the node actor owns them, and must not hold them past the consumers' windows.
        """
        loop = asyncio.get_running_loop()
        staged = [have[r] for r in sorted(have) if have[r][1] >= 0]
        names, refs = await loop.run_in_executor(self._executor, self._put, staged, part)
        for st, sl in staged:
            st.writer.write(encode_frame((Wire.FREE, sl)))
        self._parent.node_step.remote(NodeStep(self._node, step, names, refs, self._messages, part, self._epoch))
        self._messages += 1

    def _hello(self, msg: tuple[Any, ...], writer: asyncio.StreamWriter) -> _RankState:
        _, rank, path, arrays, slots, stride = msg
        if rank not in self._expected:
            raise ValueError(
                f"rank {rank} is not expected on node {self._node[:12]} (expected {sorted(self._expected)})"
            )
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"staging file {path} of rank {rank} is not visible to the node actor on node "
                f"{self._node[:12]}: the rank runs on another host than its INSITU_NODE setting says"
            ) from None
        try:
            mm = mmap.mmap(fd, slots * stride)
        finally:
            os.close(fd)
            os.unlink(path)
        state = _RankState(rank, mm, tuple(arrays), stride, writer)
        self._ranks[rank] = state
        writer.write(encode_frame((Wire.WELCOME,)))
        if self._status is not None:
            full = dataclasses.replace(self._status, updates=tuple(self._history.values()))
            writer.write(encode_frame((Wire.STATUS, full)))
        return state

    def _put(
        self, ranks: list[tuple[_RankState, int]], part: tuple[str, ...] | None = None
    ) -> tuple[tuple[str, ...], tuple[Any, ...]]:
        """Copy every block of one step of this node into the object store, one object per array.

        One ``ray.put`` per node, step and array instead of one per block: ``put`` costs ~1 ms
        of this actor's CPU regardless of size at small sizes (profiled). One object per
        *array* (not per step) so that each array's blocks live exactly as long as some
        consumer's window over that array holds them (the retention rule, per array).
        Blocks are in rank order (``ranks`` is sorted), which is how consumers find them.
        """
        by_array: dict[str, list[np.ndarray]] = {}
        for state, slot in ranks:
            base = slot * state.stride
            for name, _block, shape, dtype, offset in state.arrays:
                if part is not None and name not in part:
                    continue
                view = np.ndarray(shape, dtype=np.dtype(dtype), buffer=state.map, offset=base + offset)
                by_array.setdefault(name, []).append(view)
        names = tuple(sorted(by_array))
        return names, tuple(ray.put(tuple(by_array[name])) for name in names)
