"""Large frames through shared memory between processes of one host: only a name crosses the socket.

A sender whose broker is on its own host (same ``locality()``: kernel boot, /dev/shm, pid
namespace and user) writes each frame of SHARE_MIN bytes or more of a ``tasks`` or ``res``
message to a new file in /dev/shm and sends a descriptor in its place (``nbq-shm:NAME:SIZE``);
a receiver maps the file copy-on-write (a writable array, no copy) instead of reading
bytes from the socket.  The broker forwards descriptors only to peers of its own
locality: any other (another host, container or user) gets the bytes, signed again.

Trust (the contract: nothing unverified is loaded, nothing unverified creates state):

* the descriptor is a payload frame, so the message's signature covers it: only a key
  holder names a segment, and a receiver opens nothing before the signature checks;
* a name is ``nbq-<locality>-<broker pid>-<128 random bits>``, checked against that
  pattern (no path), created with O_EXCL (never an existing file) and mode 0600, then
  made 0400 once written; a receiver opens it O_NOFOLLOW and refuses anything that is not
  a regular file of its own user, with group or other permissions, or of another size;
* so the bytes were written by the key holder that signed their name, and afterwards
  only a process of the same user could write them again, and such a process can read the
  key file and the senders' memory already: sharing memory widens no one's reach.  Pickle
  streams (what could run code) never go this way, only out-of-band buffers (raw data).

Lifetime: every holder holds a mapping, names are only for handing over.  The broker
maps each segment of a message it keeps: a task's are unlinked when the broker lets go of
the task (done, cancelled, expired); a result's name is unlinked by its owner client once
mapped (the broker's mapping keeps the stored copy for fetches by id, which get bytes; the
result budget counts it).  Names carry the broker's pid: a broker unlinks its own when it stops, and
any process that shares memory unlinks those of brokers no longer running (``sweep``),
so a killed client or broker leaves nothing in /dev/shm for long.
"""
from __future__ import annotations

import functools
import hashlib
import mmap
import os
import re
import secrets
import stat
from typing import Sequence

from .errors import NbqError
from .utils.processes import alive as running

SHARE_MIN = 1 << 20            # frames this large go through shared memory
DIR = "/dev/shm"
MAGIC = b"nbq-shm:"
DESCRIPTOR_MAX = 200           # bytes of a descriptor frame (out-of-band buffers are 64 KiB+)
_NAME = re.compile(r"nbq-([0-9a-f]{12})-([0-9]{1,10})-([0-9a-f]{12})-[0-9a-f]{32}")


class SharedMemoryGone(NbqError):
    """A large frame's shared memory segment is gone or is not what its descriptor says."""


@functools.cache
def locality() -> str | None:
    """This process's memory locality: equal only for processes that can open each other's
    /dev/shm files as the same user; None when shared memory is off (NBQ_SHM=0) or absent."""
    if os.environ.get("NBQ_SHM", "").strip().lower() in ("0", "off", "no", "false"):
        return None
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        shm = os.stat(DIR)
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
    if not os.access(DIR, os.W_OK):
        return None
    text = f"{boot}|{shm.st_dev}|{shm.st_ino}|{pidns}|{os.getuid()}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def prefix(boot: str) -> str | None:
    """What a broker (boot: its boot id, 12 hex digits) of this locality tells its peers
    (welcome ``lo``): its names' prefix."""
    lo = locality()
    return None if lo is None else f"nbq-{lo}-{os.getpid()}-{boot}"


def usable(broker_prefix: str | None) -> bool:
    """Whether a peer told broker_prefix may send large frames through shared memory."""
    lo = locality()
    return lo is not None and isinstance(broker_prefix, str) and \
        broker_prefix.startswith(f"nbq-{lo}-")


def is_descriptor(frame) -> bool:
    """Whether a frame is a descriptor (checked on every frame loaded: cheap first)."""
    if type(frame) is not bytes:
        if isinstance(frame, Held):
            return False
        mv = memoryview(frame)  # (a zmq.Frame is a buffer: its .buffer costs 4x more)
        if mv.nbytes > DESCRIPTOR_MAX:
            return False
        frame = bytes(mv)  # at most DESCRIPTOR_MAX bytes: cheaper than comparing a memoryview
    return len(frame) <= DESCRIPTOR_MAX and frame.startswith(MAGIC)


