"""Keyless attacks at the Redis-key boundary: raw redis-py XADD/SET against the private
redis-server, real `nbq worker` processes, and a legitimate task served after each attack.

The attacker can write any key but has no signing key.  Every test here failed on the code
before these fixes (the before/after is in each docstring).
"""
from __future__ import annotations

import time

import pytest
import redis

import nbq
from nbq import protocol
from nbq.errors import FunctionRefused, MessageTooLarge
from nbq.transport.redis.frames import SPILLED, entry_fields, pack
from nbq.transport.redis.keys import P
from conftest import redis_server, redis_url, wait_until

FORGER = protocol.Signer(b"not the key, but 32 bytes long!!")


def _workers(procs, url, n=1, queues="default"):
    return [procs.nbq("worker", "--broker", url, "-c", "1", "-Q", queues) for _ in range(n)]


def _pids(client) -> set[int]:
    return {p for w in client.workers() for p in w["processes"]}


def _served(client, n=20) -> None:
    """A legitimate task (and a map) still served, correctly."""
    assert client.submit(pow, 2, 10).result(timeout=20) == 1024
    assert client.map(abs, range(-n, 0)).result(timeout=20) == list(range(n, 0, -1))


def _spilled(key: bytes, size: int) -> bytes:
    """A packed frame reference claiming size bytes stored under key."""
    return (SPILLED | size).to_bytes(8, "little") + len(key).to_bytes(8, "little") + key


def _dropped(client) -> dict:
    return client.status().get("dropped", {})


@pytest.fixture
def cluster(procs):
    """A client and one worker (one process) on a fresh database of the private Redis."""
    url = redis_url()
    _workers(procs, url)
    with nbq.Client(url) as client:
        client.wait_for_workers(1)
        _served(client)
        yield client, redis.Redis.from_url(url), url


def test_unparsable_entry_is_dropped_and_no_worker_dies(cluster):
    """Before: IndexError outside the narrow except killed the worker process, then its
    supervisor (re-queueing it), and every new worker died on it again.  After: dropped,
    counted, logged; the same processes serve on."""
    client, r, _ = cluster
    pids = _pids(client)
    poison = [{"h": b"{}", "s": b"", "0": b"", "b": b"0"},  # the entry
              {"h": b"\xff", "s": b"x", "b": b"\xff"},
              {"x": b"y"}, {"h": b"[]", "s": b"", "0": b"\x01"},
              {"h": b'{"k":"tasks","t":[{"id":"x","q":"default"}]}', "s": b"", "3": b"z"}]
    for fields in poison:
        r.xadd(P + "q:default", fields)
    _served(client)
    wait_until(lambda: r.xlen(P + "q:default") == 0, what="the poison to be deleted")
    assert _pids(client) == pids
    assert sum(_dropped(client).values()) == len(poison)


def test_spilled_frame_claiming_huge_size_allocates_nothing(cluster):
    """Before: a 40-byte field claiming 2**62 bytes raised MemoryError after a 500 MB
    allocation.  After: sizes are checked (max_message_size, STRLEN) before any allocation."""
    client, r, _ = cluster
    pids = _pids(client)
    r.set(P + "b:real", b"x" * 100)
    h = b'{"k":"tasks","t":[{"id":"big","q":"default","nf":1}]}'
    for ref in [_spilled(P.encode() + b"b:gone", 1 << 62),
                _spilled(P.encode() + b"b:real", 1 << 29),   # under the limit, not STRLEN
                _spilled(P.encode() + b"b:real", 101),
                _spilled(P.encode() + b"q:default", 10),    # not a frame's key: never read
                _spilled(P.encode() + b"b:real", 100)[:-3]]:  # truncated
        r.xadd(P + "q:default", {"h": h, "s": b"0" * 32, "0": ref, "b": b"0"})
    _served(client)
    wait_until(lambda: r.xlen(P + "q:default") == 0, what="the entries to be deleted")
    assert _pids(client) == pids
    assert _dropped(client).get("size") == 1


