"""Broker memory per queued task: RSS of an `nbq broker` before and after N unread tasks.

    python benchmarks/bench_broker_memory.py [--tasks 100000]

No worker is connected, so every task stays queued; the client submits them as
fast as it can (batched messages, as a notebook loop of submits is).
"""
from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # nbq from this checkout
import nbq  # noqa: E402
from nbq import protocol  # noqa: E402


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def inc(x: int) -> int:
    return x + 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=100_000)
    n = ap.parse_args().tasks
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    broker = subprocess.Popen([sys.executable, "-m", "nbq", "broker", "--bind", address],
                              stdout=subprocess.PIPE, text=True)
    try:
        broker.stdout.readline()
        with nbq.Client(address) as client:
            client.submit(inc, 0).cancel()
            time.sleep(0.5)
            before = rss(broker.pid)
            futures = [client.submit(inc, i) for i in range(n)]
            deadline = time.monotonic() + 300
            while client.status()["tasks"] < n and time.monotonic() < deadline:
                time.sleep(0.2)
            after = rss(broker.pid)
            payload = protocol.frame_size(protocol.dumps(((12345,), {})))
            per = (after - before) / n
            print(f"| queued tasks | broker RSS growth | per task | payload per task |\n"
                  f"|---:|---:|---:|---:|\n"
                  f"| {n:,} | {(after - before) / 2**20:.1f} MiB | {per:.0f} B | {payload} B |")
            client.shutdown(wait=False, cancel_futures=True)
            del futures
    finally:
        broker.terminate()
        broker.wait(10)


if __name__ == "__main__":
    main()
