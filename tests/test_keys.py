"""Signing keys: their files, where they travel, and refusing a worker or client whose key
differs from its cluster's, on both transports."""
from __future__ import annotations

import logging
import os
import secrets
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import redis

import nbq
from nbq import keys, protocol
from nbq.transport.redis.frames import entry_fields
from nbq.transport.redis.keys import P

from conftest import free_port, redis_url, standalone_broker, wait_until


def key_file(path: Path, key: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(key)
    path.chmod(mode)
    return path


# -- the key file ------------------------------------------------------------------

@pytest.mark.parametrize("content", [b"", b"  \n\t ", b"short-key\n", b"x" * 31])
def test_a_short_or_blank_key_file_is_refused(tmp_path, content):
    path = key_file(tmp_path / "key", content)
    with pytest.raises(nbq.InvalidKey, match="at least 32 bytes") as e:
        keys.load_key(path)
    assert isinstance(e.value, nbq.NbqError) and isinstance(e.value, ValueError)
    assert str(path) in str(e.value)
    if content.strip():
        assert content.strip().decode() not in str(e.value)


def test_a_short_nbq_key_is_refused(monkeypatch):
    monkeypatch.setenv("NBQ_KEY", "hunter2")
    with pytest.raises(nbq.InvalidKey, match="environment variable NBQ_KEY") as e:
        keys.load_key()
    assert "hunter2" not in str(e.value)


def test_a_short_key_stops_the_command_with_one_line(procs, tmp_path):
    path = key_file(tmp_path / "key", b"\n")
    p = procs.nbq("worker", "--broker", "tcp://127.0.0.1:9", "--key-file", str(path),
                  stderr=subprocess.PIPE)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 1
    assert err.strip().splitlines() == [err.strip()] and "Traceback" not in err, err
    assert f"the key file {path} (--key-file) is empty" in err, err


def test_a_key_file_others_can_read_is_used_with_a_warning(tmp_path, caplog):
    key = secrets.token_hex(32).encode()
    open_file = key_file(tmp_path / "open", key, 0o644)
    private = key_file(tmp_path / "private", key, 0o600)
    with caplog.at_level(logging.WARNING, logger="nbq.keys"):
        assert keys.load_key(private) == key
        assert not caplog.records
        assert keys.load_key(open_file) == key
    (record,) = caplog.records
    assert str(open_file) in record.getMessage() and "chmod 600" in record.getMessage()


def test_a_non_utf8_key_is_bytes(tmp_path, monkeypatch):
    raw = b"\xff\xfe" + secrets.token_bytes(40).replace(b"\0", b"\1") + b"\x80"  # no NUL: see below
    assert keys.load_key(key_file(tmp_path / "key", raw)) == raw
    monkeypatch.setenv("NBQ_KEY", os.fsdecode(raw))  # as the environment holds such bytes
    assert keys.load_key() == raw


RACE = """
import multiprocessing, sys, time
from pathlib import Path
import nbq.keys as keys

def slow_disk(event, args):  # each file opened by its descriptor waits before it is written
    if event == "open" and isinstance(args[0], int):
        time.sleep(0.5)

def load(path, slow, out):
    if slow:
        sys.addaudithook(slow_disk)
    else:  # start while the slow one is creating the key file
        while not path.parent.exists():
            time.sleep(0.001)
        time.sleep(0.1)
    try:
        out.put(keys.load_key(path).hex())
    except Exception as e:
        out.put(f"{type(e).__name__}: {e}")

ctx = multiprocessing.get_context("fork")
n, rounds = int(sys.argv[2]), int(sys.argv[3])
for r in range(rounds):
    path = Path(sys.argv[1]) / f"round{r}" / "key"
    out = ctx.Queue()
    ps = [ctx.Process(target=load, args=(path, i == 0, out)) for i in range(n)]
    for p in ps:
        p.start()
    got = {out.get(timeout=60) for _ in ps}
    for p in ps:
        p.join()
    print(r, *sorted(got), flush=True)
"""


def test_processes_racing_to_create_the_key_file_all_get_the_whole_key(procs, tmp_path):
    """8 processes load the key of a fresh path at once, the first to start creating it on
    a slow disk: all of them get the same whole key, never a partial or empty one."""
    p = procs.start([sys.executable, "-c", RACE, str(tmp_path), "8", "3"], stderr=subprocess.PIPE)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    rounds = [line.split(" ", 1) for line in out.splitlines()]
    assert len(rounds) == 3
    bad = [r for r in rounds if len(r) != 2 or " " in r[1] or len(bytes.fromhex(r[1])) < 32]
    assert not bad, bad
    assert {stat.S_IMODE((tmp_path / f"round{r}" / "key").stat().st_mode) for r in range(3)} == {0o600}
    assert sorted(f.name for f in tmp_path.glob("round*/*")) == ["key"] * 3  # no temporary left


# -- where the key travels ------------------------------------------------------------

def _where_am_i():
    """(whether NBQ_KEY is in this task's environment, the command lines of this worker
    process and of its parent, the supervisor)."""
    def cmdline(pid):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    return "NBQ_KEY" in os.environ, cmdline(os.getpid()), cmdline(os.getppid())


def _submit_from_a_task():
    """A task's own client of its worker's broker: signs with the worker's key."""
    with nbq.Client(os.environ["NBQ_BROKER"]) as client:
        return client.submit(abs, -7).result(timeout=30)


@pytest.mark.parametrize("source", ["NBQ_KEY", "non-UTF-8 key file"])
def test_local_workers_get_the_key_neither_in_environment_nor_on_a_command_line(
        transport, tmp_path, monkeypatch, source):
    """A client's own workers get its key on their stdin; their tasks never see it."""
    monkeypatch.setenv("NBQ_KEY", secrets.token_hex(32))
    key_file_arg = None
    if source != "NBQ_KEY":
        key_file_arg = key_file(tmp_path / "key", b"\xff" + secrets.token_bytes(40) + b"\x80")
    key = keys.load_key(key_file_arg)
    address = None if transport == "zmq" else redis_url()
    with nbq.Client(address, workers=1, key_file=key_file_arg) as client:
        client.wait_for_workers(1)
        in_env, own, parent = client.submit(_where_am_i).result(timeout=30)
    assert not in_env
    assert key not in own and key not in parent
    assert b"nbq\x00worker" in parent  # it is the supervisor's command line


def test_nbq_worker_keeps_nbq_key_from_its_tasks(transport, procs, tmp_path):
    """`nbq worker` with NBQ_KEY: its tasks do not see it, and still send tasks with it."""
    # not UTF-8 (the environment holds such bytes too), no NUL (it cannot)
    raw = b"\xfe" + secrets.token_bytes(40).replace(b"\0", b"\1") + b"\x80"
    path = key_file(tmp_path / "key", raw)
    if transport == "zmq":
        address = f"tcp://127.0.0.1:{free_port()}"
        broker = procs.nbq("broker", "--bind", address, "--key-file", str(path))
        assert "listening" in broker.stdout.readline()
    else:
        address = redis_url()
    env = dict(os.environ, NBQ_KEY=os.fsdecode(raw), PYTHONPATH=str(Path(__file__).parent))
    procs.nbq("worker", "--broker", address, "-c", "2", env=env)
    with nbq.Client(address, key_file=path) as client:
        client.wait_for_workers(1)
        in_env, own, parent = client.submit(_where_am_i).result(timeout=30)
        assert not in_env and raw not in own and raw not in parent
        assert client.submit(_submit_from_a_task).result(timeout=60) == 7


# -- a key that differs from the cluster's ---------------------------------------------

def _refused(procs, address: str, *args: str, env: dict | None = None) -> str:
    """stderr of an `nbq worker` that must stop at once, with one line and code 1."""
    p = procs.nbq("worker", "--broker", address, "-c", "1", *args, stderr=subprocess.PIPE,
                  **({"env": env} if env else {}))
    out, err = p.communicate(timeout=60)
    assert p.returncode == 1, (out, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("nbq worker: error: the signing key from ") and " differs from " in err
    return err


def test_a_worker_or_client_with_another_key_refuses_to_start_and_takes_no_task(
        transport, procs, tmp_path, _key):
    """A wrong-key worker, started while tasks wait, is refused before it takes any (with
    one line saying where its key came from, never a key); a right one then runs them all."""
    address = standalone_broker(transport, procs)
    with nbq.Client(address) as client:  # the first to connect to Redis records its key's fingerprint
        cluster_key = _key.read_bytes()
        futs = [client.submit(abs, -i) for i in range(30)]
        other = secrets.token_hex(32)
        path = key_file(tmp_path / "other-key", other.encode())
        from_file = _refused(procs, address, "--key-file", str(path))
        assert f"from the key file {path} (--key-file) differs" in from_file
        from_env = _refused(procs, address, env=dict(os.environ, NBQ_KEY=other))
        assert "from the environment variable NBQ_KEY differs" in from_env
        for text in (from_file, from_env):
            assert other not in text and cluster_key.decode() not in text
            assert keys.fingerprint(cluster_key) in text  # the cluster's fingerprint, to compare

        with pytest.raises(nbq.KeyMismatch, match=f"from the key file {path} .*differs") as e:
            nbq.Client(address, key_file=path, timeout=60)
        assert isinstance(e.value, nbq.SignatureError) and isinstance(e.value, nbq.NbqError)
        assert other not in str(e.value)
        assert not any(f.done() for f in futs)
        procs.nbq("worker", "--broker", address, "-c", "1")
        assert client.gather(futs, timeout=60) == list(range(30))


def test_a_forged_redis_entry_among_tasks_costs_none_of_them(procs, _key):
    """Keyless and wrong-key entries in the queue's stream between tasks: dropped, logged
    with their entry and stream; every task around them runs."""
    url = redis_url()
    r = redis.Redis.from_url(url)
    with nbq.Client(url) as client:
        futs = [client.submit(abs, -i) for i in range(10)]
        h = client._ship(abs)
        payload = protocol.dumps(((-99,), {}))
        forged = {"k": "tasks", "t": [{"id": "forged-0", "h": h, "nf": 1, "q": "default"}]}
        r.xadd(P + "q:default", {"h": protocol._dumps_json(forged), "s": b"", "0": payload[0]})
        r.xadd(P + "q:default", entry_fields(protocol.Signer(secrets.token_bytes(32)).encode(
            dict(forged, t=[dict(forged["t"][0], id="forged-1")]), payload)))
        futs += [client.submit(abs, -i) for i in range(10, 20)]
        worker = procs.nbq("worker", "--broker", url, "-c", "1", stderr=subprocess.PIPE)
        assert client.gather(futs, timeout=60) == list(range(20))
        wait_until(lambda: r.xlen(P + "q:default") == 0, what="the forged entries to be dropped")
    worker.terminate()
    _, err = worker.communicate(timeout=30)
    dropped = [line for line in err.splitlines() if "dropped entry" in line]
    # both counted; logged with entry and stream (a second drop within 1 s adds to the count
    # that the next line prints instead of a line of its own)
    assert int(r.hget(P + "bad", "signature")) == 2
    assert dropped and all(f"{P}q:default" in line for line in dropped), err


def test_a_redis_worker_stops_when_the_cluster_changes_its_key(procs):
    """The fingerprint is compared at every heartbeat too: a worker whose cluster has moved
    to another key stops, saying so, instead of failing every task it reads."""
    url = redis_url()
    worker = procs.nbq("worker", "--broker", url, "-c", "1", stderr=subprocess.PIPE)
    with nbq.Client(url) as client:
        client.wait_for_workers(1)
        assert client.submit(abs, -1).result(timeout=30) == 1
        redis.Redis.from_url(url).set(P + "keyfp", keys.fingerprint(secrets.token_bytes(32)))
        _, err = worker.communicate(timeout=30)
    assert worker.returncode == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("nbq worker: error: the signing key from ")
    assert "delete nbq:keyfp" in err
