"""A rank's link to its node's insitu process: the socket, the staging file, and reconnecting
to a restarted process (docs/architecture.md, "Recovery of a node process").

Mixed into :class:`~insitu.bridge.Bridge`, whose state it uses; kept apart so that the bridge
stays about ``send``.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from insitu.config import Config
from insitu.errors import ContractError, StepTimeoutError
from insitu.messages import Wire
from insitu.transport import RankChannel, StagingFile, align

__all__ = ["NodeLink"]

log = logging.getLogger(__name__)


class NodeLink:
    """Connect, and reconnect after the node process was restarted (see the module docstring)."""

    rank: int
    run: str
    node: str
    config: Config
    _address: str
    _channel: RankChannel | None
    _staging: StagingFile | None
    _views: list[dict[str, np.ndarray]]
    _free: list[int]
    _broken: str
    _broken_at: float
    _retry_at: float
    _reconnects: int
    _in_flight: Any
    _gap_start: tuple[int, int] | None
    _dropped: int
    _failure_message: str
    gaps: list[tuple[int, int, int]]
    _specs: dict[str, Any]
    _layouts: dict[str, Any]

    if TYPE_CHECKING:  # the bridge's own

        def _handle(self, messages: list[Any]) -> None: ...

    def _connect(self, address: str, cfg: Config, timeout: float | None = None) -> None:
        entries: list[tuple[str, Any, tuple[int, ...], str, int]] = []
        offset = 0
        for name in sorted(self._specs):
            spec = self._specs[name]
            if not spec.owns_block:
                continue
            block = self._layouts[name].block_of(self.rank)
            assert spec.shape is not None  # owns_block
            entries.append((name, block, spec.shape, spec.dtype.str, offset))
            offset += align(spec.nbytes)
        self._staging = StagingFile(cfg.shm_dir, self.run, self.rank, offset, cfg.slots)
        stride = self._staging.slot_bytes
        self._views = [
            {
                name: np.ndarray(shape, dtype=np.dtype(dt), buffer=self._staging.map, offset=slot * stride + off)
                for name, _, shape, dt, off in entries
            }
            for slot in range(cfg.slots)
        ]
        setup = timeout or max(cfg.deadline, cfg.startup_deadline)
        try:
            self._channel = RankChannel(address, setup)
            self._channel.send((Wire.HELLO, self.rank, self._staging.path, tuple(entries), cfg.slots, stride))
            got = self._channel.wait_for(
                lambda ms: any(m[0] in (Wire.WELCOME, Wire.ERROR) for m in ms), time.monotonic() + setup
            )
        finally:
            self._staging.unlink()
        for m in got:
            if m[0] == Wire.ERROR:
                raise ContractError(m[1])
        if not any(m[0] == Wire.WELCOME for m in got):
            raise StepTimeoutError(
                f"the node actor of node {self.node[:12]} did not answer rank {self.rank} within {setup:.0f} s"
            )
        self._handle([m for m in got if m[0] == Wire.STATUS])

    def _recoverable(self) -> bool:
        """Broken, and the node's process may still come back (``node_restarts``, within the deadline)."""
        if not self._broken:
            return False
        if not self._broken_at:
            self._broken_at = time.monotonic()
        return self.config.node_restarts > 0 and time.monotonic() - self._broken_at < self.config.deadline

    def _reconnect(self) -> None:
        """Reconnect to the node's restarted insitu process, which listens at the same address (at most
        every 0.25 s; a fresh staging file, every slot free). Stays broken if nobody answers yet."""
        now = time.monotonic()
        if not self._recoverable() or now < self._retry_at:
            return
        self._retry_at = now + 0.25
        self._drop_link()
        try:
            self._connect(self._address, self.config, timeout=min(5.0, self.config.deadline))
        except Exception as exc:  # noqa: BLE001 - not back yet: the step is dropped, the next send retries
            log.debug("rank %d: node process of node %s not back yet: %s", self.rank, self.node[:12], exc)
            self._drop_link()
            return
        self._free = list(range(self.config.slots))
        self._broken = ""
        self._broken_at = 0.0
        self._reconnects += 1

    def _drop_link(self) -> None:
        """Close the socket and unmap the staging file (the node process keeps its own mapping)."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self._staging is not None:
            self._views = []
            self._staging.close()
            self._staging = None

    def _recovered(self, step: int) -> None:
        """Steps flow again at ``step`` after a failure (on every rank at once): the steps in flight
        then will never complete, and the outage's gap is recorded (and warned of on rank 0)."""
        self._in_flight.clear()
        if self._gap_start is not None:
            first, before = self._gap_start
            self.gaps.append((first, step - 1, self._dropped - before))
            if self.rank == 0:
                warnings.warn(f"insitu run {self.run!r}: steps flow again from step {step} after "
                              f"{self._failure_message}; {self._dropped - before} step(s) dropped meanwhile "
                              f"(steps {first}..{step - 1})", RuntimeWarning, stacklevel=4)  # fmt: skip
        self._gap_start = None
