"""ZeroMQ encryption and peer authentication (CURVE), with keys derived from the shared key.

The broker's and the peers' curve25519 key pairs are each derived from the
signing key (HMAC-SHA256 of a label, the secret key; its public key computed by
libzmq), so whoever holds the signing key can connect and nobody else can, with
no key to copy beside it.  The broker admits a peer only if its public key is
the peers' one (a ZAP handler served in the broker's loop).

Large frames between processes of one host travel through shared memory, with their
descriptor signed: shm.py states why that widens no one's reach.

CURVE is on when the broker binds, or a peer connects to, a TCP address that
is not loopback; ``NBQ_CURVE=1`` forces it on (e.g. a client on the broker's
host connecting to 127.0.0.1 of a broker bound to 0.0.0.0), ``NBQ_CURVE=0`` off.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os

import zmq
from zmq.utils import z85

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
_ON = ("1", "on", "yes", "true")
_OFF = ("0", "off", "no", "false")


def keypair(key: bytes, role: bytes) -> tuple[bytes, bytes]:
    """(public, secret) Z85 curve25519 keys of a role (b"broker" or b"peer") under the shared key."""
    secret = z85.encode(hmac.new(key, b"nbq curve25519 " + role, hashlib.sha256).digest())
    return zmq.curve_public(secret), secret


def needs_curve(address: str) -> bool:
    """Whether traffic to or from address is encrypted: NBQ_CURVE if set, else non-loopback TCP."""
    setting = os.environ.get("NBQ_CURVE", "").strip().lower()
    if setting in _ON or setting in _OFF:
        return setting in _ON
    if not address.startswith("tcp://"):
        return False
    host = address[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name or an interface name: may leave the host
        return True


def connect_curve(sock: zmq.Socket, key: bytes) -> None:
    """Make sock (before it connects) a CURVE client of the broker of this key."""
    public, secret = keypair(key, b"peer")
    sock.curve_serverkey = keypair(key, b"broker")[0]
    sock.curve_publickey = public
    sock.curve_secretkey = secret


class CurveGate:
    """Makes a socket (before it binds) a CURVE server admitting only holders of the key.

    ``sock`` is the ZAP socket to poll; call ``answer()`` when it is readable.
    """

    def __init__(self, server: zmq.Socket, key: bytes) -> None:
        public, secret = keypair(key, b"broker")
        self._peer = z85.decode(keypair(key, b"peer")[0])
        self.sock = server.context.socket(zmq.REP)
        self.sock.linger = 0
        self.sock.bind(ZAP_ENDPOINT)
        server.curve_secretkey = secret
        server.curve_publickey = public
        server.curve_server = True

    def answer(self) -> None:
        """Answer the pending ZAP requests: 200 for the peers' key, 400 for any other."""
        while self.sock.poll(0):
            request = self.sock.recv_multipart()
            version, rid, mechanism = request[0], request[1], request[5]
            ok = mechanism == b"CURVE" and len(request) > 6 and hmac.compare_digest(
                request[6], self._peer)
            self.sock.send_multipart([version, rid, b"200" if ok else b"400",
                                      b"OK" if ok else b"not a holder of the shared key",
                                      b"", b""])

    def close(self) -> None:
        self.sock.close(linger=0)
