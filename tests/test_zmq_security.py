"""The ZeroMQ broker under attack, at its public boundary: raw sockets against a real
`nbq broker` and `nbq worker`.  A keyless sender (one that can reach the port) gets
nothing acted on and nothing back; a key holder's malformed message is dropped and
counted; a captured message replayed is refused; traffic can be encrypted (CURVE);
messages and stored results are bounded.  After every attack a real task is served.
"""
from __future__ import annotations

import json
import operator
import os
import time
from types import SimpleNamespace

import pytest
import zmq
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import nbq
from nbq import keys, protocol, secure
from nbq.errors import MessageTooLarge
from conftest import Processes, free_port, redis_url, start_broker, wait_until

BIG = 2 << 20  # more than the 1 MiB below which the broker used to verify signatures


def served(client: nbq.Client, timeout: float = 20) -> None:
    """A legitimate task still runs and its result comes back."""
    assert client.submit(operator.add, 40, 2).result(timeout=timeout) == 42


def signed_as_is(key: bytes, header: dict, frames: list = ()) -> list:
    """A message signed with the right key exactly as given (no fresh id or time): what a
    buggy or old sender, or a capture, would hold."""
    h = json.dumps(header, separators=(",", ":")).encode()
    return [h, protocol.Signer(key).sign(h, frames), *frames]


def unsigned(header: dict, frames: list = ()) -> list:
    """A keyless attacker's message: any header, a signature it made up."""
    return [json.dumps(header).encode(), os.urandom(32), *frames]


