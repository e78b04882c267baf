"""A worker process's share of a round trip, alone: its CPU µs per trivial task over ZeroMQ.

This process plays the broker (a ROUTER socket, signing as the broker does) and forks one
worker process running the real loop (process.serve on a ZmqWorker); it sends N one-task
messages one after another, each after the last one's result came back (W1's pattern), and
prints the round trip and the worker's CPU time per task (from /proc: utime + stime).

    python benchmarks/profile_worker.py [-n 20000] [--profile out.prof]

NBQ_BENCH_CHECKOUT=/path/to/another/checkout measures that checkout's nbq (before/after).
``--floor``: the worker only waits, receives and sends a result (signed), for the floor of
a worker process on ZeroMQ.  ``--profile``: the worker runs under cProfile and writes its stats there (then
``python -m pstats out.prof``); its timings are then cProfile's, not the loop's.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

CHECKOUT = Path(os.environ.get("NBQ_BENCH_CHECKOUT") or Path(__file__).resolve().parents[1])
sys.path.insert(1, str(CHECKOUT))  # nbq from this checkout (or NBQ_BENCH_CHECKOUT's)

import zmq  # noqa: E402

from nbq import protocol  # noqa: E402


def inc(x: int) -> int:
    return x + 1


def _cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) each thread of a process has used, by name, from /proc."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            name, rest = f.read().split("(", 1)[1].rsplit(")", 1)
        fields = rest.split()
        name = "main" if tid == str(pid) else name
        out[name] = out.get(name, 0) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def _floor(address: str, key: bytes) -> None:
    """The least a ZeroMQ worker process could do: wait, receive, answer a result made once."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(address)
    signer = protocol.Signer(key)
    sock.send_multipart(signer.encode({"k": "hello"}))
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    while True:
        poller.poll()
        header = protocol.loads_header(sock.recv_multipart(copy=False)[0])
        if header["k"] == "tasks":
            i = int(header["t"][0]["id"][2:])
            sock.send_multipart(signer.encode({"k": "res"}, protocol.dumps(i + 1)), copy=False)


def _worker(address: str, key: bytes, profile: str | None) -> None:
    from nbq.transport.zmq import ZmqWorker
    from nbq.worker.marker import Marker
    from nbq.worker.process import serve
    from nbq.worker.ratelimit import RateLimits
    conn = ZmqWorker(address, key, "bench", {"sup": "s", "pid": os.getpid(), "host": "h",
                                             "spid": os.getppid(), "conc": 1,
                                             "queues": ["default"]})
    if profile:
        import cProfile
        prof = cProfile.Profile()
        prof.runcall(serve, conn, Marker(), RateLimits())
        prof.dump_stats(profile)
    else:
        serve(conn, Marker(), RateLimits())
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=20_000)
    parser.add_argument("--profile")
    parser.add_argument("--floor", action="store_true",
                        help="the worker only receives and answers (no verifying, no loop)")
    args = parser.parse_args()
    key = os.urandom(32)
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind("tcp://127.0.0.1:0")
    address = router.getsockopt_string(zmq.LAST_ENDPOINT)
    pid = os.fork()
    if pid == 0:
        router.close(linger=0)
        if args.floor:
            _floor(address, key)
        _worker(address, key, args.profile)
    signer = protocol.Signer(key)
    peer, *msg = router.recv_multipart()
    assert signer.decode(msg)[0]["k"] == "hello"
    router.send_multipart([peer, *signer.encode({"k": "welcome", "b": "x", "mx": 1 << 30})])
    fn = protocol.dumps(inc)
    h = protocol.function_hash(fn[0])
    router.send_multipart([peer, *signer.encode({"k": "fn", "h": h}, fn)])
    lat = []
    cpu0 = None
    for i in range(args.n + 200):
        if i == 200:  # warmed up
            cpu0, t0 = _cpu(pid), time.perf_counter()
        payload = protocol.dumps(((i,), {}))
        item = {"id": f"c-{i}", "h": h, "q": "default", "f": 1, "nf": len(payload), "ar": f"({i})"}
        t = time.perf_counter()
        router.send_multipart([peer, *signer.encode({"k": "tasks", "c": "c", "t": [item]},
                                                    payload)], copy=False)
        header, frames = signer.decode(router.recv_multipart()[1:])
        lat.append(time.perf_counter() - t)
        assert header["k"] == "res" and protocol.loads(frames) == i + 1, header
    wall, cpu1 = time.perf_counter() - t0, _cpu(pid)
    threads = {k: (v - cpu0.get(k, 0)) / args.n * 1e6 for k, v in cpu1.items()}
    os.kill(pid, signal.SIGKILL if args.floor else signal.SIGUSR2)
    os.waitpid(pid, 0)
    lat = sorted(lat[200:])
    print(f"{args.n} round trips: median {lat[len(lat) // 2] * 1e6:.0f} µs, "
          f"mean {wall / args.n * 1e6:.0f} µs; worker CPU {sum(threads.values()):.1f} µs per task ("
          + ", ".join(f"{k} {v:.1f}" for k, v in sorted(threads.items())) + ")")


if __name__ == "__main__":
    main()
