"""Engine benchmark: nbq against ProcessPoolExecutor, loky and Dask, each on 2 local workers.

Each (system, workload) pair runs in a fresh executor in a child process; one table is printed.

    nbq         nbq.Client(workers=2): the embedded broker and its workers
    nbq-worker  `nbq broker` and `nbq worker -c 2` started apart on this host, nbq.Client(address)
    memcpy      W4 only: numpy's copy of the array (best of 3), the floor of moving it once

    python benchmarks/bench_engine.py [--systems nbq,ppe,loky,dask] [--workloads W0,W3] [--quick]

NBQ_BENCH_CHECKOUT=/path/to/another/checkout measures that checkout's nbq with this script
(run it from that checkout, with a Python that has it installed: ``python -m nbq`` workers
import nbq from the current directory first), for before/after figures in one run.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import importlib
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHECKOUT = Path(os.environ.get("NBQ_BENCH_CHECKOUT") or Path(__file__).resolve().parents[1])
sys.path.insert(1, str(CHECKOUT))  # nbq from this checkout (or NBQ_BENCH_CHECKOUT's)
warnings.filterwarnings("ignore", message="Sending large graph")  # Dask, W4: that cost is measured
MB, WORKERS, CHUNK = 2**20, 2, 10_000
RESULT = "@@result "  # prefix of the child's result line on stdout


# --- tasks: module level so ProcessPoolExecutor pickles them by reference ------------------
def inc(x: int) -> int:
    """Trivial task."""
    return x + 1


class Batch:
    """Opaque box for a batch of results. Dask serializes a bare list element by element, ~100x
    slower than one pickle (dask/distributed#6368); W3's Dask batches come back in a Batch."""

    def __init__(self, items: list) -> None:
        self.items = items


def inc_batch(xs: range) -> Batch:
    """Trivial task over a batch of items (Dask's W3)."""
    return Batch([x + 1 for x in xs])


def nbytes_of(a: Any) -> int:
    """Size of the array received (W4 in)."""
    return a.nbytes


def make_array(nbytes: int) -> Any:
    """A new array of nbytes (W4 out; its allocation in the worker is inside the timing)."""
    return __import__("numpy").ones(nbytes // 8)


def sleep_task(s: float) -> float:
    """Sleep s seconds (W5)."""
    time.sleep(s)
    return s


# --- adapters: one small class per system; workloads are written once against them --------
class Adapter:
    """Executor-like wrapper: start() (creates the executor), submit, gather, map_inc, close."""
    ex: Any = None

    def start(self) -> None:
        """Create the executor (W0 times this)."""
        raise NotImplementedError

    def map_inc(self, n: int) -> list[int]:
        """[inc(x) for x in range(n)], the system's best way (W3)."""
        raise NotImplementedError

    def iterate_inc(self, n: int) -> list[int]:
        """The same as iterated by its user: ``list(ex.map(...))`` (W3's iteration row);
        map_inc where the system's map already gives an iterator."""
        return self.map_inc(n)

    def submit(self, fn: Callable, *args: Any) -> Any:
        """Submit fn(*args); returns a future with .result()."""
        return self.ex.submit(fn, *args)

    def gather(self, futs: list) -> list:
        """Results of futs, in order."""
        return [f.result() for f in futs]

    def close(self) -> None:
        """Shut the executor down, dropping work a failed workload left queued."""
        if self.ex is not None:
            self.ex.shutdown(wait=True, cancel_futures=True)


class NbqAdapter(Adapter):
    def start(self) -> None:
        import nbq
        self.ex = nbq.Client(workers=WORKERS)

    def gather(self, futs: list) -> list:
        return self.ex.gather(futs)

    def map_inc(self, n: int) -> list[int]:
        # nbq: a lambda (cloudpickled) with nbq's default chunksize; MapResult.result() -> list.
        return self.ex.map(lambda x: x + 1, range(n)).result()

    def iterate_inc(self, n: int) -> list[int]:
        # nbq: the MapResult iterated as it fills (what `list(client.map(f, xs))` does).
        return list(self.ex.map(lambda x: x + 1, range(n)))


class NbqWorkerAdapter(NbqAdapter):
    """`nbq broker` and `nbq worker -c 2` as processes of their own, a client connected."""

    def start(self) -> None:
        import nbq
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(Path(__file__).resolve().parent), str(CHECKOUT)]))
        nbq_cmd = [sys.executable, "-m", "nbq"]
        self.procs = [subprocess.Popen(nbq_cmd + ["broker", "--bind", "tcp://127.0.0.1:0"],
                                       stdout=subprocess.PIPE, text=True, env=env, cwd=CHECKOUT)]
        line = self.procs[0].stdout.readline()
        address = line.split("listening on ", 1)[1].split(",")[0].strip()
        self.procs.append(subprocess.Popen(nbq_cmd + ["worker", "--broker", address, "-c",
                                                      str(WORKERS)], env=env, cwd=CHECKOUT))
        self.ex = nbq.Client(address)
        self.ex.wait_for_workers(WORKERS)

    def close(self) -> None:
        super().close()
        for p in reversed(getattr(self, "procs", [])):
            p.terminate()
            p.wait()