def test_bad_messages_on_a_clients_result_stream_leave_it_receiving(cluster):
    """Before: the same entries on nbq:rs:{client} killed the client's receiver thread, and
    every later submit timed out.  After: dropped (counted in the client's store), results go on.

    White-box of nbq/transport/redis/store.py: the count is the client store's own (a
    client's drops are logged, not stored in Redis for status)."""
    client, r, _ = cluster
    rs = P + "rs:" + client.id
    for m in [_spilled(P.encode() + b"b:x", 1 << 62), b"\x01", b"", pack([b"{}"]),
              pack(FORGER.encode({"k": "res", "t": [{"id": "x", "ok": 1, "nf": 0}]}))]:
        r.xadd(rs, {"m": m})
    r.xadd(rs, {"no m": b"1"})
    _served(client)  # the receiver thread lives: results still arrive
    assert sum(client._conn.store.dropped.values()) == 5


def test_entry_copied_into_another_queue_or_replayed_runs_once(procs, tmp_path):
    """Before: a task's entry copied into another queue's stream ran twice and its result was
    accepted.  After: a worker refuses an entry whose signed queue is not its stream's, and
    START refuses an entry of a task that is done or started by another entry."""
    url = redis_url()
    r = redis.Redis.from_url(url)
    ran = tmp_path / "ran"

    def note(x):
        with open(ran, "a") as f:
            f.write(f"{x}\n")
        time.sleep(0.5)
        return x

    _workers(procs, url)  # queue default only
    with nbq.Client(url) as client:
        client.wait_for_workers(1)
        fut = client.submit(note, 1, queue="a")
        wait_until(lambda: r.xlen(P + "q:a") == 1, what="the task's entry")
        (eid, fields), = r.xrange(P + "q:a")
        r.xadd(P + "q:default", fields)  # copied into another queue's stream
        _served(client)
        wait_until(lambda: _dropped(client).get("replay") == 1, what="the copy to be refused")
        assert not ran.exists() and r.xlen(P + "q:default") == 0
        _workers(procs, url, queues="a")
        client.wait_for_workers(2)
        wait_until(ran.exists, what="the task to start")
        r.xadd(P + "q:a", fields)  # replayed while it runs
        assert fut.result(timeout=20) == 1
        r.xadd(P + "q:a", fields)  # replayed once it is done
        wait_until(lambda: r.xlen(P + "q:a") == 0, what="the replays to be refused")
        assert _dropped(client).get("replay") == 3
        assert client.submit(note, 2, queue="a").result(timeout=20) == 2
    assert ran.read_text().split() == ["1", "2"]


def test_forged_entry_naming_a_real_task_leaves_it_to_run(procs):
    """A forged entry (wrong key) naming a queued task's id, read first (a more urgent lane):
    dropped, and the started mark it set is removed, so the task's own entry still runs and can
    still be cancelled before that.  No failure is stored for the id: unverified bytes create
    no state (a forger can fail no one's task)."""
    url = redis_url()
    r = redis.Redis.from_url(url)
    with nbq.Client(url) as client:
        fut = client.submit(pow, 3, 4, queue="a")
        wait_until(lambda: r.xlen(P + "q:a") == 1, what="the task's entry")
        payload = protocol.dumps(((), {}))
        for pr in (9, 8):
            forged = FORGER.encode({"k": "tasks", "t": [{"id": fut.id, "q": "a", "pr": pr,
                                                         "h": "0" * 32, "nf": 1}]}, payload)
            key = f"{P}q:a:p{pr}"
            r.xgroup_create(key, "nbq", id="0", mkstream=True)
            r.sadd(P + "qp:a", str(pr))
            r.xadd(key, entry_fields(forged))
        _workers(procs, url, queues="a")
        assert fut.result(timeout=20) == 81
        assert _dropped(client).get("signature") == 2
        assert r.llen(P + "r:" + fut.id) == 1  # its own result only


