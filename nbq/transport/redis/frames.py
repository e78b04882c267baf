"""Messages as Redis stores them: packed strings, stream entry fields, large frames stored apart.

A frame of BIG bytes or more is stored under a key of its own (nbq:b:, one SET) and the
message holds a reference to it, so Lua scripts, result lists and streams never copy it;
a reader reads it back in GETRANGE pieces into one writable buffer.
"""
from __future__ import annotations

import concurrent.futures
import uuid
from typing import Any, Callable, NamedTuple

import redis

from ... import protocol
from .keys import P

BIG = 1 << 20             # a frame this large is stored under its own key (one SET), not in a message
READ_CHUNK = 4 << 20      # and read back in GETRANGE pieces of this size into one buffer
SPILLED = 1 << 63         # pack's flag on the length of a frame stored apart


class BadMessage(Exception):
    """A message read from Redis that failed to parse, read or verify: dropped, never acted on."""

    def __init__(self, reason: str, why: str) -> None:
        super().__init__(why)
        self.reason = reason  # "signature", "invalid", "replay" or "size" (as the ZeroMQ broker's)


class Spilled(NamedTuple):
    """A frame of `size` bytes stored under a key of its own (Frames.spiller); Frames.resolve reads it."""
    key: bytes
    size: int


def pack(frames, spill: Callable[[Any], bytes] | None = None) -> bytes:
    """Frames as one string (8-byte little-endian length before each).

    With spill, a frame of BIG bytes or more is stored apart (spill returns its key) and
    written as its size with the SPILLED bit set, the key's length and the key.
    """
    out = []
    for f in frames:
        n = memoryview(f).nbytes
        if spill is not None and n >= BIG:
            key = spill(f)
            out += [(SPILLED | n).to_bytes(8, "little"), len(key).to_bytes(8, "little"), key]
        else:
            out += [n.to_bytes(8, "little"), f]
    return b"".join(out)


def unpack(blob: bytes) -> list:
    """The frames of pack's string: memoryviews of it, and Spilled for frames stored apart;
    ValueError if it is not pack's layout (a length past its end)."""
    mv = memoryview(blob)
    out, i = [], 0
    while i < len(mv):
        n = int.from_bytes(mv[i:i + 8], "little")
        if n & SPILLED:
            k = int.from_bytes(mv[i + 8:i + 16], "little")
            out.append(Spilled(bytes(mv[i + 16:i + 16 + k]), n & ~SPILLED))
            i += 16 + k
        else:
            out.append(mv[i + 8:i + 8 + n])
            i += 8 + n
    if i != len(mv):
        raise ValueError("a packed frame's length runs past the end")
    return out


def entry_fields(msg: list, spill: Callable[[Any], bytes] | None = None) -> dict:
    """A signed message as stream fields: h, s, 0..n; with spill, large frames are stored
    apart (the field holds pack's reference) and listed in field b."""
    fields = {"h": msg[0], "s": msg[1]}
    spilled = []
    for i, f in enumerate(msg[2:]):
        if spill is not None and memoryview(f).nbytes >= BIG:
            fields[str(i)] = pack([f], spill)
            spilled.append(str(i))
        else:
            fields[str(i)] = f
    if spilled:
        fields["b"] = ",".join(spilled)
    return fields


def entry_frames(fields: dict) -> list:
    """The signed message of an entry's fields (Spilled where a frame is stored apart);
    ValueError if the fields are not entry_fields' layout."""
    try:
        spilled = fields[b"b"].decode("ascii").split(",") if b"b" in fields else []
        frames = [fields[b"h"], fields[b"s"]]
        for i in range(len(fields) - 2 - (b"b" in fields)):
            f = fields[str(i).encode()]
            if str(i) in spilled:
                (f,) = unpack(f)
                if not isinstance(f, Spilled):
                    raise ValueError(f"field {i} is listed in b but not stored apart")
            frames.append(f)
    except KeyError as e:
        raise ValueError(f"field {e} is missing") from None
    return frames


