"""Celery-API benchmark: nbq.App against Celery, the same tasks module, 2 worker processes each.

benchmarks/celery_tasks.py is a Celery project; with NBQ_BENCH_APP=nbq it is the same project
after the one-line change (``from nbq import App as Celery``). One private redis-server
(bench_redis.private_redis: a free 127.0.0.1 port, AOF everysec, stopped by its handle) serves
the run; each (system, workload) pair gets a fresh, flushed database and a child process of its
own, which starts and stops its workers.

    nbq      `nbq worker -A celery_tasks --broker redis://127.0.0.1:PORT/N -c 2`
    celery   `celery -A celery_tasks worker --pool prefork -c 2`, Redis broker and result backend

    W2     n x add.delay(i, i), then .get() of each result in turn
    chord  chord(add.s(i, i) for i in range(n))(xsum.s()).get(), best of 3

    python benchmarks/bench_tasks.py [--systems nbq,celery] [--workloads W2,chord] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(1, str(Path(__file__).resolve().parent))
import bench_redis as br  # noqa: E402  (puts bench_engine, tests/redis_server and nbq on sys.path)
from bench_engine import RESULT, WORKERS, table, timed  # noqa: E402

APP_ENV = "NBQ_BENCH_APP"  # celery_tasks.py is an nbq.App project when this is "nbq"
GET_TIMEOUT = 300.0  # s allowed for any one .get()


class NbqAppAdapter(br.CeleryAdapter):
    """celery_tasks.py as an nbq.App project, run by `nbq worker -A celery_tasks -c 2`."""

    def worker_command(self) -> list[str]:
        return [br._bin("nbq"), "worker", "-A", "celery_tasks", "--broker", self.url, "-c", str(WORKERS)]

    def start(self) -> None:
        os.environ[APP_ENV] = "nbq"  # here and in the worker, before celery_tasks is imported
        super().start()

    def close(self) -> None:
        try:
            self.tasks.app.close()
        finally:
            super().close()


ADAPTERS = {"nbq": NbqAppAdapter, "celery": br.CeleryAdapter}


def w2_delay_get(ad: br.CeleryAdapter, quick: bool) -> dict[str, float]:
    """n x add.delay(i, i), then .get() of each (tasks/s)."""
    n, t = (1_000 if quick else 10_000), ad.tasks
    dt = timed(lambda: [r.get(timeout=GET_TIMEOUT) for r in [t.add.delay(i, i) for i in range(n)]],
               lambda r: r == [2 * i for i in range(n)])
    return {f"W2 {n:,} add.delay + .get (tasks/s)": n / dt}


def chord_sum(ad: br.CeleryAdapter, quick: bool) -> dict[str, float]:
    """A chord of n adds into xsum, applied and its result got: seconds, header tasks/s; best of 3."""
    n, t = (100 if quick else 1_000), ad.tasks
    dt = min(timed(lambda: t.chord(t.add.s(i, i) for i in range(n))(t.xsum.s()).get(timeout=GET_TIMEOUT),
                   lambda r: r == n * (n - 1)) for _ in range(3))
    return {f"chord of {n:,} adds, best of 3 (s)": dt, f"chord of {n:,} adds (tasks/s)": n / dt}


WORKLOADS = {"W2": w2_delay_get, "chord": chord_sum}


def main(argv: list[str] | None = None) -> None:
    """Parse options, start the private Redis, run every (system, workload) pair, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--systems", default="nbq,celery", help="comma list from nbq,celery")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="comma list from W2,chord")
    ap.add_argument("--quick", action="store_true", help="smaller counts, for a smoke run")
    ap.add_argument("--timeout", type=float, default=600, help="seconds allowed per workload run")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: "system:workload" in a child
    ap.add_argument("--url", help=argparse.SUPPRESS)  # internal: the child's Redis database
    args = ap.parse_args(argv)
    if args.one:
        system, wl = args.one.split(":")
        print(RESULT + json.dumps(br.run_one(system, wl, args.quick, args.url, ADAPTERS, WORKLOADS)),
              flush=True)
        return
    systems, wls = args.systems.split(","), args.workloads.split(",")
    bad = [x for x in systems if x not in ADAPTERS] + [x for x in wls if x not in WORKLOADS]
    if bad:
        ap.error(f"unknown system(s)/workload(s): {', '.join(bad)}")
    with br.private_redis() as server:
        rows, cells = br.run_all(__file__, server, systems, wls, args.quick, args.timeout)
    print(f"\n{WORKERS} worker processes each, Python {sys.version.split()[0]}, one private Redis "
          f"(AOF everysec){', --quick' if args.quick else ''}\n")
    print(table(rows, systems, cells, ("celery",)))
    print("\nnbq = nbq.App on Redis; nbq/celery > 1 favours nbq where 'better' is higher.", flush=True)


if __name__ == "__main__":
    main()
