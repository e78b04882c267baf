"""The link to the broker: heartbeats, a silent broker, one that restarted.

The receiver thread says hello every HEARTBEAT seconds.  A broker silent for
BROKER_SILENCE seconds is logged; after ``broker_grace`` seconds waits (Future.result,
MapResult, requests) raise BrokerUnavailable, and the work is kept, to be sent again to
a broker that answers with a new boot id (restarted) or after a silence.
"""
from __future__ import annotations

import concurrent.futures
import logging
import time

from ..errors import BrokerUnavailable
from ..policy import HEARTBEAT

log = logging.getLogger("nbq.client")

BROKER_SILENCE = 3.0     # a broker silent this long is logged, and gets everything again later
BROKER_GRACE = 30.0      # ... and after this long, waits raise BrokerUnavailable


class BrokerLink:
    """Whether one client's broker answers (receiver thread, but ``check``).

    ``lost`` is a plain future failed with BrokerUnavailable when the client gives up on
    the broker, and replaced when it answers again: waiting.py waits on it beside the
    user's futures.
    """

    def __init__(self, conn, address: str, grace: float, resend_after_silence: bool) -> None:
        """``resend_after_silence``: whether a broker back after a silence gets everything
        again (messages lost with a dropped link): not one that keeps its queues, nor one
        in this process."""
        self._conn = conn
        self.address = address
        self.grace = grace
        self._resend_after_silence = resend_after_silence
        self._boot: str | None = None  # the broker's boot id (ZeroMQ): a new one means a restart
        self._heard = time.monotonic()  # when the broker last said anything
        self._next_beat = 0.0
        self._connected = False    # welcomed once: from then on, heartbeats and silence count
        self.silent = False        # the broker has been silent for BROKER_SILENCE
        self._resend_due = False   # ... and gets everything again at its next welcome
        self.unavailable = False   # ... and for grace: waits raise BrokerUnavailable
        self.lost: concurrent.futures.Future = concurrent.futures.Future()

    def connected(self) -> None:
        """The first welcome came (Client() waits for it with its own timeout): from now on,
        heartbeats and silence count."""
        self._heard = time.monotonic()
        self._connected = True

    def check(self) -> None:
        """Raise BrokerUnavailable once the broker has been silent for grace seconds."""
        if self.unavailable:
            raise self.unavailable_error()

    def unavailable_error(self) -> BrokerUnavailable:
        return BrokerUnavailable(
            f"the broker at {self.address} has not answered for "
            f"{time.monotonic() - self._heard:.0f} s (broker_grace={self.grace:g} s): "
            "is it running? This client keeps its unfinished work and sends it again when a "
            "broker answers at that address; wait again, or shut the client down")

    def keep_alive(self, heard: bool) -> BrokerUnavailable | None:
        """Say hello every HEARTBEAT seconds; notice a broker gone silent, and one back.
        Returns the error to fail waits with when the client gives up on the broker now."""
        if not self._connected:
            return None
        now = time.monotonic()
        if heard:
            self._heard = now
            if self.silent:
                if self.unavailable:
                    self.lost = concurrent.futures.Future()
                self.silent = self.unavailable = False
                log.warning("the broker at %s answers again", self.address)
        if now >= self._next_beat:
            self._next_beat = now + HEARTBEAT
            self._conn.hello(None)
        quiet = now - self._heard
        if quiet > min(BROKER_SILENCE, self.grace) and not self.silent:
            self.silent = self._resend_due = True
            log.warning("the broker at %s has not answered for %.0f s; waiting for it "
                        "(broker_grace=%g s)", self.address, quiet, self.grace)
        if quiet > self.grace and not self.unavailable:
            return self._give_up()
        return None

    def _give_up(self) -> BrokerUnavailable:
        """grace has passed: waits raise from now on (the caller wakes them)."""
        self.unavailable = True
        error = self.unavailable_error()
        log.error("%s", error)
        self.lost.set_exception(error)
        return error

    def welcome(self, boot: str | None) -> bool:
        """A broker's welcome; True when it must get what this client has not seen finish:
        it has a new boot id (a restarted broker), or it is the first after a silence."""
        if boot is None:  # a transport without boot ids, or a hello Redis failed to answer
            boot = self._boot
        restarted = self._boot is not None and boot != self._boot
        self._boot = boot
        if restarted:
            log.warning("the broker at %s restarted: sending it this client's unfinished work",
                        self.address)
        # after a silence, messages lost with a dropped link are sent again (the broker skips
        # what it has)
        resend = restarted or (self._resend_due and self._resend_after_silence)
        self._resend_due = False
        return resend