def stored_apart(header: dict, raw: bytes) -> list[tuple[str, int, list[bytes]]]:
    """(task id, bytes, keys) of the parts of a verified result message with frames stored apart."""
    out = []
    for item, frames in protocol.split(header["t"], unpack(raw)[2:]):
        refs = [f for f in frames if isinstance(f, Spilled)]
        if refs:
            out.append((item["id"], sum(f.size for f in refs), [f.key for f in refs]))
    return out


class Frames:
    """Large frames of one Redis: stored apart on a thread of their own, read back in pieces.

    retry is the Store's (connection errors retried, counted); ttl_s their expiry;
    max_size the most bytes of frames stored apart one message may claim.
    """

    def __init__(self, r: redis.Redis, retry: Callable, ttl_s: int, max_size: int) -> None:
        self.r = r
        self.retry = retry
        self.ttl_s = ttl_s
        self.max_size = max_size
        self._thread: concurrent.futures.ThreadPoolExecutor | None = None

    def close(self) -> None:
        """Stop the spill thread (after the stores it has begun)."""
        if self._thread is not None:
            self._thread.shutdown()

    def _spill(self, frame) -> bytes:
        """Store a large frame under a key of its own (one SET, expiry result_expires); its key."""
        key = (P + "b:" + uuid.uuid4().hex).encode()
        self.retry("storing a large frame", lambda: self.r.set(key, frame, ex=self.ttl_s))
        return key

    def spiller(self, frames) -> Callable[[Any], bytes]:
        """Start storing the large ones of frames apart, each once, on this Frames' thread,
        and return the spill function for pack and entry_fields: it waits for a frame's SET.

        Started before the message is signed, so hashing and sending overlap (hashlib and
        the socket both let go of the GIL).
        """
        big = {id(f): f for f in frames if memoryview(f).nbytes >= BIG}
        if not big:
            return self._spill
        if self._thread is None:
            self._thread = concurrent.futures.ThreadPoolExecutor(1, "nbq-spill")
        keys = {i: self._thread.submit(self._spill, f) for i, f in big.items()}
        return lambda f: keys[id(f)].result() if id(f) in keys else self._spill(f)

    def resolve(self, frames: list) -> list:
        """frames, each Spilled one read into a buffer of its own; LookupError if one is gone
        or has another size than its reference says, BadMessage("size") if together they
        pass max_message_size: checked before anything is allocated."""
        spilled = [f for f in frames if isinstance(f, Spilled)]
        if not spilled:
            return frames
        size = sum(f.size for f in spilled)
        if size > self.max_size:
            raise BadMessage("size", f"its frames stored apart claim {size:,} bytes, more than "
                             f"max_message_size ({self.max_size:,})")
        for f in spilled:
            if not f.key.startswith(P.encode() + b"b:"):
                raise LookupError(f"{f.key[:60]!r} is not a stored-apart frame's key")

        def strlen():
            pipe = self.r.pipeline(transaction=False)
            for f in spilled:
                pipe.strlen(f.key)
            return pipe.execute()

        lengths = self.retry("reading large frames' sizes", strlen)
        for f, n in zip(spilled, lengths):
            if n != f.size:
                raise LookupError(f"its large frame {f.key.decode(errors='replace')} is gone "
                                  f"(expired?) or is not the {f.size:,} bytes it was")
        return [self._read(f) if isinstance(f, Spilled) else f for f in frames]

    def _read(self, ref: Spilled) -> bytearray:
        # GETRANGE pieces copied into place: about twice as fast as one GET here, and the
        # buffer is writable, so arrays rebuilt on it are too
        buf = bytearray(ref.size)
        mv = memoryview(buf)
        for at in range(0, ref.size, READ_CHUNK):
            piece = self.retry("reading a large frame",
                               lambda: self.r.getrange(ref.key, at, at + READ_CHUNK - 1))
            if len(piece) != min(READ_CHUNK, ref.size - at):
                raise LookupError(f"its large frame {ref.key.decode()} is gone (expired?)")
            mv[at:at + len(piece)] = piece
        return buf
