"""Bearer tokens for every internal API: the services' own (one secret per service, from a 0600
file, never on a command line or in a log), loaderd's per-node keys, workers' tokens scoped to
one model, some nodes and a time, and peer tokens good only for one loaderd reading another's
bytes.

loaderd's keys come from the install's loaderd secret and the node's name (``NodeKeys``): its
admin token is ``HMAC(secret, node)``, so an admin token seen at one node is useless at another,
and a peer key shared by the daemons signs peer tokens. A daemon never sends its admin token
anywhere: a peer read carries a token naming the reader, the holder and a minute of validity,
which the holder accepts for ``/v1/range`` only.

A worker token is ``hs2.<payload>.<mac>[.<mac>...]``: the payload (base64url JSON: subject,
model URI, the nodes it is for, its expiry) and one HMAC-SHA256 per node under that node's key,
so each loaderd checks it without keeping a list, a token is good only at the nodes it names and
only until it expires, and a worker holding one can read only its own model's bytes and release
only its own leases (hydraserve.loaderd.api decides what each may do). It expires because it
sits in a Secret readable in the function's namespace; a long-lived pod keeps a valid one by
reading it from the Secret's file whenever the file changes (``TokenFile``), which the
interceptor rewrites well before the token in it expires.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from hydraserve.errors import UnauthorizedError

if TYPE_CHECKING:  # Flask only where a Flask app installs the check: never in a vLLM process
    from flask import Flask

PUBLIC_PATHS = frozenset({"/healthz", "/metrics"})  # probes and scrapes: counters only
_WORKER_PREFIX = "hs2."
_PEER_PREFIX = "hsp1."
PEER_TOKEN_TTL_S = 60.0  # a peer token is minted per read: a minute covers any clock skew we tolerate
# A worker or peer token as it would appear in text (blanked out of logs read back: provider/embedded/process.py).
SCOPED_TOKEN = re.compile(r"(?:hs[0-9]+|hsp[0-9]+)\.[A-Za-z0-9_=-]+(?:\.[A-Za-z0-9_-]+)+")


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: the service's admin (every route), a scoped worker, or a peer
    loaderd (``peer``: reads of byte ranges only)."""

    subject: str
    admin: bool
    model_uri: str | None = None
    peer: bool = False


ADMIN = Principal(subject="admin", admin=True)
Authenticate = Callable[[str], Principal | None]


def read_token(token_file: str | Path | None, env_var: str) -> str:
    """A service's token from a 0600 file, else the environment variable ``env_var``."""
    if token_file:
        path = Path(token_file)
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SystemExit(f"{path}: token file must not be readable by group/others (chmod 600)")
        return path.read_text().strip()
    token = os.environ.get(env_var, "")
    if not token:
        raise SystemExit(f"give --token-file or set {env_var}")
    return token


def new_token_file(directory: str | Path | None = None, prefix: str = "token-") -> tuple[str, Path]:
    """A random token written to a new 0600 file (for --token-file)."""
    token = secrets.token_urlsafe(24)
    fd, path = tempfile.mkstemp(prefix=prefix, dir=directory)
    os.fchmod(fd, 0o600)
    os.write(fd, token.encode())
    os.close(fd)
    return token, Path(path)


def write_token_file(path: Path, token: str) -> Path:
    """``token`` into ``path``, readable by its owner only (created 0600, never wider)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    return path


def check_secret(secret: str) -> str:
    if len(secret) < 16:
        raise ValueError("a service token must be at least 16 characters")
    return secret


def admin_only(secret: str) -> Authenticate:
    """Accept exactly the service's secret."""
    expected = check_secret(secret).encode()
    return lambda token: ADMIN if hmac.compare_digest(token.encode(), expected) else None


@dataclass(frozen=True)
class NodeKeys:
    """One loaderd's keys, derived from the install's loaderd secret and its node's name: its
    admin token (also the key its workers' tokens are signed with at this node) and the peer key
    every daemon shares (peer tokens only). Derived, not stored: a DaemonSet hands every node the
    same Secret, so per-node keys are the most the install allows."""

    node: str
    admin: str = field(repr=False)
    peer: str = field(repr=False)

    @classmethod
    def derive(cls, install_secret: str, node: str) -> NodeKeys:
        return cls(node=node, admin=node_admin_token(install_secret, node), peer=_derive(install_secret, "peer"))


def node_admin_token(install_secret: str, node: str) -> str:
    """Node ``node``'s loaderd admin token: what the control plane sends to that daemon only."""
    if not node:
        raise ValueError("a loaderd's keys need its node's name")
    return _derive(install_secret, "node\0" + node)