class Raw:
    """A DEALER socket with an identity of our choosing, as an attacker would open."""

    def __init__(self, address: str, identity: bytes, curve_key: bytes | None = None) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, identity)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDTIMEO, 5000)
        if curve_key is not None:
            secure.connect_curve(self.sock, curve_key)
        self.sock.connect(address)

    def send(self, msg: list) -> bool:
        """Queue msg; False if no connection would take it within 5 s (a peer whose handshake
        the broker refused has none between its reconnects, and would otherwise block)."""
        try:
            self.sock.send_multipart(msg)
        except zmq.Again:
            return False
        return True

    def received(self, timeout: float) -> list:
        """Every message that reached this socket within timeout seconds, except the broker's
        key refusal (its key's fingerprint, unsigned: the one answer a hello or heartbeat it
        cannot verify gets, so that a peer with another key stops with a clear error)."""
        out = []
        deadline = time.monotonic() + timeout
        while self.sock.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            msg = self.sock.recv_multipart()
            if protocol.refused(msg) is None:
                out.append(msg)
        return out

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A real broker and a one-process worker, and a client: shared by the attacks below,
    each of which leaves them serving."""
    tmp = tmp_path_factory.mktemp("zmqsec")
    procs = Processes(tmp)
    address = f"tcp://127.0.0.1:{free_port()}"
    # logs to files: thousands of dropped messages must not fill a pipe nobody reads
    broker = procs.nbq("broker", "--bind", address, stdout=open(tmp / "broker.log", "w"))
    procs.nbq("worker", "--broker", address, "-c", "1", stdout=open(tmp / "worker.log", "w"))
    print("logs in", tmp)
    client = nbq.Client(address)
    client.wait_for_workers(1)
    raws: list[Raw] = []

    def raw(identity: bytes) -> Raw:
        r = Raw(address, identity)
        raws.append(r)
        return r

    yield SimpleNamespace(address=address, client=client, key=keys.load_key(), broker=broker,
                          raw=raw, dropped=lambda: client.status()["dropped"])
    for r in raws:
        r.close()
    client.shutdown(wait=False)
    procs.stop_all()


# -- item 1: nothing unverified or malformed is acted on ------------------------------------

def _poison_tasks(c: str, h: str) -> list[dict]:
    """Task headers of the reported attacks: no function hash, n of 2e8, bad priorities."""
    return [{"id": "poison-no-h", "nf": 1, "q": "default"},
            {"id": "poison-n", "h": h, "nf": 1, "q": "default", "m": "map", "n": 200_000_000},
            {"id": "poison-pr", "h": h, "nf": 1, "q": "default", "pr": "urgent"},
            {"id": "poison-pr2", "h": h, "nf": 1, "q": "default", "pr": 10 ** 9},
            {"id": 7, "h": h, "nf": 1}, {"id": "poison-nf", "h": h, "nf": 5}]


def test_keyless_large_messages_are_verified_before_any_state(cluster):
    c = cluster.client
    h = c._ship(operator.add)
    attacker = cluster.raw(b"tevil")
    before = cluster.dropped()["signature"]
    rss0 = rss(cluster.broker.pid)
    sent = 0
    for item in _poison_tasks(c.id, h):
        attacker.send(unsigned({"k": "tasks", "c": c.id, "t": [item]}, [b"x" * BIG]))
        sent += 1
        served(c)
    wait_until(lambda: cluster.dropped()["signature"] - before == sent, what="every message counted")
    assert c.status()["tasks"] == 0
    assert rss(cluster.broker.pid) - rss0 < 60 << 20  # n=2e8 allocated nothing
    assert attacker.received(0.2) == []


def test_keyless_forged_result_and_cost_do_not_touch_a_running_task(cluster, tmp_path):
    c = cluster.client
    started = tmp_path / "started"

    def slow(x):
        open(started, "w").close()
        time.sleep(0.5)
        return x * 2

    fut = c.submit(slow, 21)
    wait_until(started.exists, what="the task to start")
    worker = cluster.raw(b"wevil")
    forged = protocol.dumps(666)
    for item in ({"id": fut.id, "s": 0, "n": 1, "ok": 1, "nf": 1},
                 {"id": fut.id, "s": 0, "n": 1, "ok": 1, "nf": 1, "d": "free"},
                 {"id": fut.id, "s": 0, "n": 1, "ok": 1, "nf": 1, "d": 1e-12}):
        worker.send(unsigned({"k": "res", "w": "evil", "t": [item], "rdy": 1},
                             [forged[0] + b" " * BIG]))
    assert fut.result(timeout=20) == 42
    assert c.gather([c.submit(operator.add, i, 1) for i in range(50)], timeout=20) == \
        list(range(1, 51))
    assert worker.received(0.2) == []


def test_signed_but_malformed_messages_are_dropped_and_counted(cluster):
    """A key holder's malformed message (a bug, an old version): dropped, counted, no answer."""
    c, key = cluster.client, cluster.key
    h = c._ship(operator.add)
    sender = cluster.raw(b"tmalformed")
    before = cluster.dropped()["invalid"]
    messages = [protocol.Signer(key).encode({"k": "tasks", "c": c.id, "t": [item]}, [b"x" * 64])
                for item in _poison_tasks(c.id, h)]
    messages += [protocol.Signer(key).encode(header) for header in (
        {"k": "cancel", "c": c.id, "ids": "abc", "rq": 1},
        {"k": "join", "c": c.id, "key": "j", "member": "m", "total": "2", "rq": 1},
        {"k": "watch", "c": c.id, "ids": [1, 2], "rq": 1},
        {"k": "nonsense", "c": c.id},
        {"k": "res", "w": "x", "t": [], "rdy": 1},           # a worker's kind from a client socket
        {"k": "ctl", "c": c.id, "cmd": "ping", "ci": "x"},     # no rq
    )]
    for msg in messages:
        sender.send(msg)
        served(c)
    wait_until(lambda: cluster.dropped()["invalid"] - before == len(messages),
               what="every message counted")
    assert c.status()["tasks"] == 0
    assert sender.received(0.2) == []


def test_signed_result_past_its_task_end_is_dropped(cluster, tmp_path):
    """Result positions must fall inside their task (the stored bitmap never grows)."""
    c, key = cluster.client, cluster.key
    started = tmp_path / "started"

    def slow(x):
        open(started, "w").close()
        time.sleep(0.5)
        return x + 1

    fut = c.submit(slow, 1)
    wait_until(started.exists, what="the task to start")
    worker = cluster.raw(b"wlate")
    worker.send(protocol.Signer(key).encode(
        {"k": "res", "w": "nobody", "t": [{"id": fut.id, "s": 10 ** 8, "n": 1, "nf": 1}], "rdy": 1},
        protocol.dumps(0)))
    assert fut.result(timeout=20) == 2
    served(c)