def test_function_swap_is_refused_and_the_function_shipped_again(cluster):
    """Before: pow's signed blob stored under max's key made max(3, 5) return 243.  After:
    refused (kind, signed hash, payload hash) with FunctionRefused; the client ships max again
    and the next call is right."""
    client, r, _ = cluster
    pids = _pids(client)
    h_pow, h_max = client._ship(pow), client._ship(max)  # pow ran in the fixture; max not yet
    # the client's sender thread stores max: swapped after that write, not before it
    wait_until(lambda: r.exists(P + "fn:" + h_max), what="max stored")
    r.set(P + "fn:" + h_max, r.get(P + "fn:" + h_pow))
    with pytest.raises(FunctionRefused, match="refused"):
        client.submit(max, 3, 5).result(timeout=10)
    assert client.submit(max, 3, 5).result(timeout=10) == 5  # shipped again
    assert _pids(client) == pids


def test_forged_blob_stored_first_under_a_functions_key_is_replaced(cluster):
    """Before: a forged blob SET first under a function's key made every call of it fail for
    a day (SET NX never replaced it).  After: the client's SET replaces it."""
    client, r, _ = cluster

    def triple(x):
        return 3 * x
    payload = protocol.dumps(triple)
    h = protocol.function_hash(b"".join(bytes(memoryview(f)) for f in payload))
    r.set(P + "fn:" + h, pack(FORGER.encode({"k": "fn", "h": h}, payload)))
    assert client.submit(triple, 7).result(timeout=10) == 21
    assert client.map(triple, range(5)).result(timeout=10) == [0, 3, 6, 9, 12]


def test_max_message_size_is_a_clear_error_in_the_caller(procs):
    url = redis_url(max_message_size=100_000)
    _workers(procs, url)
    with nbq.Client(url) as client:
        client.wait_for_workers(1)
        with pytest.raises(MessageTooLarge, match=r"max_message_size \(100,000 bytes\)"):
            client.submit(len, b"x" * 200_000)
        assert client.submit(len, b"x" * 50_000).result(timeout=10) == 50_000
        with pytest.raises(MessageTooLarge, match="max_message_size"):  # a result: at the worker
            client.submit(bytes, 200_000).result(timeout=10)
        got = dict(client.map(bytes, [10, 200_000]).as_completed(errors="include", timeout=10))
        assert got[0] == bytes(10) and type(got[1]) is MessageTooLarge  # its chunk item alone


@pytest.mark.parametrize("scheme", ["unix", "redis+unix"])
def test_unix_socket_addresses_work(procs, scheme):
    """Before: the path lost its // (unix:/path) and redis+unix:// was refused."""
    server = redis_server()
    path = server.unix_socket
    db = server.url().rsplit("/", 1)[1]  # a fresh database
    url = f"{scheme}://{path}?db={db}"
    _workers(procs, url)
    with nbq.Client(url, result_expires=600) as client:  # the address rewritten: its path kept
        client.wait_for_workers(1)
        _served(client)


# -- the fuzzer: every decoder Redis reaches, each case ending with a task served ----------

from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ = settings(deadline=None, database=None,
                suppress_health_check=list(HealthCheck))

_ids = st.sampled_from(["x", "", "0", "a" * 300]) | st.text(max_size=8)
_json = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats()
                     | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=3), inner, max_size=3), max_leaves=8)
_item = st.fixed_dictionaries({}, optional={
    "id": _ids, "q": st.sampled_from(["default", "a"]) | _json, "pr": st.integers(-1, 10) | _json,
    "h": st.text(max_size=4), "nf": st.integers(-1, 4), "m": st.sampled_from(["call", "map", "star"]),
    "n": st.integers(-1, 3) | st.just(2 ** 40), "s0": st.integers(-1, 3)})
_header = st.fixed_dictionaries({"k": st.sampled_from(["tasks", "res", "fn", "ctl", "x"])},
                                optional={"t": st.lists(_item, max_size=2) | _json,
                                          "ids": st.lists(_ids, max_size=2), "cmd": _json})
_headers = st.builds(lambda h: protocol._dumps_json(h), _header) | st.binary(max_size=40)
_keys = st.sampled_from([b"nbq:b:real", b"nbq:b:gone", b"nbq:q:default", b"other", b""])
_sizes = st.sampled_from([0, 1, 99, 100, 101, 2 ** 29, 2 ** 62, 2 ** 63 - 1]) | st.integers(0, 200)
_refs = st.builds(_spilled, _keys, _sizes)
_frames = st.lists(st.binary(max_size=30) | _refs, max_size=3)
_packed = (st.builds(lambda fs: pack([f if isinstance(f, bytes) else b"" for f in fs]), _frames)
           | st.builds(lambda h, fs: pack([h, b"s" * 32, *fs]), _headers, st.lists(st.binary(max_size=30), max_size=2))
           | st.builds(lambda h: pack(FORGER.encode(h, [b"x"])), _header)
           | _refs | st.binary(max_size=60))
