"""A private RabbitMQ node for the tests: free 127.0.0.1 ports, its own directory, node name
and epmd, stopped by its own handles.

Never the machine's RabbitMQ on 5672: this node has its own RABBITMQ_NODENAME, AMQP port,
distribution port, data and log directories, config (loopback listener only, no
management plugin, guest allowed from loopback) and Erlang cookie (HOME).  Its epmd is
private too (ERL_EPMD_PORT on a free port, started here in the foreground), so nothing of
ours is left in the machine's epmd on 4369, and stopping the node stops everything it
started: `rabbitmqctl stop`, then the process group by its id.
"""
from __future__ import annotations

import glob
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from ports import free_port

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"   # Debian's, run as this user (not via su)
CTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
BOOT_TIMEOUT = 60.0
VHOST_BATCH = 16  # fresh vhosts made at once (url())


def _wait_free(*ports: int, timeout: float = 30.0) -> None:
    """Wait until each port can be bound on 127.0.0.1 (at most timeout seconds)."""
    deadline = time.monotonic() + timeout
    for port in ports:
        while time.monotonic() < deadline:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the node listens:
                try:                                                    # TIME_WAIT is no owner
                    s.bind(("127.0.0.1", port))
                    break
                except OSError:
                    pass
            time.sleep(0.2)


def _epmd() -> str:
    found = sorted(glob.glob("/usr/lib/erlang/erts-*/bin/epmd"))
    if not found:
        raise RuntimeError("no epmd under /usr/lib/erlang: install rabbitmq-server (apt)")
    return found[-1]