class MemcpyAdapter(Adapter):
    """No executor: W4's floor, numpy copying the array once in this process."""

    def start(self) -> None:
        pass


def memcpy_bulk(ad: Adapter, quick: bool) -> dict[str, float]:
    """W4's rows for memcpy: a numpy copy of the array, best of 3 (both rows alike)."""
    import numpy as np
    nb = (10 if quick else 100) * MB
    arr = np.ones(nb // 8)
    t = min(timed(arr.copy, lambda r: r.nbytes == nb) for _ in range(3))
    return {f"W4 {nb // MB} MB in (MB/s)": nb / MB / t, f"W4 {nb // MB} MB out (MB/s)": nb / MB / t}


class PpeAdapter(Adapter):
    def start(self) -> None:
        self.ex = cf.ProcessPoolExecutor(WORKERS)  # platform default start method (fork here)

    def map_inc(self, n: int) -> list[int]:
        # ppe/loky: module-level inc (pickle can't send lambdas), chunksize=10,000 (their best).
        return list(self.ex.map(inc, range(n), chunksize=CHUNK))


class LokyAdapter(PpeAdapter):
    def start(self) -> None:
        import loky
        self.ex = loky.get_reusable_executor(max_workers=WORKERS)

    def close(self) -> None:
        if self.ex is not None:
            self.ex.shutdown(wait=True, kill_workers=True)  # loky has no cancel_futures


class DaskAdapter(Adapter):
    def start(self) -> None:
        from distributed import Client, LocalCluster
        self.cluster = LocalCluster(n_workers=WORKERS, threads_per_worker=1, processes=True,
                                    dashboard_address=None, silence_logs=logging.CRITICAL)
        self.ex = Client(self.cluster)

    def submit(self, fn: Callable, *args: Any) -> Any:
        return self.ex.submit(fn, *args, pure=False)  # pure=False: equal calls are not deduplicated

    def gather(self, futs: list) -> list:
        return self.ex.gather(futs)

    def map_inc(self, n: int) -> list[int]:
        # dask: client.map of inc_batch over n/10,000 ranges of 10,000 items (a task per item would
        # be 1,000,000 scheduler tasks); each task returns a Batch, flattened here.
        batches = self.ex.map(inc_batch, [range(i, min(i + CHUNK, n)) for i in range(0, n, CHUNK)],
                              pure=False)
        return [y for b in self.ex.gather(batches) for y in b.items]

    def close(self) -> None:
        if self.ex is not None:
            self.ex.close()
            self.cluster.close()


ADAPTERS: dict[str, type[Adapter]] = {"nbq": NbqAdapter, "nbq-worker": NbqWorkerAdapter,
                                      "ppe": PpeAdapter, "loky": LokyAdapter, "dask": DaskAdapter,
                                      "memcpy": MemcpyAdapter}
MODULES = {"nbq": "nbq", "nbq-worker": "nbq", "ppe": "concurrent.futures", "loky": "loky",
           "dask": "distributed", "memcpy": "numpy"}
ONLY = {"memcpy": {"W4": memcpy_bulk}}  # systems that run some workloads only, their own way


# --- workloads: each returns {row label: value}; only W0 gets an adapter not yet started ---
def timed(fn: Callable[[], Any], ok: Callable[[Any], bool] = lambda r: True) -> float:
    """Seconds taken by fn(); raises if ok(result) is false."""
    t0 = time.perf_counter()
    res = fn()
    dt = time.perf_counter() - t0
    if not ok(res):
        raise AssertionError(f"wrong result: {str(res)[:80]}")
    return dt


def w0_startup(ad: Adapter, quick: bool) -> dict[str, float]:
    """Executor creation to first trivial result (s)."""
    return {"W0 start to 1st result (s)": timed(lambda: (ad.start(), ad.submit(inc, 1).result())[1],
                                                lambda r: r == 2)}


def w1_roundtrip(ad: Adapter, quick: bool) -> dict[str, float]:
    """Single-task round trips in a row after 20 warm-ups: median and p99 (ms)."""
    lat = [timed(lambda i=i: ad.submit(inc, i).result(), lambda r, i=i: r == i + 1) * 1e3
           for i in range(20 + (50 if quick else 200))][20:]
    return {f"W1 {len(lat)} round trips median (ms)": statistics.median(lat),
            f"W1 {len(lat)} round trips p99 (ms)": statistics.quantiles(lat, n=100)[98]}


def w2_submits(ad: Adapter, quick: bool) -> dict[str, float]:
    """Many trivial submits, then wait for all (tasks/s)."""
    n = 1_000 if quick else 10_000
    dt = timed(lambda: ad.gather([ad.submit(inc, i) for i in range(n)]), lambda r: r == [*range(1, n + 1)])
    return {f"W2 {n:,} submits (tasks/s)": n / dt}


def w3_map(ad: Adapter, quick: bool) -> dict[str, float]:
    """Trivial function mapped over many items (items/s)."""
    n = 100_000 if quick else 1_000_000
    want = [*range(1, n + 1)]
    dt = timed(lambda: ad.map_inc(n), lambda r: r == want)
    dt_iter = timed(lambda: ad.iterate_inc(n), lambda r: r == want)
    return {f"W3 map {n:,} items (items/s)": n / dt,
            f"W3 map {n:,} items, list(map) (items/s)": n / dt_iter}


def w4_bulk(ad: Adapter, quick: bool) -> dict[str, float]:
    """A large array into a task and one out of a task (MB/s), best of 3."""
    import numpy as np
    nb = (10 if quick else 100) * MB
    arr = np.ones(nb // 8)
    t_in = min(timed(lambda: ad.submit(nbytes_of, arr).result(), lambda r: r == nb) for _ in range(3))
    t_out = min(timed(lambda: ad.submit(make_array, nb).result(), lambda r: r.nbytes == nb)
                for _ in range(3))
    return {f"W4 {nb // MB} MB in (MB/s)": nb / MB / t_in, f"W4 {nb // MB} MB out (MB/s)": nb / MB / t_out}


def w5_sleep(ad: Adapter, quick: bool) -> dict[str, float]:
    """n x sleep(0.05) on 2 workers: wall time (s) and its ratio to the ideal n*0.05/2."""
    n = 40 if quick else 200
    ideal = n * 0.05 / WORKERS
    dt = timed(lambda: ad.gather([ad.submit(sleep_task, 0.05) for _ in range(n)]), lambda r: len(r) == n)
    return {f"W5 {n} x sleep 50ms wall (s)": dt, f"W5 wall / ideal {ideal:.1f} s (x)": dt / ideal}


WORKLOADS = {"W0": w0_startup, "W1": w1_roundtrip, "W2": w2_submits,
             "W3": w3_map, "W4": w4_bulk, "W5": w5_sleep}


# --- harness: each (system, workload) runs in a child process of its own, under a timeout ---
def run_adapter(ad: "Adapter", workload: Callable, label: str, quick: bool,
                warm: bool = True) -> dict[str, float]:
    """In a child: one workload on an adapter (started and warmed unless warm=False);
    {} on failure, with the error on stderr."""
    try:
        if warm:
            ad.start()
            ad.submit(inc, 0).result(timeout=60)  # workers up before anything is timed
        return workload(ad, quick)
    except Exception as e:  # noqa: BLE001 - report and go on
        print(f"[{label}] {type(e).__name__}: {e}", file=sys.stderr)
        traceback.print_exc(file=sys.stderr)
        return {}
    finally:
        try:
            ad.close()
        except Exception as e:  # noqa: BLE001
            print(f"[{label}] close failed: {type(e).__name__}: {e}", file=sys.stderr)


def child_result(cmd: list[str], timeout: float, label: str) -> dict | None:
    """In the parent: run cmd in a new process group, killed whole when done or past timeout;
    its result line as a dict ({} if none), or None if it timed out."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        print(f"[{label}] timed out after {timeout:g} s", file=sys.stderr)
        return None
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever the child left running (workers, brokers)
    lines = [ln for ln in out.splitlines() if ln.startswith(RESULT)]
    return json.loads(lines[-1][len(RESULT):]) if lines else {}


def run_one(system: str, wl: str, quick: bool) -> dict[str, float]:
    """In the child: one workload on a fresh executor."""
    importlib.import_module(MODULES[system])  # imports are not part of W0
    if system in ONLY:
        return ONLY[system][wl](ADAPTERS[system](), quick)
    return run_adapter(ADAPTERS[system](), WORKLOADS[wl], f"{system} {wl}", quick, warm=wl != "W0")


def run_isolated(system: str, wl: str, quick: bool, timeout: float) -> dict[str, float]:
    """In the parent: run_one in a child process of its own."""
    cmd = [sys.executable, __file__, "--one", f"{system}:{wl}"] + (["--quick"] if quick else [])
    return child_result(cmd, timeout, f"{system} {wl}") or {}


def fmt(v: float | str | None) -> str:
    """A cell: 'err' if missing, a word (such as 'timeout') as is, else precision by magnitude."""
    if isinstance(v, str):
        return v
    return "err" if v is None else f"{v:,.0f}" if v >= 100 else f"{v:.2f}" if v >= 1 else f"{v:.3f}"


def table(rows: list[str], systems: list[str], cells: dict[tuple[str, str], float],
          peers_of_interest: tuple[str, ...] = ("ppe", "dask"), ours: tuple[str, ...] = ("nbq",)) -> str:
    """Fixed-width table, also valid Markdown, with ratio columns (nbq/ppe, nbq/dask, ...) of
    each of ours to each peer of interest present."""
    pairs = [(o, p) for o in ours if o in systems for p in peers_of_interest if p in systems]
    head = ["workload", "better"] + systems + [f"{o}/{p}" for o, p in pairs]
    body = []
    for r in rows:
        lower = r.endswith(("(s)", "(ms)", "(x)"))
        line = [r, "-" if r.endswith("failed)") else "lower" if lower else "higher"]
        line += [fmt(cells.get((s, r))) for s in systems]
        ratios = [(cells.get((o, r)), cells.get((p, r))) for o, p in pairs]
        body.append(line + [f"{a / b:.2f}" if isinstance(a, float) and isinstance(b, float) and b
                            else "-" for a, b in ratios])
    w = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    def out(cols: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(cols)) + " |"
    sep = "|" + "|".join("-" * (n + 1) + ":" if i else "-" * (n + 2) for i, n in enumerate(w)) + "|"
    return "\n".join([out(head), sep] + [out(b) for b in body])


def available(system: str, modules: dict[str, str] = MODULES) -> bool:
    """True if the system imports (nbq must also have Client)."""
    try:
        mod = importlib.import_module(modules[system])
    except Exception:  # noqa: BLE001
        return False
    return not system.startswith("nbq") or hasattr(mod, "Client")


def main(argv: list[str] | None = None) -> None:
    """Parse options, run every (system, workload) pair, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--systems", help="comma list from nbq,ppe,loky,dask (default: all that import)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="comma list from W0..W5")
    ap.add_argument("--quick", action="store_true", help="smaller counts, for a smoke run")
    ap.add_argument("--timeout", type=float, default=600, help="seconds allowed per workload run")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: "system:workload" in a child
    args = ap.parse_args(argv)
    if args.one:
        system, wl = args.one.split(":")
        print(RESULT + json.dumps(run_one(system, wl, args.quick)), flush=True)
        return
    systems = args.systems.split(",") if args.systems else [s for s in ADAPTERS if available(s)]
    print(f"nbq from {CHECKOUT}", file=sys.stderr, flush=True)
    wls = args.workloads.split(",")
    bad = [x for x in systems if x not in ADAPTERS] + [x for x in wls if x not in WORKLOADS]
    if bad:
        ap.error(f"unknown system(s)/workload(s): {', '.join(bad)}")
    rows: list[str] = []
    cells: dict[tuple[str, str], float] = {}  # (system, row) -> value; a missing cell prints err
    for wl in wls:
        for s in systems:
            if s in ONLY and wl not in ONLY[s]:
                continue
            print(f"running {s} {wl} ...", file=sys.stderr, flush=True)
            for r, v in run_isolated(s, wl, args.quick, args.timeout).items():
                rows += [] if r in rows else [r]
                cells[(s, r)] = v
        rows += [] if any(r.startswith(wl + " ") for r in rows) else [f"{wl} (all failed)"]
    print(f"\n{WORKERS} workers, Python {sys.version.split()[0]}{', --quick' if args.quick else ''}\n")
    for s in ONLY:
        for r in rows:
            cells.setdefault((s, r), "-")
    print(table(rows, systems, cells, ("ppe", "dask", "memcpy"), ("nbq", "nbq-worker")))
    if "nbq" in systems:
        print("\nnbq/X = nbq's figure / X's: > 1 favours nbq where 'better' is higher.", flush=True)


if __name__ == "__main__":
    main()
