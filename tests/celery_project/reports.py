"""A module of a Celery project that imports no app (`@shared_task`), as written for Celery with
`celery` replaced by `nbq` in its imports; the worker imports it through CELERY_IMPORTS."""
from nbq import shared_task, states
from nbq.exceptions import MaxRetriesExceededError
from nbq.result import AsyncResult
from nbq.utils.log import get_task_logger
from tasks import note

logger = get_task_logger(__name__)


@shared_task
def nightly():
    """Scheduled by celeryconfig's beat_schedule, with a crontab."""
    note("nightly report")
    return "report"


@shared_task(bind=True, max_retries=1, default_retry_delay=0.1)
def gives_up(self):
    """Retries once, then settles for less."""
    try:
        self.retry()
    except MaxRetriesExceededError:
        logger.warning("giving up after %d retry", self.request.retries)
        return f"gave up after {self.request.retries} retry"


@shared_task
def state_of(task_id):
    """Another task's state by its id, as a Celery task reads it with AsyncResult(task_id)."""
    state = AsyncResult(task_id).state
    return state, state in states.READY_STATES
