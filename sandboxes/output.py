"""Bounded capture of a command's output stream."""

from __future__ import annotations


class CappedOutput:
    """Keeps the first and last ``cap // 2`` bytes of a stream of any length.

    Memory stays O(cap) however much the command prints; the middle is replaced by a marker
    saying how much was dropped (the head shows what started, the tail shows how it ended).
    """

    def __init__(self, cap: int) -> None:
        self.cap = max(cap, 0)
        self._head_cap = self.cap // 2
        self._tail_cap = self.cap - self._head_cap
        self._head = bytearray()
        self._tail = bytearray()
        self.total = 0

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        room = self._head_cap - len(self._head)
        if room > 0:
            self._head += data[:room]
            data = data[room:]
        if data:
            self._tail += data
            if len(self._tail) > 2 * self._tail_cap + 65536:
                del self._tail[: len(self._tail) - self._tail_cap]

    @property
    def truncated(self) -> bool:
        return self.total > self.cap

    def text(self) -> str:
        if not self.truncated:
            return (bytes(self._head) + bytes(self._tail)).decode("utf-8", errors="replace")
        tail = bytes(self._tail[len(self._tail) - self._tail_cap :]) if self._tail_cap else b""
        dropped = self.total - len(self._head) - len(tail)
        marker = f"\n[... {dropped} bytes of output omitted (cap {self.cap} bytes) ...]\n"
        return (bytes(self._head) + marker.encode() + tail).decode("utf-8", errors="replace")