# -- item 3: replay ------------------------------------------------------------------------

def test_captured_task_replayed_runs_once(cluster, tmp_path):
    c, key = cluster.client, cluster.key
    runs = tmp_path / "runs"

    def count(x):
        with open(runs, "a") as f:
            f.write(f"{x}\n")

    fn = protocol.dumps(count)
    h = protocol.function_hash(b"".join(bytes(f) for f in fn))
    sender = cluster.raw(b"tcaptured")
    signer = protocol.Signer(key)
    sender.send(signer.encode({"k": "fn", "c": "captured", "h": h}, fn))
    payload = protocol.dumps(((1,), {}))
    captured = signer.encode({"k": "tasks", "c": "captured", "t": [
        {"id": "captured-1", "h": h, "q": "default", "nf": len(payload)}]}, payload)
    before = cluster.dropped()["replay"]
    for _ in range(4):
        sender.send(captured)
    # an old capture, and one from a sender that puts no id on its messages, are refused too
    old = {"k": "tasks", "c": "captured", "ms": "0123456789abcdef", "mn": 1,
           "mt": time.time() - 3600, "t": [{"id": "captured-2", "h": h, "q": "default", "nf": 1}]}
    sender.send(signed_as_is(key, old, payload))
    sender.send(signed_as_is(key, {k: v for k, v in old.items() if k not in ("ms", "mn", "mt")},
                             payload))
    wait_until(lambda: cluster.dropped()["replay"] - before == 5, what="the replays counted")
    served(c)  # one worker process, one queue: what was queued before this has run
    assert runs.read_text() == "1\n"


def test_replayed_control_command_is_obeyed_once(procs):
    address = start_broker(procs)
    procs.nbq("worker", "--broker", address, "-c", "1")
    with nbq.Client(address) as c:
        c.wait_for_workers(1)
        key = keys.load_key()
        captured = protocol.Signer(key).encode(
            {"k": "ctl", "c": "someone", "cmd": "pool_grow", "args": {"n": 1}, "dest": None, "ci": "x",
             "rq": 1})
        sender = Raw(address, b"tsomeone")
        try:
            for _ in range(3):
                sender.send(captured)
            wait_until(lambda: c.status()["dropped"]["replay"] == 2, what="the replays refused")
            c.wait_for_workers(2)
            assert c.control("ping")  # the grow, handled before the replays, was answered
            assert [w["concurrency"] for w in c.workers()] == [2]
        finally:
            sender.close()


def test_replayed_control_command_on_redis_is_obeyed_once(procs):
    import redis as redis_py
    from nbq.transport.redis.keys import CTL
    url = redis_url()
    procs.nbq("worker", "--broker", url, "-c", "1")
    with nbq.Client(url) as c:
        c.wait_for_workers(1)
        assert list(c.control("pool_grow", {"n": 1}, timeout=5).values()) == [
            {"ok": "pool will grow"}]
        r = redis_py.Redis.from_url(url)
        (_, fields), = r.xrevrange(CTL, count=1)
        for _ in range(3):
            r.xadd(CTL, fields)
        assert c.control("ping", timeout=5)  # read after the replays: they were handled
        wait_until(lambda: c.workers()[0]["concurrency"] == 2, what="the legitimate pool_grow")
        time.sleep(1.5)  # a heartbeat (every second) would show a replayed grow
        assert c.workers()[0]["concurrency"] == 2
        r.close()


# -- item 5: CURVE ------------------------------------------------------------------------