def export(frames: Sequence, broker_prefix: str) -> list:
    """frames, each of SHARE_MIN bytes or more written to a new segment and replaced by its
    descriptor (the message is signed afterwards, over the descriptors)."""
    out = []
    for f in frames:
        view = memoryview(f)
        if view.nbytes < SHARE_MIN:
            out.append(f)
            continue
        name = f"{broker_prefix}-{secrets.token_hex(16)}"
        fd = os.open(os.path.join(DIR, name),
                     os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            view = view.cast("B")
            done = 0
            while done < view.nbytes:
                done += os.write(fd, view[done:])
            os.fchmod(fd, 0o400)
        except BaseException:
            os.unlink(os.path.join(DIR, name))
            raise
        finally:
            os.close(fd)
        out.append(b"%s%s:%d" % (MAGIC, name.encode(), view.nbytes))
    return out


class Held:
    """A mapped segment: ``buffer`` is it, copy-on-write (writable, never written back).

    Mapped at once and its file closed: a mapping keeps the memory (after its name is
    unlinked, too) and costs no file descriptor, so a broker may hold thousands; pages are
    read only where touched.  ``unlink``: remove its name when this is dropped (the
    broker's hold on a task's segment).
    """

    __slots__ = ("name", "size", "_map", "_unlink", "__weakref__")

    def __init__(self, descriptor, unlink: bool = False) -> None:
        self._unlink = False
        self.name, self.size = _parse(descriptor)
        try:
            fd = os.open(os.path.join(DIR, self.name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise SharedMemoryGone(f"the shared memory of a large frame ({self.name}) is gone: "
                                   f"{e.strerror} (its sender or broker stopped before it was "
                                   "read); submit it again") from None
        try:
            st = os.fstat(fd)
            if (not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid()
                    or st.st_mode & 0o077 or st.st_size != self.size or not self.size):
                raise SharedMemoryGone(f"shared memory {self.name} is not a private file of "
                                       f"{self.size:,} bytes of this user: refused")
            self._map = mmap.mmap(fd, self.size, flags=mmap.MAP_PRIVATE,
                                  prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self._unlink = unlink

    @property
    def buffer(self) -> memoryview:
        return memoryview(self._map)

    @property
    def descriptor(self) -> bytes:
        return b"%s%s:%d" % (MAGIC, self.name.encode(), self.size)

    def __len__(self) -> int:
        return self.size

    def forget(self) -> None:
        """Unlink the name now (a receiver that holds it open and owns it)."""
        _unlink(self.name)

    def __del__(self) -> None:
        if self._unlink:
            _unlink(self.name)


def _parse(descriptor) -> tuple[str, int]:
    try:
        name, size = bytes(descriptor)[len(MAGIC):].decode("ascii").rsplit(":", 1)
        size = int(size)
    except ValueError:
        raise SharedMemoryGone("a large frame's shared memory descriptor is malformed") from None
    if not _NAME.fullmatch(name) or name.split("-")[1] != locality():
        raise SharedMemoryGone(f"shared memory {name[:80]!r} is not of this host's nbq: refused")
    return name, size


def hold(frames: list, unlink: bool = False, forget: bool = False) -> list:
    """frames, each descriptor replaced by its open segment (Held) when it opens; one that
    does not stays as it is, and fails whoever loads it (SharedMemoryGone, said once)."""
    if not any(is_descriptor(f) for f in frames):
        return frames
    out = []
    for f in frames:
        if is_descriptor(f):
            try:
                f = Held(f, unlink)
                if forget:
                    f.forget()
            except SharedMemoryGone:
                pass
        out.append(f)
    return out


def wire(frames: Sequence, shared: bool) -> list:
    """frames to send: a held segment as its descriptor (shared) or its bytes."""
    return [(f.descriptor if shared else f.buffer) if isinstance(f, Held) else f for f in frames]


def has_held(frames: Sequence) -> bool:
    return any(isinstance(f, Held) for f in frames)


def view(frame):
    """A frame as a buffer for unpickling: a descriptor left unopened is opened here."""
    if isinstance(frame, Held):
        return frame.buffer
    if is_descriptor(frame):
        return Held(frame).buffer  # raises SharedMemoryGone when it cannot be opened
    return frame if type(frame) is bytes else memoryview(frame)


def _unlink(name: str) -> None:
    try:
        os.unlink(os.path.join(DIR, name))
    except (FileNotFoundError, TypeError):  # TypeError: os half gone at interpreter exit
        pass


def sweep(own: str | None = None) -> int:
    """Unlink this locality's segments of brokers no longer running (and those of the
    prefix own: a broker that stops); how many."""
    lo = locality()
    if lo is None:
        return 0
    gone = 0
    try:
        names = os.listdir(DIR)
    except OSError:
        return 0
    alive: dict[int, bool] = {}
    for name in names:
        m = _NAME.fullmatch(name)
        if m is None or m.group(1) != lo:
            continue
        pid = int(m.group(2))
        if pid not in alive:
            alive[pid] = running(pid)
        if not alive[pid] or (own is not None and name.startswith(own + "-")):
            _unlink(name)
            gone += 1
    return gone
