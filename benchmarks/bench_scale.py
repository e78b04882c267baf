"""Cost as the system grows: broker memory per queued task, dispatch with many worker
processes (ZeroMQ and Redis), and a new worker's first task behind a deep queue.

    python benchmarks/bench_scale.py [--quick] [--parts memory,map,zmq,redis,first]
    python benchmarks/bench_scale.py --profile memory|dispatch   # tracemalloc / cProfile of the broker

Every broker, worker and redis-server here is started by this script (a private redis-server
from tests/redis_server.py, never the machine's 6379) and stopped by its handle or PID.  The
broker is a separate `nbq broker` process, so its RSS is its own; workers are `nbq worker -c N`
(one supervisor forking N processes, most of them idle in the throughput rows).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[1:1] = [str(ROOT), str(ROOT / "tests")]  # nbq from this checkout; redis_server
os.environ.setdefault("NBQ_KEY", secrets.token_hex(32))  # one key for all, no key file written
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in os.environ.get(
    "PYTHONPATH", "").split(os.pathsep) if p])  # the brokers and workers started run this nbq too
import nbq  # noqa: E402
from nbq import protocol  # noqa: E402
from bench_redis import stop  # noqa: E402  (SIGTERM by handle, SIGKILL after grace)

ROWS: list[tuple[str, str, str]] = []  # (what, figure, note)
STEP = 50_000  # submits between waits for the broker to have queued them all


def inc(x: int) -> int:
    return x + 1


def rss(pid: int) -> int:
    """Resident bytes of a process."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def row(what: str, figure: str, note: str = "") -> None:
    ROWS.append((what, figure, note))
    print(f"  {what}: {figure} {note}", file=sys.stderr, flush=True)


