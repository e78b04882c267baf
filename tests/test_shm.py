"""Large frames through shared memory (nbq/shm.py): verified before use, freed when done,
never handed to a process of another locality."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import nbq
from nbq import protocol, shm
from nbq.errors import SignatureError

from conftest import start_broker, wait_until

pytestmark = pytest.mark.skipif(shm.locality() is None, reason="no /dev/shm here")
BIG = shm.SHARE_MIN * 2


def segments(pid: int) -> list[str]:
    """The segments of the brokers of process pid (names carry their broker's pid)."""
    return [n for n in os.listdir(shm.DIR) if n.startswith(f"nbq-{shm.locality()}-{pid}-")]


def total(a) -> float:
    return float(a.sum())


def make(n: int):
    return np.ones(n // 8)


def fail_with(a):
    raise ValueError(f"refused {a.nbytes}")


def test_a_tampered_descriptor_or_segment_is_refused_before_unpickling(monkeypatch):
    signer = protocol.Signer(b"k" * 32)
    frames = shm.export(protocol.dumps(np.arange(BIG // 8, dtype=np.float64)),
                        shm.prefix("a" * 12))
    name = shm.Held(frames[1]).name
    try:
        msg = signer.encode({"k": "res"}, frames)
        loaded = []
        monkeypatch.setattr(protocol.pickle, "loads", lambda *a, **k: loaded.append(a))
        other = frames[1].replace(name[-4:].encode(), b"0000")
        with pytest.raises(SignatureError):  # another name: the signature covers the descriptor
            signer.decode([msg[0], msg[1], msg[2], other])
        assert not loaded
        # a segment that is not a private file of this user, or of another size, is refused
        path = os.path.join(shm.DIR, name)
        os.chmod(path, 0o644)
        with pytest.raises(shm.SharedMemoryGone, match="refused"):
            shm.Held(frames[1])
        os.chmod(path, 0o400)
        with pytest.raises(shm.SharedMemoryGone, match="refused"):
            shm.Held(frames[1].replace(b":%d" % BIG, b":%d" % (BIG - 8)))
        for bad in (b"nbq-shm:../../etc/passwd:10", b"nbq-shm:" + name.encode()[:-1] + b":10",
                    b"nbq-shm:nbq-000000000000-1-" + b"0" * 12 + b"-" + b"0" * 32 + b":10"):
            with pytest.raises(shm.SharedMemoryGone):
                shm.Held(bad)
    finally:
        os.unlink(os.path.join(shm.DIR, name))
    with pytest.raises(shm.SharedMemoryGone, match="gone"):
        shm.Held(frames[1])


def test_segments_are_freed_on_success_failure_and_cancel():
    with nbq.Client(workers=1) as c:
        c.wait_for_workers(1)
        a = np.ones(BIG // 8)
        assert c.submit(total, a).result(timeout=30) == a.size
        out = c.submit(make, BIG).result(timeout=30)
        assert out.nbytes == BIG and out.flags.writeable  # mapped copy-on-write
        out[0] = 5  # written here only
        with pytest.raises(ValueError, match=f"refused {BIG}"):
            c.submit(fail_with, a).result(timeout=30)
        wait_until(lambda: not segments(os.getpid()), what="segments of finished tasks to go")
        blocker = c.submit(time.sleep, 30)
        wait_until(lambda: blocker.state == nbq.STARTED, what="the blocker to start")
        queued = c.submit(total, a)
        wait_until(lambda: segments(os.getpid()), what="the queued task's segment")
        assert queued.cancel()
        wait_until(lambda: not segments(os.getpid()), what="the cancelled task's segment to go")
        c.shutdown(wait=False, cancel_futures=True)
    assert not segments(os.getpid())


def test_segments_of_a_killed_client_are_swept(tmp_path):
    script = textwrap.dedent(f"""
        import time, numpy as np, nbq
        c = nbq.Client(workers=1)
        c.wait_for_workers(1)
        c.submit(time.sleep, 60)
        c.submit(len, np.ones({BIG // 8}))
        print("submitted", flush=True)
        time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        assert p.stdout.readline().strip() == "submitted"
        wait_until(lambda: segments(p.pid), what="the killed client's segment")
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    assert segments(p.pid)  # nothing ran at its death: the next broker of this host sweeps
    with nbq.Client(workers=1):
        pass
    assert not segments(p.pid)


def test_a_worker_of_another_locality_gets_bytes_and_a_local_one_names(procs):
    address = start_broker(procs)
    env = dict(os.environ, NBQ_SHM="0",  # looks like another host: no locality
               PYTHONPATH=os.path.dirname(os.path.abspath(__file__)))
    procs.nbq("worker", "--broker", address, "-c", "1", "-Q", "far", env=env)
    procs.nbq("worker", "--broker", address, "-c", "1", "-Q", "near")
    with nbq.Client(address) as c:
        c.wait_for_workers(2)
        a = np.ones(BIG // 8)
        # a descriptor would fail on the far worker (it refuses names of other localities)
        assert c.submit(total, a, queue="far").result(timeout=30) == a.size
        assert c.submit(make, BIG, queue="far").result(timeout=30).nbytes == BIG
        assert c.submit(total, a, queue="near").result(timeout=30) == a.size
        assert c.submit(make, BIG, queue="near").result(timeout=30).nbytes == BIG
