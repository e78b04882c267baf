"""Settings in a celeryconfig module, old upper-case names and new ones mixed, as projects have them."""
import os

BROKER_URL = os.environ.get("NBQ_BROKER")
CELERY_RESULT_BACKEND = BROKER_URL
CELERY_ACCEPT_CONTENT = ["pickle", "json", "msgpack"]
task_routes = {"tasks.where": {"queue": "routed"}, "tasks.slow*": "lopri"}
task_annotations = {"tasks.metered": {"rate_limit": "60/m"}}
