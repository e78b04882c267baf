"""nbq on amqp:// against Celery on the same RabbitMQ, 2 worker processes each.

  python benchmarks/bench_rabbitmq.py [AMQP_URL [REDIS_URL]]   (default: the machine's
  RabbitMQ on 5672, no result backend; REDIS_URL: nbq's result_backend, where it stores
  large frames apart and events, as Celery's Redis result backend would)

W1 round trip of one trivial task (median of 200), W2 10,000 trivial tasks submitted then
gathered, W3 1,000,000 map items (nbq: client.map with its default chunks; Celery:
task.chunks(..., 1000), its own way to batch), W4 100 MB in and out (one task).  Celery
uses its default py-amqp transport, the rpc:// result backend and the pickle serializer.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from urllib.parse import quote

import nbq

URL = sys.argv[1] if len(sys.argv) > 1 else "amqp://guest:guest@127.0.0.1:5672/%2F"
NBQ_URL = URL if len(sys.argv) < 3 else (
    URL + ("&" if "?" in URL else "?") + "result_backend=" + quote(sys.argv[2], safe=""))
BIG = 100 << 20

CELERY_APP = textwrap.dedent("""
    from celery import Celery
    app = Celery("benchrmq", broker={url!r}, backend="rpc://")
    app.conf.update(task_serializer="pickle", result_serializer="pickle",
                    accept_content=["pickle"], worker_prefetch_multiplier=4,
                    task_default_queue={queue!r}, broker_connection_retry_on_startup=True)

    @app.task
    def noop(x):
        return x

    @app.task
    def echo(b):
        return b
""")


def nbq_side() -> dict:
    out = {}
    with nbq.Client(NBQ_URL, workers=2) as c:
        c.wait_for_workers(2)
        c.submit(abs, 1).result()
        times = []
        for i in range(200):
            t = time.perf_counter()
            c.submit(abs, -i).result()
            times.append(time.perf_counter() - t)
        out["W1"] = statistics.median(times) * 1000
        t = time.perf_counter()
        futs = [c.submit(abs, -i) for i in range(10_000)]
        c.gather(futs)
        out["W2"] = 10_000 / (time.perf_counter() - t)
        t = time.perf_counter()
        c.map(abs, range(1_000_000)).result()
        out["W3"] = 1_000_000 / (time.perf_counter() - t)
        blob = os.urandom(BIG)
        t = time.perf_counter()
        back = c.submit(bytes, blob).result()
        out["W4"] = 2 * BIG / (time.perf_counter() - t) / 1e6
        assert back == blob
    return out


def celery_side() -> dict:
    queue = "bench-" + uuid.uuid4().hex[:8]
    tmp = tempfile.mkdtemp()
    with open(os.path.join(tmp, "benchrmq.py"), "w") as f:
        f.write(CELERY_APP.format(url=URL, queue=queue))
    sys.path.insert(0, tmp)
    import benchrmq
    worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "benchrmq", "worker", "-c", "2",
                               "-Q", queue, "--loglevel", "warning"], cwd=tmp,
                              env=dict(os.environ, C_FORCE_ROOT="1"),  # pickle, as root: a bench
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = {}
    try:
        benchrmq.noop.delay(1).get(timeout=60)
        times = []
        for i in range(200):
            t = time.perf_counter()
            benchrmq.noop.delay(i).get(timeout=30)
            times.append(time.perf_counter() - t)
        out["W1"] = statistics.median(times) * 1000
        t = time.perf_counter()
        results = [benchrmq.noop.delay(i) for i in range(10_000)]
        for r in results:
            r.get(timeout=300)
        out["W2"] = 10_000 / (time.perf_counter() - t)
        t = time.perf_counter()
        benchrmq.noop.chunks(((i,) for i in range(1_000_000)), 1000).group().apply_async().get(timeout=900)
        out["W3"] = 1_000_000 / (time.perf_counter() - t)
        blob = os.urandom(BIG)
        t = time.perf_counter()
        back = benchrmq.echo.delay(blob).get(timeout=300)
        out["W4"] = 2 * BIG / (time.perf_counter() - t) / 1e6
        assert back == blob
    finally:
        worker.terminate()
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    return out


if __name__ == "__main__":
    n = nbq_side()
    print("nbq:", {k: round(v, 3) for k, v in n.items()}, flush=True)
    c = celery_side()
    print("(a shared 2-core machine: other sessions load it)")
    print(f"{'workload':<34}{'nbq':>12}{'Celery':>12}{'nbq/Celery':>12}")
    for key, what, unit in (("W1", "W1 round trip (median)", "ms"), ("W2", "W2 10,000 tasks", "tasks/s"),
                            ("W3", "W3 1,000,000 map items", "items/s"), ("W4", "W4 100 MB in+out", "MB/s")):
        print(f"{what + ' ' + unit:<34}{n[key]:>12,.1f}{c[key]:>12,.1f}{n[key] / c[key]:>12.2f}")
