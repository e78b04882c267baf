"""Which item a worker process is running, in memory its supervisor can read after it dies.

A chunk re-run after a death reports item by item; if its process dies again,
the supervisor reads the marker and tells the broker exactly which item killed
it, so that item fails alone and the rest of the chunk runs.  Messages cannot
tell this: the last results of a killed process may never leave it.
"""
from __future__ import annotations

import mmap
import struct

_SIZE = 256
_HEAD = struct.Struct("qH")  # item index, task id length


class Marker:
    """A small shared (MAP_SHARED, anonymous) page: made before fork, written by the child."""

    def __init__(self) -> None:
        self._mem = mmap.mmap(-1, _SIZE)
        self.clear()

    def mark(self, task_id: str, index: int) -> None:
        raw = task_id.encode()[: _SIZE - _HEAD.size]
        self._mem[_HEAD.size:_HEAD.size + len(raw)] = raw
        _HEAD.pack_into(self._mem, 0, index, len(raw))

    def read(self) -> tuple[str, int] | None:
        index, n = _HEAD.unpack_from(self._mem, 0)
        if index < 0:
            return None
        return self._mem[_HEAD.size:_HEAD.size + n].decode(errors="replace"), index

    def clear(self) -> None:
        _HEAD.pack_into(self._mem, 0, -1, 0)

    def close(self) -> None:
        self._mem.close()