def _derive(install_secret: str, purpose: str) -> str:
    digest = hmac.new(check_secret(install_secret).encode(), f"hydraserve loaderd {purpose}".encode(),
                      hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def loaderd_authenticator(keys: NodeKeys, clock: Callable[[], float] = time.time) -> Authenticate:
    """Accept this node's admin token, a worker token naming this node, or a peer token for
    this node. An expired token or one for other nodes raises UnauthorizedError saying so."""
    admin = admin_only(keys.admin)

    def authenticate(token: str) -> Principal | None:
        if token.startswith(_WORKER_PREFIX):
            return verify_worker_token(keys, token, clock())
        if token.startswith(_PEER_PREFIX):
            return verify_peer_token(keys, token, clock())
        if token.startswith("hs1."):
            raise UnauthorizedError("this worker token has no expiry (hs1): no longer accepted; the interceptor "
                                    "writes a new one into the function's worker Secret")
        return admin(token)
    return authenticate


def mint_worker_token(node_keys: Mapping[str, str], *, subject: str, model_uri: str, expires_at: float) -> str:
    """A token that lets ``subject`` read ``model_uri`` and release its own leases at the loaderd
    of each node in ``node_keys`` (node -> that node's admin token), until ``expires_at`` (unix s)."""
    if not node_keys:
        raise ValueError("a worker token is for at least one node")
    nodes = sorted(node_keys)
    claims = {"sub": subject, "model": model_uri, "nodes": nodes, "exp": int(expires_at)}
    payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
    macs = ".".join(_mac(node_keys[n], _WORKER_PREFIX + payload) for n in nodes)
    return f"{_WORKER_PREFIX}{payload}.{macs}"


def worker_token_claims(token: str) -> dict[str, object] | None:
    """The claims of a worker token, NOT verified (to see when one is due for renewal)."""
    try:
        claims = json.loads(_unb64(token[len(_WORKER_PREFIX):].split(".", 1)[0]))
    except (ValueError, IndexError):
        return None
    return claims if token.startswith(_WORKER_PREFIX) and isinstance(claims, dict) else None


def verify_worker_token(keys: NodeKeys, token: str, now: float) -> Principal | None:
    """The worker a token names, if it is signed for this node and not expired; None if it is
    not a valid token at all."""
    payload, *macs = token[len(_WORKER_PREFIX):].split(".")
    claims = worker_token_claims(token)
    if claims is None:
        return None
    nodes = claims.get("nodes")
    if not isinstance(nodes, list) or len(nodes) != len(macs):
        return None
    if keys.node not in nodes:
        raise UnauthorizedError(f"this worker token is for the loaderd of node(s) {', '.join(map(str, nodes))[:200]}, "
                                f"not node {keys.node}")
    expected = _mac(keys.admin, _WORKER_PREFIX + payload)
    if not hmac.compare_digest(macs[nodes.index(keys.node)].encode(), expected.encode()):
        return None
    try:
        subject, model, exp = str(claims["sub"]), str(claims["model"]), float(claims["exp"])  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError):
        return None
    if now >= exp:
        raise UnauthorizedError(f"this worker token expired at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(exp))}; "
                                "its worker reads the renewed one from the function's worker Secret")
    return Principal(subject=subject, admin=False, model_uri=model)


def mint_peer_token(keys: NodeKeys, holder: str, now: float, ttl_s: float = PEER_TOKEN_TTL_S) -> str:
    """What ``keys.node``'s daemon sends to ``holder``'s to read byte ranges it holds: good there
    only, for ranges only, for ``ttl_s``. Its admin token never leaves it."""
    claims = {"from": keys.node, "to": holder, "exp": int(now + ttl_s) + 1}
    payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
    return f"{_PEER_PREFIX}{payload}.{_mac(keys.peer, _PEER_PREFIX + payload)}"


def verify_peer_token(keys: NodeKeys, token: str, now: float) -> Principal | None:
    payload, _, mac = token[len(_PEER_PREFIX):].partition(".")
    if not hmac.compare_digest(mac.encode(), _mac(keys.peer, _PEER_PREFIX + payload).encode()):
        return None
    try:
        claims = json.loads(_unb64(payload))
        reader, holder, exp = str(claims["from"]), str(claims["to"]), float(claims["exp"])
    except (ValueError, KeyError, TypeError):
        return None
    if holder != keys.node:
        raise UnauthorizedError(f"this peer token is for node {holder[:100]}'s loaderd, not node {keys.node}")
    if now >= exp:
        raise UnauthorizedError("this peer token expired (peer tokens live a minute: check the nodes' clocks)")
    return Principal(subject=f"peer:{reader}", admin=False, peer=True)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: str, payload: str) -> str:
    return _b64(hmac.new(key.encode(), payload.encode(), hashlib.sha256).digest())


class TokenFile:
    """A token read from a file, again whenever the file changes: a Secret mounted as a volume,
    which the kubelet swaps in place when the Secret is rewritten (a renewed worker token), so a
    pod serving for days always sends the current one. No file (an optional Secret not there):
    no token."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._seen: tuple[int, int, int] | None = None
        self._token = ""

    def __call__(self) -> str:
        try:
            st = self.path.stat()
        except OSError:
            return ""
        seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        if seen != self._seen:
            try:
                self._token = self.path.read_text().strip()
            except OSError:
                return self._token
            self._seen = seen
        return self._token


def bearer(header: str) -> str:
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def install_bearer_auth(app: Flask, authenticate: Authenticate) -> None:
    """Every route but /healthz and /metrics needs a bearer token ``authenticate`` accepts; the
    caller is ``g.principal``."""
    from flask import g, request

    @app.before_request
    def _auth() -> None:
        if request.path in PUBLIC_PATHS:
            return
        principal = authenticate(bearer(request.headers.get("Authorization", "")))
        if principal is None:
            raise UnauthorizedError("missing or wrong bearer token")
        g.principal = principal
