"""nbq's exceptions: every one derives from NbqError."""
from __future__ import annotations


class NbqError(Exception):
    """Base of every error nbq raises."""


class SignatureError(NbqError):
    """A message had a missing or wrong HMAC signature; its payload was never unpickled."""


class KeyMismatch(SignatureError):
    """This side's signing key differs from the one its cluster uses: it refuses to start.

    The message says where this side's key came from and gives both key fingerprints
    (an HMAC of a constant under each key: they tell keys apart, never the keys).
    """


class InvalidKey(NbqError, ValueError):
    """A signing key that cannot be used: shorter than 32 bytes (empty, whitespace, a typo)."""


class FunctionRefused(SignatureError):
    """A worker refused the function stored for a task (not signed under the key, not a
    function message, or not the function its hash names); the client ships it again."""

    def __init__(self, h: str, why: str) -> None:
        super().__init__(f"function {h} was refused: {why}; it is shipped again with the "
                         "next call (submit again)")
        self.hash = h
        self.why = why

    def __reduce__(self):
        return (FunctionRefused, (self.hash, self.why))


class SerializationError(NbqError, TypeError):
    """A function, argument or result could not be pickled; the message names which."""


class AddressError(NbqError, ValueError):
    """A broker address nbq cannot use (an unknown scheme, such as http:// or none): a
    ValueError, as redis-py's and urllib's are for a malformed URL."""


class MessageTooLarge(NbqError, ValueError):
    """A message (a task's arguments, a function) is larger than the broker's max_message_size."""


class WorkerLost(NbqError):
    """A task's own process died (killed, crashed, out of memory) while running it, its worker
    alive, ``max_task_deaths`` times; the message says how many and how the last one died."""


class TimeLimitExceeded(NbqError):
    """A task ran past its hard ``time_limit``: its process was killed and replaced (not re-run)."""


class BrokerUnavailable(NbqError, ConnectionError):
    """The broker could not be reached or stopped answering."""


class BrokerTimeout(NbqError, TimeoutError):
    """The broker did not answer a request in time, or did not report the workers waited for;
    a TimeoutError too, so ``except TimeoutError`` still catches it."""


class LaunchError(NbqError):
    """A cluster could not start workers: the message names the host (or job) and why."""


class VersionMismatch(NbqError):
    """A worker's nbq or Python version differs from its client's: it refuses to serve."""


class InputError(NbqError):
    """The iterable given to map raised while it was being read."""


class RemoteError(NbqError):
    """A remote exception whose type could not be rebuilt here.

    Carries the remote type name, message and traceback text.
    """

    def __init__(self, type_name: str, message: str, traceback: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.traceback = traceback

    def __reduce__(self):
        return (RemoteError, (self.type_name, self.message, self.traceback))


class RemoteTraceback(NbqError):
    """Holds the worker's traceback text; attached as ``__cause__`` of a remote error."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb
