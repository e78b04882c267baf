"""The shared signing key: NBQ_KEY, else the file named by NBQ_KEY_FILE, else ~/.config/nbq/key.

The default file is created with mode 0600 on first use, so a client, broker and
workers on one machine agree with no setup.  It is written whole under a temporary
name and then linked into place, so a process that loses the race to create it
reads the winner's key, never a partial one.  A key is bytes, at least
MIN_KEY_BYTES of them; it remembers where it came from (``Key.source``) for error
messages, which never show the key itself.

A key's fingerprint (an HMAC of a constant under it) is what a cluster keeps and
what a worker or client compares with its own before it starts: it tells two keys
apart and reveals nothing of either.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
import sys
import tempfile
from pathlib import Path

from .errors import InvalidKey

log = logging.getLogger("nbq.keys")

DEFAULT_KEY_FILE = Path("~/.config/nbq/key")
MIN_KEY_BYTES = 32
STDIN = "-"  # as a key file: read the key from standard input (`nbq worker --key-file -`)
MAKE_ONE = "python -c 'import secrets; print(secrets.token_hex(32))'"

_own: Key | None = None  # this process's key, once use() is called


class Key(bytes):
    """A signing key: the key's bytes, and ``source``, where it came from."""

    source: str

    def __new__(cls, value: bytes, source: str) -> Key:
        key = super().__new__(cls, value)
        key.source = source
        return key

    def __repr__(self) -> str:  # a traceback's locals or a log line never show the key
        return f"<nbq key from {self.source}, fingerprint {fingerprint(self)}>"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError(f"{self!r} cannot be pickled: a key never travels, not even in a pickle")


def fingerprint(key: bytes) -> str:
    """HMAC-SHA256 of a constant under key, 16 hex digits: tells keys apart, reveals nothing."""
    return hmac.new(key, b"nbq key fingerprint", hashlib.sha256).hexdigest()[:16]


def source_of(key: bytes) -> str:
    """Where key came from, for error messages."""
    return getattr(key, "source", "the key given to nbq")


def use(key: Key) -> None:
    """Make key this process's own: load_key() without a key file returns it from now on.

    ``nbq worker`` and ``nbq beat`` call this, so that the clients their tasks and
    apps make sign with their key without it being in any task's environment.
    """
    global _own
    _own = key


def key_file_path(key_file: str | os.PathLike | None = None) -> Path:
    """The key file in force: the argument, else NBQ_KEY_FILE, else the default."""
    return Path(key_file or os.environ.get("NBQ_KEY_FILE") or DEFAULT_KEY_FILE).expanduser()


def load_key(key_file: str | os.PathLike | None = None, given_as: str = "key_file") -> Key:
    """The signing key: key_file when given (``-``: standard input), else this process's own
    (use()), else NBQ_KEY, else the key file of NBQ_KEY_FILE or the default, made when missing.

    ``given_as`` names the option that gave key_file, for messages.  Raises InvalidKey
    for a key shorter than MIN_KEY_BYTES; warns when other users may read the key file.
    """
    if key_file is None:
        if _own is not None:
            return _own
        if os.environ.get("NBQ_KEY"):
            return _checked(os.fsencode(os.environ["NBQ_KEY"]), "the environment variable NBQ_KEY")
    if key_file == STDIN:
        return _checked(sys.stdin.buffer.read().strip(), f"standard input ({given_as} -)")
    path = key_file_path(key_file)
    how = (f" ({given_as})" if key_file is not None
           else " (NBQ_KEY_FILE)" if os.environ.get("NBQ_KEY_FILE") else "")
    try:
        data = _read(path)
    except FileNotFoundError:
        data = _create(path)
    return _checked(data, f"the key file {path.absolute()}{how}", path)


def handshake(key: bytes) -> bytes:
    """The key as a cluster hands it to a worker on its standard input: one line of hex, so
    the input can stay open after it (the worker's lifeline) whatever bytes the key holds."""
    return key.hex().encode() + b"\n"


def read_handshake(stream) -> Key:
    """The key of ``nbq worker --handshake``: one line of hex from stream (see handshake())."""
    line = stream.readline().strip()
    try:
        data = bytes.fromhex(line.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise InvalidKey("the first line on standard input (--handshake) is not a key in hex, "
                         "as nbq clusters send it") from None
    return _checked(data, "the cluster that started this worker (--handshake)")


def _read(path: Path) -> bytes:
    with open(path, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if stat.S_ISREG(mode) and mode & 0o077:
            log.warning("the key file %s is open to other users (mode %03o): whoever reads it can "
                        "run code on your workers; run `chmod 600 %s`", path, stat.S_IMODE(mode), path)
        return f.read().strip()


def _create(path: Path) -> bytes:
    """A new key in a new key file at path; if another process makes it first, theirs."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = secrets.token_hex(32).encode()
    fd, tmp = tempfile.mkstemp(prefix=".key-", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(key)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # whole, or not at all: fails if path exists
    except FileExistsError:
        return _read(path)
    finally:
        os.unlink(tmp)
    return key


def _checked(data: bytes, source: str, path: Path | None = None) -> Key:
    if len(data) < MIN_KEY_BYTES:
        what = "is empty (or whitespace)" if not data else f"has only {len(data)} bytes"
        fix = f"delete {path} to have a new key made, or write one made with `{MAKE_ONE}`" \
            if path is not None else f"use one made with `{MAKE_ONE}`"
        raise InvalidKey(f"the signing key from {source} {what}; a key needs at least "
                         f"{MIN_KEY_BYTES} bytes (anyone could guess a shorter one): {fix}")
    return Key(data, source)
