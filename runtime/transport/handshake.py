"""Both ends of a stage link prove they hold their group's secret before any frame crosses.

A pipeline group's launcher hands every stage one fresh secret (hydraserve.contracts.worker,
``link_secret``). Whoever reached a stage's port first used to be its previous stage; now a
link is a stage's only once both ends answered a challenge of the other's (mutual: neither a
fake head nor a fake next stage joins), over fresh nonces from both sides (a recorded
handshake replays into a wrong answer). Wire, before the first frame (docs/PROTOCOLS.md):

    dialer   -> acceptor  hello      b"HSPA" | version u8 (1) | dialer nonce (32 B)
    acceptor -> dialer    challenge  acceptor nonce (32 B) | HMAC(secret, ACCEPTOR | Nd | Na)
    dialer   -> acceptor  proof      HMAC(secret, DIALER | Nd | Na)
    acceptor -> dialer    welcome    b"HSOK"

HMAC is HMAC-SHA256; the role labels keep one side's answer from passing as the other's.
Answers are compared with hmac.compare_digest. The dialer's side blocks (``dial``); the
acceptor's is fed as bytes arrive (``Answer``), so hydraserve.runtime.transport.link can
answer several connections at once and a silent one holds no one up.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import socket

from hydraserve.errors import StageTransportError
from hydraserve.runtime.transport.frames import recv_exactly

MAGIC = b"HSPA"
VERSION = 1
NONCE_BYTES = 32
MAC_BYTES = hashlib.sha256().digest_size
HELLO_BYTES = len(MAGIC) + 1 + NONCE_BYTES
WELCOME = b"HSOK"
_ACCEPTOR = b"hydraserve stage link 1: acceptor"
_DIALER = b"hydraserve stage link 1: dialer"


class Refused(Exception):
    """A connection that did not prove it holds the group's secret (the reason, never the secret)."""


def _mac(secret: bytes, role: bytes, dialer_nonce: bytes, acceptor_nonce: bytes) -> bytes:
    return hmac.new(secret, role + dialer_nonce + acceptor_nonce, hashlib.sha256).digest()


def dial(sock: socket.socket, secret: bytes, peer: str) -> None:
    """The dialing end's handshake on a connected ``sock`` (its timeout bounds each wait: the
    acceptor answers only once it is loaded). StageTransportError if ``peer`` does not prove
    the secret or refuses ours."""
    mine = secrets.token_bytes(NONCE_BYTES)
    sock.sendall(MAGIC + bytes([VERSION]) + mine)
    challenge = bytes(recv_exactly(sock, NONCE_BYTES + MAC_BYTES, "stage-link challenge"))
    theirs, answer = challenge[:NONCE_BYTES], challenge[NONCE_BYTES:]
    if not hmac.compare_digest(answer, _mac(secret, _ACCEPTOR, mine, theirs)):
        raise StageTransportError(f"the stage at {peer} does not hold this group's link secret: not linked")
    sock.sendall(_mac(secret, _DIALER, mine, theirs))
    try:
        welcome = bytes(recv_exactly(sock, len(WELCOME), "stage-link welcome"))
    except StageTransportError:
        welcome = b""
    if welcome != WELCOME:
        raise StageTransportError(f"the stage at {peer} refused this stage's link (another group's secret?)")


class Answer:
    """The accepting end of one connection's handshake on a non-blocking socket: ``feed()``
    each time it is readable; True once the dialer proved the secret (welcomed). Reads never
    run past the handshake, so the first frame stays in the socket."""

    def __init__(self, sock: socket.socket, secret: bytes, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline  # time.monotonic() by which it must have proved the secret
        self._secret = secret
        self._nonce = secrets.token_bytes(NONCE_BYTES)
        self._theirs: bytes | None = None  # the dialer's nonce, once its hello came
        self._buf = bytearray()

    def feed(self) -> bool:
        """Take what arrived; Refused on anything but the handshake (or a wrong proof)."""
        want = HELLO_BYTES if self._theirs is None else MAC_BYTES
        data = self.sock.recv(want - len(self._buf))
        if not data:
            raise Refused(f"closed after {len(self._buf)} B of its {'hello' if self._theirs is None else 'proof'}")
        self._buf += data
        if len(self._buf) < want:
            return False
        got, self._buf = bytes(self._buf), bytearray()
        if self._theirs is None:
            self._hello(got)
            return False
        if not hmac.compare_digest(got, _mac(self._secret, _DIALER, self._theirs, self._nonce)):
            raise Refused("wrong proof: it does not hold this group's link secret")
        self._send(WELCOME)
        return True

    def _hello(self, hello: bytes) -> None:
        if hello[:len(MAGIC)] != MAGIC:
            raise Refused(f"not a stage-link hello (starts {hello[:len(MAGIC)]!r})")
        if hello[len(MAGIC)] != VERSION:
            raise Refused(f"stage-link handshake version {hello[len(MAGIC)]}, this stage speaks {VERSION}")
        self._theirs = hello[len(MAGIC) + 1:]
        self._send(self._nonce + _mac(self._secret, _ACCEPTOR, self._theirs, self._nonce))

    def _send(self, data: bytes) -> None:
        """A few bytes on a fresh connection: the kernel takes them at once, or the peer is not a stage."""
        if self.sock.send(data) != len(data):
            raise Refused(f"would not take {len(data)} B")
