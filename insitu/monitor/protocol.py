"""Messages between ``insitu monitor`` and its module subprocesses (one socket per module).

Frames are :func:`insitu.transport.encode_frame` (length-prefixed pickles, both ends are this
package). The server sends :class:`Call` and :class:`Ping`; a module answers with one
:class:`Reply` per call, or a stream of :class:`Chunk` (numbered from 0, the last one
``last=True``), and a :class:`Pong` per ping from its event loop (the heartbeat). The server
sends :class:`Cancel` when a client leaves before its answer ended (a closed event stream).

Examples
--------
>>> from insitu.transport import decode_frames, encode_frame
>>> list(decode_frames(bytearray(encode_frame(Ping(3)))))
[Ping(n=3)]
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Call", "Cancel", "Chunk", "Hello", "Ping", "Pong", "Reply"]


@dataclass(frozen=True, slots=True)
class Hello:
    """A module started: its name, process id and the routes it serves."""

    name: str
    pid: int
    routes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Call:
    """One HTTP request for a module: its route, query and the headers it may read."""

    id: int
    route: str
    query: tuple[tuple[str, str], ...] = ()
    last_event_id: str = ""


@dataclass(frozen=True, slots=True)
class Cancel:
    """The client of :class:`Call` ``id`` went away (or the call was answered 503): stop answering it."""

    id: int


@dataclass(frozen=True, slots=True)
class Reply:
    """The whole answer to :class:`Call` ``id``."""

    id: int
    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Chunk:
    """Part ``seq`` of a streamed answer to :class:`Call` ``id`` (written in ``seq`` order)."""

    id: int
    seq: int
    data: bytes
    last: bool = False
    content_type: str = "text/event-stream"


@dataclass(frozen=True, slots=True)
class Ping:
    """Health check ``n``: the module's event loop answers :class:`Pong` ``n``."""

    n: int


@dataclass(frozen=True, slots=True)
class Pong:
    """The answer to :class:`Ping` ``n``."""

    n: int