class RabbitServer:
    """One private RabbitMQ node; restart() keeps its ports and data (durable queues survive)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        if not os.path.exists(SERVER):
            raise RuntimeError(f"{SERVER} is missing: apt-get install rabbitmq-server")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.epmd_port = free_port()
        self.node = f"nbqtest{uuid.uuid4().hex[:8]}@localhost"
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq-env.conf").write_text("")
        self.env = dict(
            os.environ, HOME=str(self.dir), RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1", ERL_EPMD_PORT=str(self.epmd_port),
            ERL_EPMD_ADDRESS="127.0.0.1",
            # the distribution listener on loopback too (Erlang's default is every interface)
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            RABBITMQ_MNESIA_BASE=str(self.dir / "mnesia"), RABBITMQ_LOG_BASE=str(self.dir / "log"),
            RABBITMQ_CONFIG_FILE=str(self.dir / "rabbitmq.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.dir / "enabled_plugins"),
            RABBITMQ_CONF_ENV_FILE=str(self.dir / "rabbitmq-env.conf"),
            RABBITMQ_PID_FILE=str(self.dir / "rabbit.pid"))
        self._ports()
        self.epmd = subprocess.Popen([_epmd(), "-port", str(self.epmd_port), "-address", "127.0.0.1"],
                                     env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        self.proc: subprocess.Popen | None = None
        self._vhosts = 0  # vhosts made so far
        self._fresh: list[str] = []  # made, not given to a test yet
        try:
            self.start()
        except BaseException:
            self.stop()
            raise

    @property
    def log(self) -> Path:
        return self.dir / "server.log"

    def _ports(self) -> None:
        """Free AMQP and distribution ports, written where the node reads them."""
        self.port, self.dist_port = free_port(), free_port()
        self.env.update(RABBITMQ_NODE_PORT=str(self.port), RABBITMQ_DIST_PORT=str(self.dist_port))
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\nloopback_users = none\n"
            "log.console = false\nlog.file.level = warning\n")

    def start(self) -> None:
        """Boot the node and wait until it speaks AMQP.  A port another process took meanwhile
        (a free port is only free when chosen) is waited for on a restart, which must keep its
        port, or replaced by a new one on a first start; three tries."""
        for attempt in range(3):
            logged = self.log.stat().st_size if self.log.exists() else 0
            if self._boot():
                return
            with open(self.log, "rb") as f:
                f.seek(logged)
                said = f.read().decode(errors="replace")
            if "eaddrinuse" not in said or attempt == 2:
                raise RuntimeError(f"rabbitmq-server did not start: {said[-3000:]}")
            self.kill()  # what the node started before it gave up
            if self._vhosts:  # clients know this port: wait for whoever holds it to let go
                _wait_free(self.port, self.dist_port)
            else:
                self._ports()

    def _boot(self) -> bool:
        """Start the node; True once it answers, False if it exits first."""
        self.proc = subprocess.Popen([SERVER], env=self.env, cwd=self.dir, stdin=subprocess.DEVNULL,
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not self._answers():
            if self.proc.poll() is not None:
                return False
            if time.monotonic() > deadline:
                said = self.log.read_text()[-3000:]
                self.kill()  # down, so that the next test starts a node of its own
                raise RuntimeError(f"rabbitmq-server did not answer in {BOOT_TIMEOUT:.0f} s: {said}")
            time.sleep(0.1)
        return True

    def _answers(self) -> bool:
        """Whether the node speaks AMQP (a protocol header answered by Connection.Start)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), 0.5) as s:
                s.sendall(b"AMQP\x00\x00\x09\x01")
                return len(s.recv(8)) > 0
        except OSError:
            return False

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """rabbitmqctl -n NODE ARGS on this node."""
        return subprocess.run([CTL, "-n", self.node, *args], env=self.env, cwd=self.dir,
                              capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        """rabbitmqctl stop; then its process group killed by id if anything is left."""
        if self.proc is not None:
            if self.proc.poll() is None:
                try:
                    self.ctl("stop", timeout=30)
                except subprocess.TimeoutExpired:
                    pass
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    pass
            self.kill()  # erl_child_setup and helpers of the node share its process group
        if getattr(self, "epmd", None) is not None and not self._restarting:
            self.epmd.kill()
            self.epmd.wait()
            self.epmd = None

    _restarting = False

    def kill(self) -> None:
        """SIGKILL the node, as a crash: what it wrote to disk is all that survives."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # the node had ended
                pass
            self.proc.wait()
            self.proc = None

    def restart(self, down_for: float = 0.0, while_down: Callable[[], None] = lambda: None) -> None:
        """Stop the node, call while_down(), keep it down for down_for seconds in all, and
        start it again on the same ports and data (its epmd stays)."""
        self._restarting = True
        try:
            self.stop()
        finally:
            self._restarting = False
        until = time.monotonic() + down_for
        while_down()
        time.sleep(max(0.0, until - time.monotonic()))  # an outage of a given length
        self.start()

    def _make_vhosts(self, n: int) -> None:
        """n more fresh vhosts, guest allowed everywhere in them, in one rabbitmqctl call (each
        call boots an Erlang VM: ~0.5 s, far more than making a vhost)."""
        names = [f"t{self._vhosts + i + 1}" for i in range(n)]
        erl = ", ".join(f'<<"{v}">>' for v in names)
        done = self.ctl("eval", '[begin rabbit_vhost:add(V, <<"nbq">>), '
                        'rabbit_auth_backend_internal:set_permissions(<<"guest">>, V, <<".*">>, '
                        f'<<".*">>, <<".*">>, <<"nbq">>) end || V <- [{erl}]].')
        if done.returncode or "".join(done.stdout.split()) != "[" + ",".join(["ok"] * n) + "]":
            raise RuntimeError(f"making vhosts {names} failed: {done.stdout}{done.stderr}")
        self._vhosts += n
        self._fresh += names

    def url(self, vhost: str | None = None, **query) -> str:
        """amqp://guest:guest@127.0.0.1:PORT/VHOST; a fresh vhost unless one is named (each
        test gets queues and exchanges of its own, as each gets a fresh Redis database)."""
        if vhost is None:
            if not self._fresh:
                self._make_vhosts(VHOST_BATCH)
            vhost = self._fresh.pop(0)
        q = "?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else ""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/{vhost}{q}"
