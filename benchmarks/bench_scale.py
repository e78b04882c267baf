"""Cost as the system grows: broker memory per queued task, dispatch with many worker
processes (ZeroMQ and Redis), and a new worker's first task behind a deep queue.

    python benchmarks/bench_scale.py [--quick] [--parts memory,map,zmq,redis,first]
    python benchmarks/bench_scale.py --before DIR [--repeat 2]  # DIR: another checkout, alternately
    python benchmarks/bench_scale.py --profile memory|dispatch   # tracemalloc / cProfile of the broker

Every broker, worker and redis-server here is started by this script (a private redis-server
from tests/redis_server.py, never the machine's 6379) and stopped by its handle or PID.  The
broker is a separate `nbq broker` process, so its RSS is its own; workers are `nbq worker -c N`
(one supervisor forking N processes, most of them idle in the throughput rows).  A throughput
row is the median of RUNS runs of n submits and their results, each after a warm-up.

With --before DIR, each part runs in a child process of this script, once with nbq from DIR
and once with this checkout, alternately (--repeat times, order swapped each time), and the
table shows the median of each side: before and after from one run on a shared machine.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
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
if "--root" in sys.argv:  # a child of --before: nbq (and its tests' helpers) from another checkout
    ROOT = Path(sys.argv[sys.argv.index("--root") + 1]).resolve()
sys.path[1:1] = [str(ROOT), str(ROOT / "tests")]  # nbq from this checkout; redis_server
os.environ.setdefault("NBQ_KEY", secrets.token_hex(32))  # one key for all, no key file written
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in os.environ.get(
    "PYTHONPATH", "").split(os.pathsep) if p])  # the brokers and workers started run this nbq
# too, started in ROOT: `python -m` puts its working directory first on their path
import nbq  # noqa: E402
from nbq import protocol  # noqa: E402
from bench_redis import stop  # noqa: E402  (SIGTERM by handle, SIGKILL after grace)

ROWS: list[tuple[str, float, str, str]] = []  # (what, value, its format, note)
STEP = 50_000  # submits between waits for the broker to have queued them all
RUNS = 3       # runs of each throughput row, the median shown


def inc(x: int) -> int:
    return x + 1


def rss(pid: int) -> int:
    """Resident bytes of a process."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) used so far by these processes and this one: unlike wall
    time, hardly changed by what else runs on a shared machine."""
    tick = os.sysconf("SC_CLK_TCK")
    total = sum(os.times()[:2])
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def row(what: str, value: float, fmt: str, note: str = "") -> None:
    ROWS.append((what, value, fmt, note))
    print(f"  {what}: {value:{fmt}} {note}", file=sys.stderr, flush=True)


def wait(cond, timeout: float, what: str) -> None:
    """Poll cond() until true (a broker too busy to answer yet: not yet); TimeoutError
    naming what after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(nbq.BrokerUnavailable, nbq.BrokerTimeout):
            if cond():
                return
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
    proc = subprocess.Popen([sys.executable, "-m", "nbq", "broker", "--bind", address], cwd=ROOT,
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
    Stopped by its handle, then any of its processes left, by PID.  Its ``pids``
    attribute: the supervisor's and (with client) its processes'."""
    proc = subprocess.Popen([sys.executable, "-m", "nbq", "worker", "--broker", address, "-c", str(n)],
                            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    pids: list[int] = []
    try:
        if client is not None:
            client.wait_for_workers(n, timeout=120)
            pids = [p for w in client.workers() if w["pid"] == proc.pid for p in w["processes"]]
        proc.pids = [proc.pid] + pids
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
    row(f"broker memory per queued task, {n:,} submits (B)", per, ",.0f",
        f"payload {payload} B")


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
        per, ",.1f", f"{chunks:,} chunks queued (the client's window); payload "
        f"{payload / chunksize:.1f} B per item")


def throughput(client: "nbq.Client", n: int, runs: int = RUNS, pids: list[int] = ()) -> tuple:
    """n trivial submits, then all their results: (tasks/s, the median of runs; CPU
    seconds per task of this process and pids, over all runs)."""
    rates = []
    cpu0 = cpu_seconds(pids)
    for _ in range(runs):
        t0 = time.perf_counter()
        futures = [client.submit(inc, i) for i in range(n)]
        assert client.gather(futures) == list(range(1, n + 1))
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates), (cpu_seconds(pids) - cpu0) / (runs * n)


def dispatch_rows(kind: str, address_of, server: int, counts: list[int], n: int) -> None:
    """Trivial-task throughput with each count of worker processes connected, and the CPU
    time per task of the client, the server (pid) and the worker with its processes."""
    rates, cpus = {}, {}
    for procs in counts:
        address = address_of()
        with nbq.Client(address) as client, worker(address, procs, client) as w:
            throughput(client, n, 1)  # warm: functions shipped to every process, costs measured
            rates[procs], cpus[procs] = throughput(client, n, pids=[server] + w.pids)
        row(f"{kind}: {n:,} trivial tasks, {procs} worker processes (tasks/s)", rates[procs], ",.0f")
        row(f"{kind}: CPU per task, all processes, {procs} worker processes (µs)",
            cpus[procs] * 1e6, ",.0f")
    last = counts[-1]
    row(f"{kind}: {last} processes against {counts[0]}, tasks/s (x)",
        rates[last] / rates[counts[0]], ".2f")
    row(f"{kind}: {last} processes against {counts[0]}, CPU per task (x)",
        cpus[last] / cpus[counts[0]], ".2f")


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
    row(f"{kind}: new worker's first result, {queued:,} queued (s)", times[queued], ".2f")
    row(f"{kind}: new worker's first result, 1 queued (its start-up, s)", times[1], ".2f")


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


def profile_dispatch(counts: list[int], n: int) -> None:
    """cProfile of the broker's loop while n trivial tasks run (RUNS times) on each count of
    worker processes, one broker each: where its time goes as processes are added."""
    import cProfile
    import pstats

    from nbq.broker import Broker
    for procs in counts:
        broker = Broker(os.environ["NBQ_KEY"].encode(), bind="tcp://127.0.0.1:0")
        prof = cProfile.Profile()
        thread = threading.Thread(target=lambda: prof.runcall(broker.run), daemon=True)
        thread.start()
        address = broker.addresses[0]
        try:
            with nbq.Client(address) as client, worker(address, procs, client):
                throughput(client, n, 1)
                prof.clear()  # the runs only, not the start-up
                rate = throughput(client, n)[0]
        finally:
            broker.stop()
            thread.join(10)
        print(f"\n{procs} processes: {rate:,.0f} tasks/s under cProfile (broker thread below)")
        pstats.Stats(prof).sort_stats("tottime").print_stats(12)


def table(heads: list[str], rows: list[list[str]]) -> str:
    """A markdown table: the first column left-aligned, the others right, a note last."""
    w = [max(len(r[i]) for r in rows + [heads]) for i in range(len(heads))]
    lines = ["| " + " | ".join(h.ljust(x) for h, x in zip(heads, w)) + " |",
             "|" + "|".join("-" * (x + 2) if i in (0, len(w) - 1) else "-" * (x + 1) + ":"
                            for i, x in enumerate(w)) + "|"]
    lines += ["| " + " | ".join(c.ljust(x) if i in (0, len(w) - 1) else c.rjust(x)
                                for i, (c, x) in enumerate(zip(r, w))) + " |" for r in rows]
    return "\n".join(lines)


def compare(before: Path, parts: list[str], repeat: int, quick: bool) -> None:
    """Each part in children of this script, nbq from before and from ROOT alternately;
    the medians of each side."""
    seen: dict[str, dict[Path, list]] = {}  # what -> tree -> values
    fmts: dict[str, tuple[str, str]] = {}
    for rep in range(repeat):
        for part in parts:
            for tree in (before, ROOT) if rep % 2 == 0 else (ROOT, before):
                print(f"{part}, nbq from {tree}:", file=sys.stderr, flush=True)
                out = subprocess.run([sys.executable, __file__, "--root", str(tree), "--parts", part,
                                      "--json"] + ["--quick"] * quick,
                                     stdout=subprocess.PIPE, text=True).stdout
                if not out.strip():  # it failed (its error above): the others still run
                    continue
                for what, value, fmt, note in json.loads(out.splitlines()[-1]):
                    seen.setdefault(what, {}).setdefault(tree, []).append(value)
                    fmts[what] = (fmt, note)
    rows = []
    for what, by in seen.items():
        fmt, note = fmts[what]
        med = [statistics.median(by[t]) if t in by else None for t in (before, ROOT)]
        rows.append([what] + ["" if m is None else f"{m:{fmt}}" for m in med] + [note])
    print(f"\nbefore: {before}; after: {ROOT}; medians of {repeat} alternating runs each; "
          f"Python {sys.version.split()[0]}, {os.cpu_count()} cores{', --quick' if quick else ''}, "
          f"load average at the end {os.getloadavg()[0]:.1f}\n")
    print(table(["what", "before", "after", "note"], rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller counts, for a smoke run")
    ap.add_argument("--parts", default="memory,map,zmq,redis,first")
    ap.add_argument("--profile", choices=["memory", "dispatch"])
    ap.add_argument("--before", type=Path, help="another checkout of nbq to compare with, alternately")
    ap.add_argument("--repeat", type=int, default=2, help="alternating runs of each side (--before)")
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)  # read at import (a child's tree)
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # a child: rows as JSON
    args = ap.parse_args()
    q = args.quick
    if args.before:
        return compare(args.before.resolve(), args.parts.split(","), args.repeat, q)
    if args.profile == "memory":
        return profile_memory(100_000 if q else 300_000)
    if args.profile == "dispatch":
        return profile_dispatch([2, 64], 5_000 if q else 20_000)
    parts = args.parts.split(",")
    ntasks = 5_000 if q else 20_000
    with contextlib.ExitStack() as stack:
        zmq_address, zmq_proc = (stack.enter_context(zmq_broker()) if {"zmq", "first"} & set(parts)
                                 else (None, None))
        server = stack.enter_context(redis_server()) if {"redis", "first"} & set(parts) else None
        if "memory" in parts:
            queued_memory(100_000 if q else 1_000_000)
        if "map" in parts:
            map_memory(10_000_000)
        if "zmq" in parts:
            dispatch_rows("ZeroMQ", lambda: zmq_address, zmq_proc.pid, [2, 8, 32, 64], ntasks)
        if "redis" in parts:
            dispatch_rows("Redis", server.url, server.proc.pid, [2, 8, 64], ntasks)
        if "first" in parts:
            first_task("ZeroMQ", lambda: zmq_address, 10_000 if q else 100_000)
            first_task("Redis", server.url, 10_000 if q else 100_000)
    if args.json:
        print(json.dumps(ROWS))
        return
    print(f"\nnbq from {ROOT}, Python {sys.version.split()[0]}, {os.cpu_count()} cores"
          f"{', --quick' if q else ''}, load average at the end {os.getloadavg()[0]:.1f}\n")
    print(table(["what", "figure", "note"], [[w, f"{v:{f}}", n] for w, v, f, n in ROWS]))


if __name__ == "__main__":
    main()
