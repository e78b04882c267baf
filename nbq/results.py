"""Stored results by task id, within a byte budget, oldest evicted first: the ZeroMQ
broker's (broker/results.py) and the in-process broker's (transport/memory/).

A result reaches its client as it arrives; what is stored is the copy that
AsyncResult, MapResult.from_id and watchers fetch later.  When the stored
payloads pass the budget, the results stored first are dropped first (those
tasks' results can then no longer be fetched by id).
"""
from __future__ import annotations

from collections import OrderedDict

from . import protocol

PART_OVERHEAD = 200  # bytes counted per stored part beside its payload (header, tuple, list)


class ResultStore:
    """Result parts (item, payload frames, raw message or None) by task id."""

    __slots__ = ("budget", "bytes", "_parts", "_sizes")

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.bytes = 0
        self._parts: OrderedDict[str, list] = OrderedDict()
        self._sizes: dict[str, int] = {}

    def add(self, tid: str, part: tuple) -> None:
        """Store a part of tid's result, then evict the oldest results while over budget."""
        parts = self._parts.get(tid)
        if parts is None:
            parts = self._parts[tid] = []
        parts.append(part)
        size = protocol.frame_size(part[1]) + PART_OVERHEAD
        self._sizes[tid] = self._sizes.get(tid, 0) + size
        self.bytes += size
        while self.bytes > self.budget and self._parts:
            self.pop(next(iter(self._parts)))

    def get(self, tid: str, default=None):
        return self._parts.get(tid, default)

    def pop(self, tid: str, default=None):
        parts = self._parts.pop(tid, None)
        if parts is None:
            return default
        self.bytes -= self._sizes.pop(tid)
        return parts

    def __len__(self) -> int:
        return len(self._parts)