def test_curve_is_on_off_loopback_by_default(monkeypatch):
    monkeypatch.delenv("NBQ_CURVE", raising=False)
    assert secure.needs_curve("tcp://0.0.0.0:5555") and secure.needs_curve("tcp://lab-host:5555")
    assert secure.needs_curve("tcp://10.1.2.3:5555") and secure.needs_curve("tcp://eth0:5555")
    assert not secure.needs_curve("tcp://127.0.0.1:5555")
    assert not secure.needs_curve("tcp://localhost:5555") and not secure.needs_curve("tcp://[::1]:5")
    assert not secure.needs_curve("ipc:///tmp/x")
    monkeypatch.setenv("NBQ_CURVE", "1")
    assert secure.needs_curve("tcp://127.0.0.1:5555")
    monkeypatch.setenv("NBQ_CURVE", "off")
    assert not secure.needs_curve("tcp://0.0.0.0:5555")
    a, b = secure.keypair(b"k" * 32, b"broker"), secure.keypair(b"k" * 32, b"broker")
    assert a == b and a != secure.keypair(b"j" * 32, b"broker") != secure.keypair(b"k" * 32, b"peer")


def test_curve_broker_serves_key_holders_only(procs, monkeypatch):
    address = f"tcp://127.0.0.1:{free_port()}"
    broker = procs.nbq("broker", "--bind", address, "--curve")
    assert "CURVE" in broker.stdout.readline()
    monkeypatch.setenv("NBQ_CURVE", "1")
    procs.nbq("worker", "--broker", address, "-c", "1")
    key = keys.load_key()
    info = protocol.Signer(key).encode({"k": "info", "c": "plain", "rq": 1})
    plain = Raw(address, b"tplain")                      # no CURVE: no handshake
    stranger = Raw(address, b"tstranger", b"x" * 32)     # CURVE, another key
    try:
        with nbq.Client(address) as c:
            c.wait_for_workers(1)
            served(c)
            for raw in (plain, stranger):
                raw.send(info)
            assert plain.received(1.0) == [] and stranger.received(0.5) == []
            served(c)
    finally:
        plain.close()
        stranger.close()


# -- item 6: bounds ------------------------------------------------------------------------

def test_too_large_message_fails_in_the_caller_naming_the_setting(procs):
    address = f"tcp://127.0.0.1:{free_port()}"
    procs.nbq("broker", "--bind", address, "--max-message-size", "1M").stdout.readline()
    procs.nbq("worker", "--broker", address, "-c", "1")
    with nbq.Client(address) as c:
        c.wait_for_workers(1)
        with pytest.raises(MessageTooLarge, match="max_message_size.*--max-message-size"):
            c.submit(len, b"x" * (2 << 20))
        assert c.submit(len, b"x" * (512 << 10)).result(timeout=20) == 512 << 10
        # a result too large fails alone, in the worker, naming the setting
        with pytest.raises(MessageTooLarge, match="max_message_size"):
            c.submit(bytes, 2 << 20).result(timeout=20)
        res = c.map(bytes, [10, 2 << 20, 20], chunksize=3)
        out = dict(res.as_completed(errors="include"))
        assert isinstance(out.pop(1), MessageTooLarge) and out == {0: bytes(10), 2: bytes(20)}
        big = Raw(address, b"tbig")
        try:
            big.send(protocol.Signer(keys.load_key()).encode(
                {"k": "fn", "c": "big", "h": "0" * 32}, [b"x" * (3 << 20)]))
            served(c)
        finally:
            big.close()


def test_delivered_results_are_kept_under_a_byte_budget_oldest_dropped_first(procs):
    address = f"tcp://127.0.0.1:{free_port()}"
    procs.nbq("broker", "--bind", address, "--result-budget", "1M").stdout.readline()
    procs.nbq("worker", "--broker", address, "-c", "1")
    with nbq.Client(address) as c:
        c.wait_for_workers(1)
        futs = [c.submit(bytes, 300 << 10) for _ in range(6)]
        assert [len(f.result(timeout=20)) for f in futs] == [300 << 10] * 6
        assert c.status()["results"] == 3  # 1 MiB holds the last three
        with nbq.Client(address) as other:
            assert len(nbq.AsyncResult(futs[-1].id, other).get(timeout=10)) == 300 << 10
            assert nbq.AsyncResult(futs[0].id, other).state == nbq.PENDING