_names = st.sampled_from([b"h", b"s", b"b", b"0", b"1", b"2"]) | st.binary(min_size=1, max_size=3)
_values = _headers | st.binary(max_size=40) | _refs | st.sampled_from([b"0", b"0,1", b"1", b"\xff"])
_fields = (st.dictionaries(_names, _values, min_size=1, max_size=6)
           | st.builds(lambda h: entry_fields(FORGER.encode(h, [b"x"])), _header)
           | st.builds(lambda h, ref: {"h": h, "s": b"0" * 32, "0": ref, "b": b"0"}, _headers, _refs))


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    """One worker (two processes) and a client on a fresh database, for the fuzzer's cases."""
    from conftest import Processes
    procs = Processes(tmp_path_factory.mktemp("fuzz"))
    url = redis_url()
    try:
        procs.nbq("worker", "--broker", url, "-c", "2")
        with nbq.Client(url) as client:
            client.wait_for_workers(2)
            r = redis.Redis.from_url(url)
            r.set(P + "b:real", b"x" * 100)
            _served(client)
            pids = _pids(client)
            yield client, r
            _served(client)  # the client's receiver thread still delivers results
            assert _pids(client) == pids  # no process died on any case
    finally:
        procs.stop_all()


def _one(client) -> None:
    assert client.submit(abs, -7).result(timeout=20) == 7


def test_fuzz_queue_entries(fuzzed):
    client, r = fuzzed

    @settings(FUZZ, max_examples=600)
    @given(fields=_fields, queue=st.sampled_from(["default", "default:p5", "default:p5r"]))
    @example(fields={"h": b"{}", "s": b"", "0": b"", "b": b"0"}, queue="default")
    @example(fields={"h": b"{}", "s": b"", "0": _spilled(b"nbq:b:gone", 2 ** 62), "b": b"0"},
             queue="default")
    def case(fields, queue):
        if queue != "default":
            r.xgroup_create(P + "q:" + queue, "nbq", id="0", mkstream=True) if not r.exists(
                P + "q:" + queue) else None
            r.sadd(P + "qp:default", queue.rsplit(":p", 1)[1])
        r.xadd(P + "q:" + queue, fields)
        _one(client)

    case()
    wait_until(lambda: sum(r.xlen(k) for k in r.keys(P + "q:default*")) == 0, timeout=30,
               what="every fuzzed entry to be dropped")


def test_fuzz_result_stream_entries(fuzzed):
    client, r = fuzzed

    @settings(FUZZ, max_examples=600)
    @given(fields=st.dictionaries(st.sampled_from([b"m", b"x"]), _packed, min_size=1, max_size=2))
    @example(fields={b"m": _spilled(b"nbq:b:gone", 2 ** 62)})
    def case(fields):
        r.xadd(P + "rs:" + client.id, fields)
        _one(client)

    case()


def test_fuzz_stored_apart_frames(fuzzed):
    client, r = fuzzed

    @settings(FUZZ, max_examples=400)
    @given(stored=st.binary(max_size=200), claim=_sizes, where=st.sampled_from(["q", "rs"]))
    def case(stored, claim, where):
        r.set(P + "b:fuzz", stored)
        ref = _spilled(P.encode() + b"b:fuzz", claim)
        if where == "q":
            h = b'{"k":"tasks","t":[{"id":"f","q":"default","nf":1}]}'
            r.xadd(P + "q:default", {"h": h, "s": b"0" * 32, "0": ref, "b": b"0"})
        else:
            r.xadd(P + "rs:" + client.id, {"m": pack([b'{"k":"res","t":[]}', b"0" * 32]) + ref})
        _one(client)

    case()


