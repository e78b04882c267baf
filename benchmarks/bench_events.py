"""What events cost: W2 (10,000 trivial submits, then every result) with events on and off.

Each run is a fresh Client with 2 local workers: the embedded ZeroMQ broker (events off:
NBQ_EVENTS=0), and Redis (events off: ?events=0 in the URL, the workers get the same).
Runs alternate on/off, so that the machine's load falls on both alike; the table gives the
median of the rounds and the cost (how much slower with events on).

    python benchmarks/bench_events.py [--rounds 5] [--n 10000] [--redis redis://127.0.0.1:6379/15]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # nbq from this checkout
import nbq  # noqa: E402


def inc(x: int) -> int:
    return x + 1


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes have used so far (from /proc)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
        except (OSError, IndexError, ValueError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def w2(address: str | None, events: bool, n: int, extra_pids: list[int]) -> tuple[float, float]:
    """Tasks per second of W2 on a fresh client (workers up and warm before timing), and
    the CPU seconds it took: this process (the client; for zmq the embedded broker's
    thread too), the worker processes and extra_pids (a Redis server)."""
    os.environ["NBQ_EVENTS"] = "1" if events else "0"  # the embedded broker's switch
    if address is not None:
        address += ("&" if "?" in address else "?") + f"events={int(events)}"
    with nbq.Client(address, workers=2) as client:
        client.wait_for_workers(2)
        client.gather([client.submit(inc, i) for i in range(200)])  # warm: functions, costs
        pids = [os.getpid(), *extra_pids]
        for w in client.workers():
            pids += [w["pid"], *w["processes"]]
        t0, c0 = time.perf_counter(), cpu_seconds(pids)
        assert client.gather([client.submit(inc, i) for i in range(n)]) == list(range(1, n + 1))
        return n / (time.perf_counter() - t0), cpu_seconds(pids) - c0


def added_per_task() -> dict[str, float]:
    """Microseconds of CPU the events code adds to one W2 task, timed alone (no noise from
    other processes): what each transport runs per task when events are on."""
    import timeit

    from nbq import events, protocol
    item = {"id": "0123456789abcdef-12345", "h": "0" * 32, "q": "default", "f": 1, "nf": 1,
            "c": "0123456789abcdef"}
    part = {"id": item["id"], "s": 0, "n": 1, "ok": 1, "nf": 1, "d": 0.0001}
    log = events.EventLog(3600, 100_000)
    signer = protocol.Signer(b"k" * 32)

    def zmq_task():  # the client's args repr, the broker's three records
        item["ar"] = events.args_repr((12345,), {})
        t = time.time()
        log.task(t, events.TASK_SENT, item)
        log.task(t, events.EventLog.TAKEN, item, "w/0")
        log.task(time.time(), events.EventLog.RESULT, item, "w/0", (part, 1))

    batch = 64  # tasks per report (W2's batches are of this order)

    def redis_tasks():  # the client's task-sent, the worker's received/started/succeeded
        now = time.time()
        evs = [events.task_event(events.TASK_SENT, now, item, "bench.inc") for _ in range(batch)]
        signer.encode({"k": "ev", "p": events.pack(evs)})
        evs = []
        for _ in range(batch):
            evs.append(events.task_event("taken", now, item, "bench.inc", "w/0"))
            evs += events.result_events(now, item, part, "bench.inc", "w/0")
        signer.encode({"k": "ev", "p": events.pack(evs)})

    n = 20_000  # the best of 5 repeats, as timeit advises: the others met other processes' load
    return {"zmq": min(timeit.repeat(zmq_task, number=n, repeat=5)) / n * 1e6,
            "redis": min(timeit.repeat(redis_tasks, number=n // batch, repeat=5))
            / (n // batch * batch) * 1e6}


def private_redis():
    """A redis-server of this run's own (tests/redis_server.py), or None without one."""
    sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "tests"))
    try:
        import tempfile

        from redis_server import RedisServer
        return RedisServer(tempfile.mkdtemp(prefix="nbq-bench-events-"))
    except Exception as e:  # noqa: BLE001 - no server binary: zmq only
        print(f"(no Redis: {e})", file=sys.stderr)
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--redis", default=None, help="a Redis URL (default: a private server)")
    ap.add_argument("--transports", default="zmq,redis")
    args = ap.parse_args()
    server = None
    redis_pids: list[int] = []  # a private Redis server's CPU counts too
    systems: dict[str, str | None] = {}
    if "zmq" in args.transports:
        systems["zmq"] = None
    if "redis" in args.transports:
        if args.redis is None:
            server = private_redis()
        if args.redis or server:
            systems["redis"] = args.redis or server.url()
        if server is not None:
            redis_pids.append(server.proc.pid)
    try:
        rows = []
        for name, address in systems.items():
            runs: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
            for i in range(args.rounds):
                for events in ((True, False) if i % 2 == 0 else (False, True)):
                    runs[events].append(w2(address, events, args.n, redis_pids))
            on, off = (statistics.median(r[0] for r in runs[e]) for e in (True, False))
            cpu_on, cpu_off = (statistics.median(r[1] for r in runs[e]) for e in (True, False))
            rows.append((name, off, on, (off - on) / off * 100, cpu_off, cpu_on,
                         (cpu_on - cpu_off) / cpu_off * 100))
    finally:
        if server is not None:
            server.stop()
    print(f"W2: {args.n:,} trivial submits then every result, 2 local workers, median of "
          f"{args.rounds} alternating rounds (machine shared with other work)\n")
    print("| transport | off (tasks/s) | on (tasks/s) | wall cost | CPU off (s) | CPU on (s) "
          "| CPU cost |")
    print("|-----------|--------------:|-------------:|----------:|------------:|-----------:"
          "|---------:|")
    for name, off, on, cost, cpu_off, cpu_on, cpu_cost in rows:
        print(f"| {name:<9} | {off:>13,.0f} | {on:>12,.0f} | {cost:>8.1f}% | {cpu_off:>11.2f} "
              f"| {cpu_on:>10.2f} | {cpu_cost:>7.1f}% |")
    added = added_per_task()
    print("\nAdded by events per task, timed alone: " + ", ".join(
        f"{name} {us:.1f} us ({us / (cpu_off / args.n * 1e6) * 100:.1f}% of its W2 CPU per task)"
        for name, off, on, cost, cpu_off, cpu_on, cpu_cost in rows
        for us in [added[name]]))
    print("\nCPU: every process of the run (client and embedded broker, the worker processes, "
          "a private Redis server), during the timed part: less noisy than wall time here.")


if __name__ == "__main__":
    main()
