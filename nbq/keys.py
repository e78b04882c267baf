"""The shared signing key: NBQ_KEY, else the file named by NBQ_KEY_FILE, else ~/.config/nbq/key.

The default file is created with mode 0600 on first use, so a client, broker and
workers on one machine agree with no setup.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path

DEFAULT_KEY_FILE = Path("~/.config/nbq/key")


def key_file_path(key_file: str | os.PathLike | None = None) -> Path:
    """The key file in force: the argument, else NBQ_KEY_FILE, else the default."""
    return Path(key_file or os.environ.get("NBQ_KEY_FILE") or DEFAULT_KEY_FILE).expanduser()


def load_key(key_file: str | os.PathLike | None = None) -> bytes:
    """Return the signing key, creating the key file (0600) when it does not exist yet."""
    if key_file is None and os.environ.get("NBQ_KEY"):
        return os.environ["NBQ_KEY"].encode()
    path = key_file_path(key_file)
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = secrets.token_hex(32).encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it first: use theirs
        return path.read_bytes().strip()
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key
