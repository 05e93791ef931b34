"""Bearer tokens for every internal API: the services' own (one secret per service, from a 0600
file, never on a command line or in a log) and workers' tokens scoped to one model.

A scoped token is ``hs1.<payload>.<mac>``: the payload (base64url JSON: subject and model URI)
signed with HMAC-SHA256 under the service's secret, so loaderd checks it without keeping a
list, and a worker holding one can read only its own model's bytes and release only its own
leases (hydraserve.loaderd.api decides what each may do). The admin secret itself is never
handed to a worker.
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hydraserve.errors import UnauthorizedError

if TYPE_CHECKING:  # Flask only where a Flask app installs the check: never in a vLLM process
    from flask import Flask

PUBLIC_PATHS = frozenset({"/healthz", "/metrics"})  # probes and scrapes: counters only
_SCOPED_PREFIX = "hs1."
# A scoped token as it would appear in text (blanked out of logs read back: provider/embedded/process.py).
SCOPED_TOKEN = re.compile(re.escape(_SCOPED_PREFIX) + r"[A-Za-z0-9_=-]+\.[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: the service's admin (every route) or a scoped worker."""

    subject: str
    admin: bool
    model_uri: str | None = None


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


def admin_or_scoped(secret: str) -> Authenticate:
    """Accept the service's secret (admin) or a token it signed (scoped)."""
    admin = admin_only(secret)

    def authenticate(token: str) -> Principal | None:
        return admin(token) or verify_scoped_token(secret, token)
    return authenticate


def mint_scoped_token(secret: str, *, subject: str, model_uri: str) -> str:
    """A token that lets ``subject`` read ``model_uri`` and release its own leases."""
    payload = base64.urlsafe_b64encode(json.dumps({"sub": subject, "model": model_uri}).encode()).decode()
    return f"{_SCOPED_PREFIX}{payload}.{_mac(secret, payload)}"


def verify_scoped_token(secret: str, token: str) -> Principal | None:
    if not token.startswith(_SCOPED_PREFIX):
        return None
    payload, _, mac = token[len(_SCOPED_PREFIX):].partition(".")
    if not hmac.compare_digest(mac.encode(), _mac(secret, payload).encode()):
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload.encode()))
        return Principal(subject=str(claims["sub"]), admin=False, model_uri=str(claims["model"]))
    except (ValueError, KeyError, TypeError):
        return None


def _mac(secret: str, payload: str) -> str:
    digest = hmac.new(secret.encode(), payload.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


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
