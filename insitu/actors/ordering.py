"""Per-sender ordering of messages that Ray may deliver out of order (async actors).

Examples
--------
>>> order = InOrder()
>>> order.push("a", 1, "second")
[]
>>> order.push("a", 0, "first")
['first', 'second']
>>> order.count("a"), order.count("b")
(2, 0)
>>> order.push("a", 4, "fifth")
[]
>>> order.skip_to("a", 4)  # seq 2 and 3 never come
['fifth']
"""

from __future__ import annotations

from collections import Counter
from typing import Generic, TypeVar

__all__ = ["InOrder"]

T = TypeVar("T")


class InOrder(Generic[T]):
    """Hands each sender's messages over in its sequence order (0, 1, 2, ...)."""

    def __init__(self) -> None:
        self._next: Counter[str] = Counter()
        self._early: dict[str, dict[int, T]] = {}

    def push(self, sender: str, seq: int, message: T) -> list[T]:
        """Add one message; return the messages now deliverable, in order."""
        early = self._early.setdefault(sender, {})
        early[seq] = message
        out = []
        while self._next[sender] in early:
            out.append(early.pop(self._next[sender]))
            self._next[sender] += 1
        return out

    def skip_to(self, sender: str, seq: int) -> list[T]:
        """Give up on the missing messages of ``sender`` below and at ``seq``: return the ones held up
        to ``seq`` (in order) and any that follow it without a gap; later numbers below ``seq`` are ignored."""
        early = self._early.setdefault(sender, {})
        out = [early.pop(q) for q in sorted(q for q in early if q <= seq)]
        self._next[sender] = max(self._next[sender], seq + 1)
        while self._next[sender] in early:
            out.append(early.pop(self._next[sender]))
            self._next[sender] += 1
        return out

    def count(self, sender: str) -> int:
        """Messages of ``sender`` handed over so far."""
        return self._next[sender]

    def counts(self) -> dict[str, int]:
        """Messages handed over, per sender."""
        return dict(self._next)