def wait(cond, timeout: float, what: str) -> None:
    """Poll cond() until true; TimeoutError naming what after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached after {timeout:g} s")
        time.sleep(0.05)


# --- processes: started here, stopped by handle and PID ----------------------------------
@contextlib.contextmanager
def zmq_broker():
    """An `nbq broker` on a free port: (address, its Popen)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    proc = subprocess.Popen([sys.executable, "-m", "nbq", "broker", "--bind", address],
                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        proc.stdout.readline()  # it prints its address once bound
        yield address, proc
    finally:
        stop([proc])


@contextlib.contextmanager
def redis_server():
    """A private redis-server (AOF everysec), stopped by its handle."""
    from redis_server import RedisServer
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        server = RedisServer(tmp)
        try:
            yield server
        finally:
            server.stop()


@contextlib.contextmanager
def worker(address: str, n: int, client: "nbq.Client | None" = None):
    """`nbq worker -c n` on address; with client: waits until its n processes joined.
    Stopped by its handle, then any of its processes left, by PID."""
    proc = subprocess.Popen([sys.executable, "-m", "nbq", "worker", "--broker", address, "-c", str(n)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    pids: list[int] = []
    try:
        if client is not None:
            client.wait_for_workers(n, timeout=120)
            pids = [p for w in client.workers() if w["pid"] == proc.pid for p in w["processes"]]
        yield proc
    finally:
        stop([proc])
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def unqueued(broker: subprocess.Popen, client: "nbq.Client"):
    """client, shut down after its broker is stopped: the tasks it queued (a million,
    say) go with the broker instead of being cancelled one by one."""
    try:
        yield client
    finally:
        stop([broker])
        client.shutdown(wait=False)


# --- the parts ---------------------------------------------------------------------------
def queued_memory(n: int) -> None:
    """n single tasks submitted with no worker connected: the broker's RSS growth per task."""
    payload = protocol.frame_size(protocol.dumps(((123456,), {})))
    with zmq_broker() as (address, broker), unqueued(broker, nbq.Client(address)) as client:
        client.submit(inc, 0).cancel()  # the function shipped, the connection warm
        wait(lambda: client.status()["tasks"] == 0, 30, "an empty broker")
        before = rss(broker.pid)
        futures = []
        for start in range(0, n, STEP):  # in steps the broker keeps up with: what stays, not
            futures += [client.submit(inc, i) for i in range(start, min(n, start + STEP))]
            wait(lambda: client.status()["tasks"] >= len(futures), 600, "tasks queued")
        per = (rss(broker.pid) - before) / n  # (the unread messages of a faster burst)
    row(f"broker memory per queued task, {n:,} submits (B)", f"{per:,.0f}",
        f"payload {payload} B: {per - payload:,.0f} B beside it")


def map_memory(n: int) -> None:
    """A map of n items with no worker connected: what the broker holds of it, per item."""
    chunksize = 10_000  # the default for 10,000,000 items
    payload = protocol.frame_size(protocol.dumps(list(range(100_000, 100_000 + chunksize))))
    with zmq_broker() as (address, broker), unqueued(broker, nbq.Client(address)) as client:
        client.submit(inc, 0).cancel()
        wait(lambda: client.status()["tasks"] == 0, 30, "an empty broker")
        before = rss(broker.pid)
        res = client.map(inc, range(n), chunksize=chunksize)
        last = [-1, time.monotonic()]

        def settled() -> bool:  # the client sends at most a window of chunks; wait for them
            tasks = client.status()["tasks"]
            if tasks != last[0]:
                last[:] = [tasks, time.monotonic()]
            return tasks > 0 and time.monotonic() - last[1] > 1.0
        wait(settled, 600, "the map's chunks queued")
        chunks = last[0]
        per = (rss(broker.pid) - before) / (chunks * chunksize)
        res.cancel()
    row(f"broker memory per queued item, {n:,}-item map, chunksize {chunksize:,} (B)",
        f"{per:,.1f}", f"{chunks:,} chunks queued (the client's window); payload "
        f"{payload / chunksize:.1f} B per item")


def throughput(client: "nbq.Client", n: int) -> float:
    """n trivial submits, then all results: tasks/s (best of 2)."""
    best = 0.0
    for _ in range(2):
        t0 = time.perf_counter()
        futures = [client.submit(inc, i) for i in range(n)]
        assert client.gather(futures) == list(range(1, n + 1))
        best = max(best, n / (time.perf_counter() - t0))
    return best


def dispatch_rows(kind: str, address_of, counts: list[int], n: int) -> None:
    """Trivial-task throughput with each count of worker processes connected."""
    rates = {}
    for procs in counts:
        address = address_of()
        with nbq.Client(address) as client, worker(address, procs, client):
            client.gather([client.submit(inc, i) for i in range(4 * procs)])  # warm: functions shipped
            rates[procs] = throughput(client, n)
        note = f"x{rates[procs] / rates[counts[0]]:.2f} of {counts[0]}" if procs != counts[0] else ""
        row(f"{kind}: {n:,} trivial tasks, {procs} worker processes (tasks/s)",
            f"{rates[procs]:,.0f}", note)


def first_task(kind: str, address_of, queued: int) -> None:
    """A new `nbq worker -c 1` started with `queued` tasks waiting: seconds from its start
    to the first result (and with one task waiting, for the worker's own start-up)."""
    times = {}
    for depth in (1, queued):
        address = address_of()
        with nbq.Client(address) as client:
            client.submit(inc, 0).cancel()
            first = threading.Event()
            futures = [client.submit(inc, i) for i in range(depth)]
            for f in futures:
                f.add_done_callback(lambda _: first.set())
            wait(lambda: sum(client.status()["queues"].values()) >= depth, 600, "tasks queued")
            t0 = time.perf_counter()
            with worker(address, 1):
                first.wait(120)
                times[depth] = time.perf_counter() - t0
            client.shutdown(wait=False, cancel_futures=True)
    row(f"{kind}: new worker's first result, {queued:,} queued (s)", f"{times[queued]:.2f}",
        f"with 1 queued: {times[1]:.2f} s (its start-up)")


# --- profiles (--profile): the broker in this process, under tracemalloc or cProfile -------
def profile_memory(n: int) -> None:
    """Top allocations the broker keeps for n queued tasks (tracemalloc, broker frames only)."""
    import tracemalloc

    from nbq.broker import Broker
    broker = Broker(os.environ["NBQ_KEY"].encode(), bind="tcp://127.0.0.1:0")
    thread = threading.Thread(target=broker.run, daemon=True)
    thread.start()
    try:
        with nbq.Client(broker.addresses[0]) as client:
            client.submit(inc, 0).cancel()
            tracemalloc.start(12)
            before = tracemalloc.take_snapshot()
            futures = [client.submit(inc, i) for i in range(n)]
            wait(lambda: client.status()["tasks"] >= n, 600, f"{n:,} tasks queued")
            after = tracemalloc.take_snapshot()
            tracemalloc.stop()
            mine = [tracemalloc.Filter(True, "*/nbq/broker/*", all_frames=True)]
            stats = after.filter_traces(mine).compare_to(before.filter_traces(mine), "lineno")
            total = sum(s.size_diff for s in stats)
            print(f"broker allocations kept for {n:,} queued tasks: {total / n:,.0f} B per task")
            for s in stats[:12]:
                print(f"{s.size_diff / n:8.1f} B/task  {s.traceback[0]}")
            with contextlib.suppress(nbq.NbqError):  # a slow cancel of them all need not wait
                client.shutdown(wait=False, cancel_futures=True)
            del futures
    finally:
        broker.stop()
        thread.join(10)


def profile_dispatch(procs: int, n: int) -> None:
    """cProfile of the broker's loop while n trivial tasks run on procs worker processes."""
    import cProfile
    import pstats

    from nbq.broker import Broker
    broker = Broker(os.environ["NBQ_KEY"].encode(), bind="tcp://127.0.0.1:0")
    prof = cProfile.Profile()
    thread = threading.Thread(target=lambda: prof.runcall(broker.run), daemon=True)
    thread.start()
    address = broker.addresses[0]
    try:
        with nbq.Client(address) as client, worker(address, procs, client):
            client.gather([client.submit(inc, i) for i in range(4 * procs)])
            print(f"{procs} processes: {throughput(client, n):,.0f} tasks/s under cProfile")
    finally:
        broker.stop()
        thread.join(10)
    pstats.Stats(prof).sort_stats("tottime").print_stats(15)


def table() -> str:
    w = [max(len(r[i]) for r in ROWS + [("what", "figure", "note")]) for i in range(3)]
    lines = [f"| {'what'.ljust(w[0])} | {'figure'.rjust(w[1])} | {'note'.ljust(w[2])} |",
             f"|{'-' * (w[0] + 2)}|{'-' * (w[1] + 1)}:|{'-' * (w[2] + 2)}|"]
    lines += [f"| {a.ljust(w[0])} | {b.rjust(w[1])} | {c.ljust(w[2])} |" for a, b, c in ROWS]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller counts, for a smoke run")
    ap.add_argument("--parts", default="memory,map,zmq,redis,first")
    ap.add_argument("--profile", choices=["memory", "dispatch"])
    args = ap.parse_args()
    q = args.quick
    if args.profile == "memory":
        return profile_memory(100_000 if q else 300_000)
    if args.profile == "dispatch":
        return profile_dispatch(64, 20_000)
    parts = args.parts.split(",")
    ntasks = 10_000 if q else 40_000
    with contextlib.ExitStack() as stack:
        zmq_address = stack.enter_context(zmq_broker())[0] if {"zmq", "first"} & set(parts) else None
        server = stack.enter_context(redis_server()) if {"redis", "first"} & set(parts) else None
        if "memory" in parts:
            queued_memory(100_000 if q else 1_000_000)
        if "map" in parts:
            map_memory(10_000_000)
        if "zmq" in parts:
            dispatch_rows("ZeroMQ", lambda: zmq_address, [2, 8, 32, 64], ntasks)
        if "redis" in parts:
            dispatch_rows("Redis", server.url, [2, 8, 64], ntasks)
        if "first" in parts:
            first_task("ZeroMQ", lambda: zmq_address, 10_000 if q else 100_000)
            first_task("Redis", server.url, 10_000 if q else 100_000)
    print(f"\nnbq {nbq.__version__ if hasattr(nbq, '__version__') else ''} from {ROOT}, "
          f"Python {sys.version.split()[0]}, {os.cpu_count()} cores{', --quick' if q else ''}\n")
    print(table())


if __name__ == "__main__":
    main()
