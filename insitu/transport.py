"""Rank side of the rank <-> node-actor and rank 0 <-> run-driver channels: a Unix socket plus a staging file.

The chunk bytes never cross the socket: the rank copies its block into a slot
of a shared-memory staging file (one copy), then sends a few-byte message. The
node actor copies the slot into Ray's object store off the rank's thread and
frees the slot. Frames are a 4-byte little-endian length plus a pickle.
"""

from __future__ import annotations

import mmap
import os
import pickle
import select
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["RankChannel", "StagingFile", "decode_frames", "encode_frame"]

_HEADER = struct.Struct("<I")
_ALIGN = 64


def encode_frame(message: Any) -> bytes:
    """Serialize one message as a length-prefixed pickle.

    Examples
    --------
    >>> list(decode_frames(bytearray(encode_frame((1, "a")) + encode_frame(2))))
    [(1, 'a'), 2]
    """
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


def decode_frames(buffer: bytearray) -> Iterator[Any]:
    """Yield complete messages from ``buffer``, removing them from it."""
    pos = 0
    while len(buffer) - pos >= _HEADER.size:
        (n,) = _HEADER.unpack_from(buffer, pos)
        if len(buffer) - pos - _HEADER.size < n:
            break
        yield pickle.loads(buffer[pos + _HEADER.size : pos + _HEADER.size + n])
        pos += _HEADER.size + n
    del buffer[:pos]


def align(n: int) -> int:
    """Round ``n`` up to a cache line."""
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


class StagingFile:
    """A shared-memory file of ``slots`` equal slots, mapped read-write by one rank.

    The node actor maps it too and unlinks the name at once, so nothing is left
    in ``shm_dir`` whichever side dies.
    """

    def __init__(self, shm_dir: str, run: str, rank: int, slot_bytes: int, slots: int) -> None:
        self.slot_bytes = align(max(slot_bytes, 1))
        self.slots = slots
        self.path = str(Path(shm_dir) / f"insitu-{run}-r{rank}-{uuid.uuid4().hex[:8]}")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, self.slot_bytes * slots)
            self.map = mmap.mmap(fd, self.slot_bytes * slots)
        except BaseException:
            os.unlink(self.path)
            raise
        finally:
            os.close(fd)

    def unlink(self) -> None:
        """Remove the file name if the node actor has not already done so."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        """Unmap (the node actor keeps its own mapping)."""
        self.unlink()
        try:
            self.map.close()
        except BufferError:  # a numpy view still exists; the GC unmaps later
            pass


class RankChannel:
    """Blocking/non-blocking framed messages over a Unix stream socket."""

    def __init__(self, address: str, timeout: float) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
        self._adopt(sock)

    def _adopt(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.setblocking(False)
        self._buf = bytearray()
        self.closed = False

    @classmethod
    def from_socket(cls, sock: socket.socket) -> RankChannel:
        """Wrap an accepted connection (the serving side of the same framing)."""
        channel = cls.__new__(cls)
        channel._adopt(sock)
        return channel

    def send(self, message: Any) -> None:
        """Send one message (blocks only if the kernel buffer is full)."""
        data = encode_frame(message)
        self.sock.setblocking(True)
        try:
            self.sock.sendall(data)
        finally:
            self.sock.setblocking(False)

    def poll(self, timeout: float = 0.0) -> list[Any]:
        """Return the messages that arrived, waiting at most ``timeout`` s for the first."""
        if timeout > 0 and not self._buf:
            ready, _, _ = select.select([self.sock], [], [], timeout)
            if not ready:
                return []
        while True:
            try:
                chunk = self.sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.closed = True
                break
            if not chunk:
                self.closed = True
                break
            self._buf += chunk
        return list(decode_frames(self._buf))

    def wait_for(self, predicate: Any, deadline: float) -> list[Any]:
        """Collect messages until ``predicate(messages)`` or the monotonic ``deadline``."""
        got: list[Any] = []
        while not predicate(got):
            left = deadline - time.monotonic()
            if left <= 0 or self.closed:
                break
            got += self.poll(min(left, 0.5))
        return got

    def close(self) -> None:
        """Close the socket."""
        try:
            self.sock.close()
        except OSError:
            pass