# -- the fuzzer ----------------------------------------------------------------------------

FUZZ = settings(max_examples=1000, deadline=None, database=None, phases=[Phase.generate],
                suppress_health_check=list(HealthCheck))
KINDS = ["hello", "fn", "tasks", "cancel", "watch", "mapend", "info", "join", "ctl", "bye",
         "hb", "lost", "ctlr", "res", "rej", "ntc", "state", "welcome", "claim", "out", ""]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=4),
    max_leaves=12)
field_names = st.sampled_from(["k", "c", "t", "h", "id", "nf", "n", "q", "pr", "m", "mp", "s0",
                               "ids", "rq", "w", "s", "how", "at", "end", "rdy", "d", "cmd", "a",
                               "sup", "name", "queues", "state", "dest", "args", "ttl",
                               "ci", "key", "member", "total", "maps", "host", "spid", "conc",
                               "pid", "ms", "mn", "mt", "eta", "x", "ex"])
headers = st.dictionaries(field_names, json_values, max_size=8).flatmap(
    lambda d: st.sampled_from(KINDS).map(lambda k: dict(d, k=k)))
identities = st.sampled_from([b"c", b"t", b"s", b"w", b"x", b""]).flatmap(
    lambda p: st.binary(min_size=1, max_size=12).map(lambda b: p + b))


def test_fuzz_keyless_frames_and_headers(cluster):
    """Frame splitting and header JSON: any frames, or any JSON header with a made-up
    signature, from every kind of peer: each dropped, counted, unanswered."""
    socks = {p: cluster.raw(p + b"fuzz") for p in (b"c", b"t", b"s", b"w")}
    before = cluster.dropped()["signature"]
    sent = 0

    @FUZZ
    @given(frames=st.lists(st.binary(max_size=64), min_size=1, max_size=6), header=headers,
           payload=st.lists(st.binary(max_size=32), max_size=3),
           prefix=st.sampled_from(list(socks)), raw_header=st.booleans())
    def case(frames, header, payload, prefix, raw_header):
        nonlocal sent
        socks[prefix].send(frames if raw_header else unsigned(header, payload))
        sent += 1
        served(cluster.client)

    case()
    # the raw peers' messages are not ordered with the client's task: counted when they arrive
    wait_until(lambda: cluster.dropped()["signature"] - before == sent, what="every message counted")
    assert not any(sock.received(0.05) for sock in socks.values())


def _invalid(header: dict, choice: int, junk) -> dict:
    """A copy of a well-formed header with one field made wrong by construction: removed
    (every field is required), or given a value of a type it never has."""
    bad = dict(header)
    name = sorted(k for k in bad if k != "k")[choice % (len(bad) - 1)]
    if choice % 3 == 0:
        del bad[name]
    else:
        bad[name] = junk
    return bad


def _templates(cid: str) -> list[tuple[bytes, dict, list]]:
    """Well-formed messages of every kind the broker accepts (peer kind, header, payload),
    with required fields only, none of which may be null, a float, a negative or huge
    number, a list of nulls or an object."""
    task = {"id": "fz", "h": "0" * 32, "nf": 1}
    return [
        (b"t", {"k": "tasks", "c": cid, "t": [task]}, [b"x"]),
        (b"t", {"k": "fn", "c": cid, "h": "0" * 32}, [b"x"]),
        (b"t", {"k": "cancel", "c": cid, "ids": ["a"], "rq": 1}, []),
        (b"t", {"k": "mapend", "c": cid, "mp": "m", "total": 3}, []),
        (b"t", {"k": "join", "c": cid, "key": "k", "member": "m", "total": 2, "rq": 1}, []),
        (b"t", {"k": "ctl", "c": cid, "cmd": "ping", "ci": "x", "rq": 1}, []),
        (b"t", {"k": "info", "c": cid, "rq": 1}, []),
        (b"t", {"k": "watch", "c": cid, "ids": ["fz"], "rq": 1}, []),
        (b"t", {"k": "bye", "c": cid}, []),
        (b"c", {"k": "hello", "c": cid}, []),
        (b"w", {"k": "hello", "w": "w", "sup": "s", "pid": 1, "host": "h", "spid": 1, "conc": 1,
                "queues": ["default"]}, []),
        (b"s", {"k": "hb", "sup": "s", "host": "h", "spid": 1, "conc": 1, "queues": ["default"]}, []),
        (b"s", {"k": "lost", "sup": "s", "w": "w"}, []),
        (b"s", {"k": "ctlr", "sup": "s", "c": cid, "ci": "x", "name": "name"}, []),
        (b"s", {"k": "bye", "sup": "s"}, []),
        (b"w", {"k": "res", "w": "w", "t": [{"id": "fz", "nf": 1}]}, [b"x"]),
        (b"w", {"k": "rej", "w": "w", "ids": ["fz"]}, []),
        (b"w", {"k": "ntc", "w": "w", "ids": ["fz"], "state": "RETRY"}, []),
        (b"o", {"k": "out", "w": "w", "id": "fz"}, [b"x"]),
    ]


