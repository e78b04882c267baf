"""Celery app and tasks for benchmarks/bench_redis.py and bench_tasks.py: the bench_engine tasks,
and Celery's tutorial add and xsum, as Celery tasks.

Broker and result backend are the private Redis named by NBQ_BENCH_REDIS_URL (set by
bench_redis.py); there is deliberately no default, so the machine's Redis on 6379 is never used.
With NBQ_BENCH_APP=nbq the same module is an nbq project, by the one-line change
(``from nbq import App as Celery``). The worker runs from the benchmarks directory:

    celery -A celery_tasks worker --pool prefork -c 2 --loglevel=WARNING
    NBQ_BENCH_APP=nbq nbq worker -A celery_tasks --broker $NBQ_BENCH_REDIS_URL -c 2
"""
from __future__ import annotations

import os

import bench_engine as be

if os.environ.get("NBQ_BENCH_APP") == "nbq":
    from nbq import App as Celery, chord  # noqa: F401  (chord: for bench_tasks.py)
else:
    from celery import Celery, chord  # noqa: F401

URL = os.environ.get("NBQ_BENCH_REDIS_URL")
if not URL:
    raise RuntimeError("NBQ_BENCH_REDIS_URL is not set: bench_redis.py sets it to its private Redis")

app = Celery("celery_tasks", broker=URL, backend=URL)
# pickle, so W4 can carry a numpy array (JSON cannot); everything else is Celery's default.
app.conf.update(task_serializer="pickle", result_serializer="pickle",
                accept_content=["pickle"], result_accept_content=["pickle"],
                broker_connection_retry_on_startup=True)


@app.task
def inc(x: int) -> int:
    return be.inc(x)


@app.task
def nbytes_of(a):
    return be.nbytes_of(a)


@app.task
def make_array(nbytes: int):
    return be.make_array(nbytes)


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task
def xsum(numbers: list) -> int:
    return sum(numbers)
