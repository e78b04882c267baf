"""Refusing replayed messages: a window of message ids seen, per sender, and a maximum age.

Every signed header carries ``ms`` (the sending process), ``mn`` (its message
number, counting up) and ``mt`` (when it was sent; protocol.py).  A receiver
keeps, per sender, the highest number seen and a bitmap of the WIDTH numbers
below it (as IPsec's anti-replay window): a number seen before, or too far
below the highest to be told apart, is refused, and so is a message whose time
is further than ``max_age`` from the receiver's clock.  A sender is forgotten
once all its messages are too old to be accepted, so memory stays bounded
by the senders of the last ``max_age`` seconds.

Limits: a receiver that restarts remembers nothing, so a message captured
less than ``max_age`` before can be replayed once to the new receiver; and
clocks of senders and receivers must agree within ``max_age``.
"""
from __future__ import annotations

WIDTH = 4096          # message numbers remembered below a sender's highest
DEFAULT_MAX_AGE = 300.0  # seconds: also the clock difference tolerated between hosts


class ReplayWindow:
    """Says whether a verified header is a replay (or too old) and remembers it if not."""

    __slots__ = ("max_age", "_senders")

    def __init__(self, max_age: float = DEFAULT_MAX_AGE) -> None:
        self.max_age = max_age
        self._senders: dict[str, list] = {}  # sender -> [highest number, bitmap, latest time]

    def refuse(self, header: dict, now: float) -> str | None:
        """Why a message must be refused (a replay, too old, no id), or None: then it is remembered."""
        sender, number, sent = header.get("ms"), header.get("mn"), header.get("mt")
        if (type(sender) is not str or type(number) is not int or number < 0
                or type(sent) not in (float, int)):
            return "its header has no valid message id and time (ms, mn, mt)"
        if not now - self.max_age <= sent <= now + self.max_age:
            return (f"it was sent {now - sent:.0f} s ago by the receiver's clock, more than the "
                    f"maximum age of {self.max_age:g} s (a replay, or clocks that disagree)")
        state = self._senders.get(sender)
        if state is None:
            self._senders[sender] = [number, 1, sent]
            return None
        top, seen = state[0], state[1]
        if number > top:
            shift = number - top
            state[0] = number
            state[1] = 1 if shift >= WIDTH else ((seen << shift) | 1) & _FULL
        else:
            bit = top - number
            if bit >= WIDTH:
                return f"its message number is too far behind its sender's latest ({WIDTH})"
            if seen >> bit & 1:
                return "it was received before (a replay)"
            state[1] = seen | (1 << bit)
        if sent > state[2]:
            state[2] = sent
        return None

    def forget(self, now: float) -> None:
        """Drop senders whose every message is now too old to be accepted anyway."""
        old = now - self.max_age
        for sender in [s for s, state in self._senders.items() if state[2] < old]:
            del self._senders[sender]

    def __len__(self) -> int:
        return len(self._senders)


_FULL = (1 << WIDTH) - 1