def test_fuzz_function_blobs(fuzzed):
    """A fresh function per case (a new hash: not cached by the workers), its stored blob
    replaced by fuzz: refused (FunctionRefused) or, by chance, still right; then shipped again
    and served."""
    client, r = fuzzed
    n = iter(range(10 ** 6))
    pow_blob = r.get(P + "fn:" + client._ship(pow))

    @settings(FUZZ, max_examples=200)
    @given(blob=_packed | st.just(pow_blob))
    def case(blob):
        k = next(n)
        fn = eval(f"lambda x: x + {k}")  # noqa: S307 - a distinct function per case
        r.set(P + "fn:" + client._ship(fn), blob)
        try:
            assert client.submit(fn, 1).result(timeout=20) == 1 + k
        except FunctionRefused:
            assert client.submit(fn, 1).result(timeout=20) == 1 + k

    case()


def test_fuzz_control_entries(fuzzed):
    client, r = fuzzed

    @settings(FUZZ, max_examples=400)
    @given(fields=st.dictionaries(st.sampled_from([b"m", b"x"]), _packed, min_size=1, max_size=2))
    def case(fields):
        r.xadd(P + "ctl", fields)
        _one(client)

    case()
    assert len(client.control("ping", timeout=10)) == 1  # the supervisor still answers


def test_delivered_large_results_are_kept_within_result_budget(procs):
    """Before: a large result stayed in Redis for result_expires (a day) after its owner had
    it.  After: once read, results with frames stored apart are kept for by-id lookups within
    ?result_budget=, oldest evicted first."""
    import numpy as np
    url = redis_url(result_budget=5 << 20)
    _workers(procs, url)
    r = redis.Redis.from_url(url.split("?")[0])
    with nbq.Client(url) as client:
        client.wait_for_workers(1)
        futs = []
        for i in range(4):  # 2 MB each: the budget holds two
            futs.append(client.submit(np.full, 1 << 18, float(i)))
            assert futs[-1].result(timeout=30)[0] == i
        wait_until(lambda: len(r.keys(P + "b:*")) == 2, what="the oldest results to be evicted")
        assert int(r.get(P + "kept:bytes")) == 2 * (2 << 20)
        assert not r.exists(P + "r:" + futs[0].id) and r.exists(P + "r:" + futs[3].id)
        with nbq.Client(url) as other:  # the kept ones are still found by id
            assert nbq.AsyncResult(futs[3].id, client=other).get(timeout=10)[0] == 3


def test_a_clients_own_dropped_entry_fails_its_task_a_forged_one_changes_nothing(procs):
    """Before: a dropped entry left its client waiting for ever.  After: a worker that drops
    an entry tells the client its header names; the client fails the task (SignatureError)
    only if the entry is the one it added for it.  A forged entry naming another of its tasks
    is dropped too, and that task still runs."""
    import numpy as np
    from nbq.transport.redis.frames import unpack
    url = redis_url()
    r = redis.Redis.from_url(url)
    with nbq.Client(url) as client:
        fut = client.submit(np.sum, np.zeros(1 << 18), queue="a")  # 2 MB: stored apart
        other = client.submit(np.sum, np.ones(1 << 18), queue="a")
        wait_until(lambda: r.xlen(P + "q:a") == 2, what="the tasks' entries")
        (_, fields), _ = r.xrange(P + "q:a")
        spilled = fields[b"b"].decode().split(",")
        for i in spilled:  # fut's large frame gone: its entry can never verify
            r.delete(unpack(fields[i.encode()])[0].key)
        forged = FORGER.encode({"k": "tasks", "t": [{"id": other.id, "c": client.id, "q": "a",
                                                     "pr": 9, "h": "0" * 32, "nf": 1}]}, [b"x"])
        r.xgroup_create(P + "q:a:p9", "nbq", id="0", mkstream=True)
        r.sadd(P + "qp:a", "9")
        r.xadd(P + "q:a:p9", entry_fields(forged))
        _workers(procs, url, queues="a")
        with pytest.raises(nbq.SignatureError, match="dropped by a worker"):
            fut.result(timeout=20)
        assert other.result(timeout=20) == 1 << 18
        assert _dropped(client) == {"invalid": 1, "signature": 1}