def test_fuzz_signed_malformed_messages_of_every_kind(cluster):
    """Each kind the broker accepts, signed with the right key, with one field missing or
    of a wrong type, or sent by the wrong kind of peer: dropped, counted, unanswered."""
    templates = _templates("fz")
    socks = {p: cluster.raw(p + b"fz") for p in (b"c", b"t", b"s", b"w", b"o")}
    signer = protocol.Signer(cluster.key)
    before = cluster.dropped()["invalid"]
    sent = 0

    @FUZZ
    @given(which=st.integers(0, len(templates) - 1), choice=st.integers(0, 1000),
           wrong_peer=st.booleans(),
           junk=st.one_of(st.none(), st.floats(allow_nan=False), st.integers(-10 ** 6, -1), st.integers(2 ** 60, 2 ** 70),
                          st.lists(st.none(), min_size=1, max_size=3),
                          st.dictionaries(st.just("z"), st.none(), min_size=1)))
    def case(which, choice, wrong_peer, junk):
        nonlocal sent
        prefix, header, payload = templates[which]
        if wrong_peer:  # well formed, from a peer that never sends this kind
            prefix = {b"t": b"w", b"c": b"s", b"s": b"t", b"w": b"c", b"o": b"t"}[prefix]
        else:
            header = _invalid(header, choice, junk)
        socks[prefix].send(signer.encode(header, payload))
        sent += 1
        served(cluster.client)

    case()
    wait_until(lambda: cluster.dropped()["invalid"] - before == sent, what="every message counted")
    assert not any(sock.received(0.05) for sock in socks.values())


def test_fuzz_control_commands_reach_the_worker_and_it_still_serves(cluster):
    """Well-formed control messages with any command and arguments, forwarded to the
    worker's supervisor: answered with an error or ignored, never fatal."""
    sender = cluster.raw(b"tfzctl")
    signer = protocol.Signer(cluster.key)
    obeyed = {"shutdown", "pool_shrink", "pool_grow", "add_consumer", "cancel_consumer"}

    @settings(FUZZ, max_examples=500)
    @given(cmd=st.sampled_from(["ping", "stats", "active", "registered", "scheduled",
                                "reserved", "rate_limit", "revoke", "nope", ""])
           | st.text(max_size=12).filter(lambda c: c not in obeyed),
           args=st.dictionaries(st.sampled_from(["n", "task_id", "terminate", "signal", "queue",
                                                 "task_name", "rate_limit"]), json_values,
                                max_size=4) | json_values,
           dest=st.none() | st.lists(st.sampled_from(["nbq@%h", "x"]), max_size=2))
    def case(cmd, args, dest):
        sender.send(signer.encode({"k": "ctl", "c": "fzctl", "cmd": cmd, "args": args, "dest": dest,
                                   "ci": "fz", "rq": 1}))
        served(cluster.client)

    case()
    assert cluster.client.control("ping", timeout=5)
