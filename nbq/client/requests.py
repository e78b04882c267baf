"""Requests to the broker and their replies: info, watch, cancel, join, claim, control.

A request carries the client's request number; its reply comes back as a ``reply`` (or
``welcome``) message on the receiver thread, which completes the waiting caller's
future.  Open requests are sent again to a broker that restarted or came back.
"""
from __future__ import annotations

import concurrent.futures
from typing import Any, Callable, Iterator

from ..errors import BrokerTimeout, KeyMismatch
from ..policy import CONNECT_TIMEOUT


class Requests:
    """One client's requests in flight, by request number.

    ``seq`` numbers them (the client's counter, shared with its task ids); ``sender``
    is flushed first, so that a request (a cancel, say) follows the tasks it names;
    ``link`` (BrokerLink) says whether the broker is answering at all.
    """

    def __init__(self, seq: Iterator[int], sender, link) -> None:
        self._seq = seq
        self._sender = sender
        self._link = link
        self._pending: dict[int, tuple[concurrent.futures.Future, Callable | None]] = {}
        self._asked: dict[int, Callable[[int], None]] = {}  # open requests' senders: re-sent

    def new(self, on_reply: Callable | None) -> tuple[int, concurrent.futures.Future]:
        """A request number and the future its reply completes (after on_reply(reply))."""
        rq = next(self._seq)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._pending[rq] = (fut, on_reply)
        return rq, fut

    def ask(self, kind: str, send: Callable[[int], None], timeout: float = CONNECT_TIMEOUT,
            on_reply: Callable | None = None, again: bool = True) -> Any:
        """send(rq) a request to the broker and wait for its reply; with again, it is sent
        again after the broker restarts or comes back."""
        self._link.check()
        rq, fut = self.new(on_reply)
        self._sender.flush()  # a request (a cancel, say) must follow the tasks it names
        if again:
            self._asked[rq] = send
        send(rq)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            self._pending.pop(rq, None)
            if self._link.silent:
                raise self._link.unavailable_error() from None
            raise BrokerTimeout(f"the broker at {self._link.address} did not answer {kind!r} "
                                f"within {timeout:g} s: check that it runs there (`nbq broker`) "
                                "and that this machine reaches it, then try again") from None
        finally:
            self._asked.pop(rq, None)

    def answer(self, header: dict) -> None:
        """A reply or welcome (receiver thread): complete its request's future."""
        entry = self._pending.pop(header.get("rq"), None)
        if entry is None:
            return
        fut, on_reply = entry
        if header.get("refused"):  # a welcome: this client's key is not the cluster's
            fut.set_exception(KeyMismatch(header["refused"]))
            return
        result = header.get("r")
        try:
            if on_reply is not None:
                on_reply(result)
        except Exception as e:
            fut.set_exception(e)
        else:
            fut.set_result(result)

    def fail_all(self, error: BaseException) -> None:
        """Every open request fails with error (the client gave up on its broker)."""
        for rq in list(self._pending):
            entry = self._pending.pop(rq, None)
            if entry is not None:
                entry[0].set_exception(error)

    def resend(self) -> None:
        """Send the open requests again (a restarted broker, or one back after a silence)."""
        for rq, send in list(self._asked.items()):
            if rq in self._pending:
                send(rq)
