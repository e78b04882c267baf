"""nbq: run notebook work on many processes and machines.

``nbq.Client()`` is a concurrent.futures.Executor: submit, map, starmap and
gather, with live progress and results as pandas DataFrames.
"""
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION

from .tasks.asyncresult import AsyncResult
from .client import Client, Future, MapResult, as_completed, ship_modules as ship, wait
from .client.progress import progress
from .clusters import Cluster, LaunchWarning, SSHCluster
from .clusters.slurm import SlurmCluster
from .errors import (BrokerTimeout, BrokerUnavailable, InputError, InvalidKey, KeyMismatch,
                     LaunchError, NbqError, RemoteError, SerializationError, SignatureError,
                     VersionMismatch, WorkerLost)
from .states import FAILURE, PENDING, RETRY, REVOKED, STARTED, SUCCESS
from .tasks import App, GroupResult, Signature, chain, chord, chunks, group, shared_task, signature
from .version import __version__

Celery = App  # so that `from celery import Celery` needs only `celery` replaced by `nbq`


__all__ = [
    "__version__",
    "Client", "ship", "Future", "AsyncResult", "MapResult", "as_completed", "wait",
    "ALL_COMPLETED", "FIRST_COMPLETED", "FIRST_EXCEPTION",
    "PENDING", "STARTED", "RETRY", "SUCCESS", "FAILURE", "REVOKED",
    "NbqError", "RemoteError", "SignatureError", "SerializationError", "WorkerLost",
    "BrokerUnavailable", "BrokerTimeout", "InputError", "KeyMismatch", "InvalidKey", "progress",
    "App", "Signature", "signature", "group", "chain", "chord", "chunks", "GroupResult",
    "Celery", "shared_task", "Cluster", "SSHCluster", "LaunchError", "LaunchWarning", "VersionMismatch",
    "SlurmCluster",
]


def load_ipython_extension(ipython) -> None:
    """``%load_ext nbq``: the %nbq and %%remote magics (IPython is imported only now)."""
    from .notebook.magics import load_ipython_extension as load
    load(ipython)

