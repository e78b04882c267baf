"""A Celery project's tasks module, as the Celery tutorials write it, `celery` replaced by `nbq` in
its imports (the only change)."""
import os
import signal
import time

from nbq import Celery
from nbq.exceptions import SoftTimeLimitExceeded

app = Celery("tasks")
app.config_from_object("celeryconfig")

NOTES = os.environ.get("PROJ_NOTES", "notes.txt")  # where tasks leave evidence of their runs


def note(text: str) -> None:
    with open(NOTES, "a") as f:
        f.write(f"{text}\n")


@app.task
def add(x, y):
    return x + y


@app.task
def mul(x, y):
    return x * y


@app.task
def xsum(numbers):
    return sum(numbers)


@app.task
def where():
    """Which worker ran this (its WORKER_NAME) and when."""
    return os.environ.get("WORKER_NAME"), time.time()


@app.task(bind=True, max_retries=5, default_retry_delay=0.2)
def flaky(self, key, failures):
    """Fails `failures` times, then returns how many retries it took."""
    note(f"flaky {key} {self.request.id} {self.request.retries}")
    if self.request.retries < failures:
        raise self.retry(exc=IOError(f"try {self.request.retries} failed"))
    return self.request.retries


@app.task(bind=True, max_retries=3)
def patient(self, failures, countdown, last_run):
    """Retries `failures` times, `countdown` seconds apart; the last run lasts `last_run` s."""
    if self.request.retries < failures:
        raise self.retry(countdown=countdown)
    time.sleep(last_run)
    return self.request.retries


@app.task(bind=True)
def retries_once(self, seconds):
    """Retries 30 s later, unless it ran before (its process killed while it waited for that):
    then it lasts `seconds` and returns how many retries its request counts."""
    ran = os.path.exists(NOTES) and f"retries_once {self.request.id} " in open(NOTES).read()
    note(f"retries_once {self.request.id} {os.getpid()}")
    if not ran:
        raise self.retry(countdown=30)
    time.sleep(seconds)
    return self.request.retries


@app.task(autoretry_for=(IOError,), retry_backoff=0.1, retry_jitter=False, max_retries=2)
def always_fails(key):
    note(f"always_fails {key} {time.time()}")
    raise IOError(f"{key} never works")


@app.task(soft_time_limit=0.5)
def slow_but_careful(seconds):
    try:
        time.sleep(seconds)
    except SoftTimeLimitExceeded:
        return "cleaned up"
    return "finished"


@app.task(time_limit=0.5)
def slow(seconds, key="slow"):
    note(f"slow {key}")
    time.sleep(seconds)
    return "finished"


@app.task
def dies_once(key, value):
    """Kills its own process the first time it runs for key, then returns value."""
    path = f"{NOTES}.{key}.died"
    if not os.path.exists(path):
        open(path, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    note(f"survived {key} {value}")
    return value


@app.task
def record(value, key="record"):
    note(f"{key} {value!r}")
    return value


@app.task
def boom(x):
    raise ValueError(f"boom {x}")


@app.task
def on_error(request, exc, traceback):
    note(f"on_error {request.id} {type(exc).__name__}")


@app.task
def nap(seconds):
    time.sleep(seconds)
    return seconds


@app.task
def stamp():
    """When it started."""
    return time.time()


@app.task(rate_limit="600/m")
def limited():
    return time.time()


@app.task(rate_limit="1/h")
def hourly():
    """Starts once an hour on a worker, unless its rate is changed at run time."""
    return time.time()


@app.task
def metered():
    """Rate-limited by celeryconfig's task_annotations."""
    return time.time()


@app.task
def gate(path):
    """Keeps its worker busy until the file at path exists (60 s at most)."""
    note("gate started")
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)
    return os.path.exists(path)


@app.task
def ranked(label):
    note(f"ranked {label}")
    return label


@app.task(priority=7)
def ranked_urgent(label):
    note(f"ranked {label}")
    return label
