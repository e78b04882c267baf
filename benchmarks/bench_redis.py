"""Redis benchmark: nbq on Redis against nbq on ZeroMQ, Celery and RQ, each with 2 worker processes.

One private redis-server (tests/redis_server.py: a free 127.0.0.1 port, its own temp directory,
AOF everysec) serves the whole run and is stopped by its handle at the end; each (system,
workload) pair gets a fresh, flushed database of it and runs in a child process of its own,
which starts and stops its own workers. The machine's Redis on 6379 is never used.

    nbq      `nbq worker --broker redis://127.0.0.1:PORT/N -c 2` + nbq.Client(url) here
    nbq-zmq  nbq.Client(workers=2): embedded ZeroMQ broker, no durability (the price of it)
    celery   `celery -A celery_tasks worker --pool prefork -c 2`, Redis broker and result backend
    rq       2 x `rq worker` (a fork per job), results read back with Job.latest_result

    python benchmarks/bench_redis.py [--systems nbq,nbq-zmq,celery,rq] [--workloads W1,W4] [--quick]
                                     [--redis-defaults]   # no AOF: Redis's default persistence
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[1:1] = [str(HERE), str(ROOT / "tests")]  # bench_engine, redis_server
import bench_engine as be  # noqa: E402  (also puts this checkout's nbq on sys.path)
from bench_engine import CHUNK, MB, RESULT, WORKERS, timed  # noqa: E402

BULK_TIMEOUT = 60.0  # s allowed per W4 transfer (--bulk-timeout); Celery's can hang, see w4_bulk
URL_ENV = "NBQ_BENCH_REDIS_URL"  # the child's database; celery_tasks.py reads it too


def _bin(name: str) -> str:
    """A console script of this venv (nbq, celery, rq)."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def stop(procs: list[subprocess.Popen], grace: float = 15) -> None:
    """Stop worker processes by their handles: SIGTERM, then SIGKILL after grace seconds."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout:g} s")
        time.sleep(0.05)


# --- adapters: bench_engine's Adapter interface (start, submit -> .result(), gather, map_inc, close)
class NbqZmqAdapter(be.NbqAdapter):
    """nbq.Client(workers=2): embedded ZeroMQ broker and workers (bench_engine's nbq)."""

    def __init__(self, url: str | None = None) -> None:
        self.url = url

    def map_inc(self, n: int) -> list[int]:
        return self.ex.map(be.inc, range(n), chunksize=CHUNK).result()

    def iterate_inc(self, n: int) -> list[int]:
        return list(self.ex.map(be.inc, range(n), chunksize=CHUNK))


class NbqRedisAdapter(NbqZmqAdapter):
    """A separate `nbq worker -c 2` process on the Redis URL, and nbq.Client(url) here."""
    procs: list[subprocess.Popen] = []

    def start(self) -> None:
        import nbq
        self.procs = [subprocess.Popen([_bin("nbq"), "worker", "--broker", self.url, "-c", str(WORKERS)],
                                       stdin=subprocess.DEVNULL)]
        self.ex = nbq.Client(self.url)
        self.ex.wait_for_workers(1, timeout=60)

    def close(self) -> None:
        try:
            super().close()
        finally:
            stop(self.procs)


class CeleryFuture:
    def __init__(self, ar: Any) -> None:
        self.ar = ar

    def result(self, timeout: float | None = None) -> Any:
        return self.ar.get(timeout=timeout)


class CeleryAdapter(be.Adapter):
    """A prefork Celery worker (-c 2) on the Redis broker; results from the Redis backend."""
    procs: list[subprocess.Popen] = []

    def __init__(self, url: str) -> None:
        self.url = url

    def worker_command(self) -> list[str]:
        return [_bin("celery"), "-A", "celery_tasks", "worker", "--pool", "prefork",
                "-c", str(WORKERS), "--loglevel=WARNING"]

    def start(self) -> None:
        import celery_tasks
        self.tasks = celery_tasks
        self.procs = [subprocess.Popen(self.worker_command(), cwd=HERE, stdin=subprocess.DEVNULL,
                                       env={**os.environ, "C_FORCE_ROOT": "1"})]  # pickle as root
        ar = celery_tasks.inc.delay(0)
        _wait(lambda: ar.ready() or self.procs[0].poll() is not None, 60, "the worker")
        if self.procs[0].poll() is not None:
            raise RuntimeError(f"the worker exited with {self.procs[0].returncode}")

    def submit(self, fn, *args: Any) -> CeleryFuture:
        return CeleryFuture(getattr(self.tasks, fn.__name__).delay(*args))

    def gather(self, futs: list) -> list:
        from celery.result import ResultSet
        return ResultSet([f.ar for f in futs]).get()  # join_native: one pass over the backend

    def map_inc(self, n: int) -> list[int]:
        # celery: inc.chunks -> 100 tasks of 10,000 (x,) tuples each, run as a group
        res = self.tasks.inc.chunks(zip(range(n)), CHUNK).group().apply_async()
        return [y for part in res.get() for y in part]

    def close(self) -> None:
        stop(self.procs)


class RqFuture:
    def __init__(self, job: Any) -> None:
        self.job = job

    def result(self, timeout: float | None = None) -> Any:
        res = self.job.latest_result(timeout=max(1, round(timeout or 3600)))  # XREAD BLOCK
        if res is None:
            raise TimeoutError(f"rq job {self.job.id}: no result within {timeout} s")
        if res.type != res.Type.SUCCESSFUL:
            raise RuntimeError(f"rq job {self.job.id} {res.type.name}: {res.exc_string}")
        return res.return_value


class RqAdapter(be.Adapter):
    """2 `rq worker` processes (default Worker class: a fork per job); a Queue here."""
    procs: list[subprocess.Popen] = []

    def __init__(self, url: str) -> None:
        self.url = url

    def start(self) -> None:
        import redis
        import rq
        self.conn = redis.Redis.from_url(self.url)
        self.q = rq.Queue("default", connection=self.conn)
        self.procs = [subprocess.Popen([_bin("rq"), "worker", "--url", self.url, "--quiet", "default"],
                                       stdin=subprocess.DEVNULL) for _ in range(WORKERS)]
        _wait(lambda: rq.Worker.count(connection=self.conn) >= WORKERS, 60, "rq workers")

    def submit(self, fn, *args: Any) -> RqFuture:
        return RqFuture(self.q.enqueue(fn, *args))

    def map_inc(self, n: int) -> list[int]:
        # rq: a job per chunk of 10,000 items (a list), each returning a bench_engine.Batch
        futs = [self.submit(be.inc_batch, list(range(i, min(i + CHUNK, n)))) for i in range(0, n, CHUNK)]
        return [y for f in futs for y in f.result().items]

    def close(self) -> None:
        stop(self.procs)
        self.conn.close()


ADAPTERS: dict[str, type[be.Adapter]] = {"nbq": NbqRedisAdapter, "nbq-zmq": NbqZmqAdapter,
                                         "celery": CeleryAdapter, "rq": RqAdapter}
MODULES = {"nbq": "nbq", "nbq-zmq": "nbq", "celery": "celery", "rq": "rq"}
ON_REDIS = {"nbq", "celery", "rq"}  # nbq-zmq does not touch Redis


# --- workloads: W1-W3 are bench_engine's; W4 bounds each transfer and names timeouts -----
def w4_bulk(ad: be.Adapter, quick: bool) -> dict[str, float | str]:
    """A large array into a task and one out of a task (MB/s), best of 3, each transfer bounded.

    Celery with default Redis settings may hang on a 100 MB result: the backend PUBLISHes it,
    and Redis drops a pub/sub subscriber past its 32 MB client-output-buffer limit. (Celery 5.7
    recovers: its result consumer reconnects and MGETs the pending keys; older ones may wait on.)
    Each transfer therefore gets BULK_TIMEOUT seconds and the cell reads 'timeout' (or 'err' for
    any other failure, with the error on stderr) instead of a figure.
    """
    import numpy as np
    nb = (10 if quick else 100) * MB
    arr = np.ones(nb // 8)
    out: dict[str, float | str] = {}
    for label, fn, arg, ok in (("in", be.nbytes_of, arr, lambda r: r == nb),
                               ("out", be.make_array, nb, lambda r: r.nbytes == nb)):
        row = f"W4 {nb // MB} MB {label} (MB/s)"
        try:
            t = min(timed(lambda: ad.submit(fn, arg).result(timeout=BULK_TIMEOUT), ok) for _ in range(3))
            out[row] = nb / MB / t
        except Exception as e:  # noqa: BLE001 - reported in the cell
            timeout = "timeout" in type(e).__name__.lower()
            out[row] = "timeout" if timeout else "err"
            print(f"[W4 {label}] {type(e).__name__}: {e}", file=sys.stderr)
            if not timeout:
                traceback.print_exc(file=sys.stderr)
    return out


WORKLOADS = {"W1": be.w1_roundtrip, "W2": be.w2_submits, "W3": be.w3_map, "W4": w4_bulk}


# --- harness: like bench_engine's, plus the Redis URL of the pair's database ---------------
def run_one(system: str, wl: str, quick: bool, url: str | None, adapters: dict | None = None,
            workloads: dict | None = None) -> dict[str, float | str]:
    """In the child: one workload on freshly started workers."""
    adapters, workloads = adapters or ADAPTERS, workloads or WORKLOADS
    if url:
        os.environ[URL_ENV] = url
    importlib.import_module(MODULES[system])
    return be.run_adapter(adapters[system](url), workloads[wl], f"{system} {wl}", quick)


def run_isolated(script: str, system: str, wl: str, quick: bool, timeout: float, url: str | None,
                 extra: tuple[str, ...]) -> dict:
    """In the parent: `script --one system:wl` in a child process of its own (its workers included)."""
    cmd = [sys.executable, script, "--one", f"{system}:{wl}", *extra]
    cmd += (["--url", url] if url else []) + (["--quick"] if quick else [])
    result = be.child_result(cmd, timeout, f"{system} {wl}")
    return {r: "timeout" for r in ROWS.get(wl, [])} if result is None else result


ROWS: dict[str, list[str]] = {}  # workload -> row labels seen so far (for a timed-out pair's cells)
PEERS = ("celery", "rq")


@contextlib.contextmanager
def private_redis(aof: bool = True):
    """A private redis-server (tests/redis_server.py), stopped by its handle on exit, and the
    environment the children and their workers need: one signing key for nbq (no key file
    written), and bench_engine / celery_tasks importable (tasks are pickled by reference)."""
    os.environ.setdefault("NBQ_KEY", secrets.token_hex(32))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), str(be.CHECKOUT)] + [p for p in
                                               os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    from redis_server import RedisServer
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as tmp:
        server = RedisServer(tmp, aof=aof)
        try:
            assert server.port != 6379
            print(f"private redis-server on 127.0.0.1:{server.port} in {tmp}", file=sys.stderr, flush=True)
            yield server
        finally:
            server.stop()


def run_all(script: str, server, systems: list[str], wls: list[str], quick: bool, timeout: float,
            extra: tuple[str, ...] = ()) -> tuple[list[str], dict[tuple[str, str], float | str]]:
    """Every (system, workload) pair in a child of script, on a fresh, flushed database of
    server where the system uses Redis: (row labels, {(system, row): value})."""
    import redis
    rows: list[str] = []
    cells: dict[tuple[str, str], float | str] = {}  # (system, row) -> value; missing prints err
    for wl in wls:
        for s in systems:
            url = server.url() if s in ON_REDIS else None
            print(f"running {s} {wl} {url or ''}...", file=sys.stderr, flush=True)
            for r, v in run_isolated(script, s, wl, quick, timeout, url, extra).items():
                rows += [] if r in rows else [r]
                seen = ROWS.setdefault(wl, [])
                seen += [] if r in seen else [r]
                cells[(s, r)] = v
            if url:  # free its memory (W4 leaves hundreds of MB) before the next pair
                with contextlib.closing(redis.Redis.from_url(url)) as r:
                    r.flushdb()
        rows += [] if any(r.startswith(wl + " ") for r in rows) else [f"{wl} (all failed)"]
    return rows, cells


def main(argv: list[str] | None = None) -> None:
    """Parse options, start the private Redis, run every (system, workload) pair, print the table."""
    global BULK_TIMEOUT
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--systems", help="comma list from nbq,nbq-zmq,celery,rq (default: all that import)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="comma list from W1..W4")
    ap.add_argument("--quick", action="store_true", help="smaller counts, for a smoke run")
    ap.add_argument("--timeout", type=float, default=300, help="seconds allowed per workload run")
    ap.add_argument("--bulk-timeout", type=float, default=BULK_TIMEOUT, help="seconds per W4 transfer")
    ap.add_argument("--redis-defaults", action="store_true",
                    help="Redis's default persistence (RDB snapshots, no AOF) instead of AOF everysec")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: "system:workload" in a child
    ap.add_argument("--url", help=argparse.SUPPRESS)  # internal: the child's Redis database
    args = ap.parse_args(argv)
    BULK_TIMEOUT = args.bulk_timeout
    if args.one:
        system, wl = args.one.split(":")
        print(RESULT + json.dumps(run_one(system, wl, args.quick, args.url)), flush=True)
        return
    systems = args.systems.split(",") if args.systems else [s for s in ADAPTERS if be.available(s, MODULES)]
    wls = args.workloads.split(",")
    bad = [x for x in systems if x not in ADAPTERS] + [x for x in wls if x not in WORKLOADS]
    if bad:
        ap.error(f"unknown system(s)/workload(s): {', '.join(bad)}")
    with private_redis(aof=not args.redis_defaults) as server:
        rows, cells = run_all(__file__, server, systems, wls, args.quick, args.timeout,
                              ("--bulk-timeout", str(BULK_TIMEOUT)))
    persistence = "default persistence, no AOF" if args.redis_defaults else "AOF everysec"
    print(f"\n{WORKERS} workers, Python {sys.version.split()[0]}, one private Redis "
          f"({persistence}){', --quick' if args.quick else ''}\n")
    print(be.table(rows, systems, cells, PEERS))
    if "nbq" in systems:
        print("\nnbq = nbq on Redis; nbq/X = nbq's figure / X's: > 1 favours nbq where 'better' is "
              "higher.", flush=True)


if __name__ == "__main__":
    main()
