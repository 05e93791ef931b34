"""An embedded, real S3 server: moto's HTTP server in a subprocess on 127.0.0.1.

Used by ``hydraserve demo`` / ``hydraserve up`` (the one-machine default) and by the tests
(the ``s3_server`` fixture in tests/conftest.py). Clients talk to it over real HTTP with the
S3 protocol, exactly as they would talk to AWS, through :mod:`hydraserve.weights.s3`.

moto keeps its objects in memory: a killed server forgets them. Objects put with
:meth:`EmbeddedS3.upload_file` / :meth:`upload_dir` and buckets made with
:meth:`create_bucket` are remembered in a seed file and loaded into the new process before it
opens its port, so ``kill()`` + ``start()`` (or ``restart()``) brings back the same port with
the same objects. With ``persist=True`` (the stack's) every object any client puts (``model
push``) is also written through to the state directory as it is put, and loaded back at a
restart; otherwise call :meth:`snapshot` before ``kill()``, or :meth:`remember` for single files.

By default the server accepts any credentials (moto's default). With ``require_auth=True``
IAM authentication is on from the first request and only :attr:`credentials` (made here, kept
across restarts) are accepted.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from hydraserve.processes import free_port
from hydraserve.weights.s3 import S3Client, S3Credentials

REGION = "us-east-1"


TEST_CREDENTIALS = S3Credentials("hydraserve-test", "hydraserve-test-secret")
CREDENTIALS_FILE = "credentials.json"


def _new_credentials(state_dir: Path) -> S3Credentials:
    """A fresh access key, written (0600) where the server reads it at each start."""
    alphabet = string.ascii_uppercase + string.digits
    credentials = S3Credentials("AKIA" + "".join(secrets.choice(alphabet) for _ in range(16)),
                                secrets.token_urlsafe(30))
    path = state_dir / CREDENTIALS_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({"access_key_id": credentials.access_key_id,
                   "secret_access_key": credentials.secret_access_key}, out)
    return credentials


class EmbeddedS3:
    """A moto S3 server subprocess with a stable endpoint across kill/start."""

    def __init__(self, port: int | None = None, *, host: str = "127.0.0.1",
                 require_auth: bool = False, persist: bool = False, startup_timeout_s: float = 30.0,
                 prefix: Sequence[str] = ()) -> None:
        self.host = host
        self.prefix = list(prefix)  # e.g. ["ip", "netns", "exec", NS]: serve from an emulated node
        # In a namespace of its own (prefix) every port is free, and host is not ours to bind here.
        self.port = port or (free_port(host) if not prefix else 20000 + secrets.randbelow(30000))
        self.require_auth = require_auth
        self.startup_timeout_s = startup_timeout_s
        self.persist = persist
        self._state_dir = Path(tempfile.mkdtemp(prefix="hydraserve-s3-"))
        self.credentials: S3Credentials = _new_credentials(self._state_dir) if require_auth else TEST_CREDENTIALS
        self._seed_path = self._state_dir / "seed.json"
        self._log_path = self._state_dir / "moto.log"
        self._seed: dict[str, list] = {"buckets": [], "objects": []}
        self._proc: subprocess.Popen[bytes] | None = None

    # ----------------------------------------------------------------- lifecycle

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def lost(self) -> bool:
        """It exited without being asked to (killed, crashed): a supervisor starts it again."""
        return self._proc is not None and self._proc.poll() is not None

    def start(self) -> EmbeddedS3:
        """Start the server (seeded with everything remembered) and wait until it answers."""
        if self.running:
            return self
        self._seed_path.write_text(json.dumps(self._seed))
        log = open(self._log_path, "ab")  # the child keeps its own copy of the fd
        try:
            self._proc = subprocess.Popen(
                [*self.prefix, sys.executable, "-m", "hydraserve.embedded.moto_main", "--host", self.host,
                 "--port", str(self.port), "--seed", str(self._seed_path), *self._options()],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "MOTO_PORT": str(self.port)},
            )
        finally:
            log.close()
        atexit.register(self.stop)  # never leave a moto process behind a crashed caller
        self._wait_ready()
        return self

    def _options(self) -> list[str]:
        options = ["--store", str(self._state_dir / "store")] if self.persist else []
        if self.require_auth:
            options += ["--credentials", str(self._state_dir / CREDENTIALS_FILE)]
        return options

    def kill(self) -> None:
        """Kill the server abruptly (SIGKILL): in-flight requests see a dropped connection."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait(timeout=10)
        self._proc = None

    def stop(self) -> None:
        """Stop the server gracefully (SIGTERM, then SIGKILL after 5 s)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        self._proc = None

    def restart(self) -> EmbeddedS3:
        """kill() then start() on the same port, with the remembered objects."""
        self.kill()
        return self.start()

    def close(self) -> None:
        """Stop the server and delete its state directory."""
        self.stop()
        atexit.unregister(self.stop)
        shutil.rmtree(self._state_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedS3:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        url = f"{self.endpoint_url}/moto-api/"
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self._proc.returncode}: "
                                   f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1):
                    return
            except urllib.error.HTTPError:
                return  # it answered
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"moto server did not answer on {self.endpoint_url} within "
                           f"{self.startup_timeout_s} s: {self.log_tail()}")

    def log_tail(self, n: int = 2000) -> str:
        """The end of the server's log (requests, tracebacks): for error messages."""
        try:
            return self._log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    # ----------------------------------------------------------------- clients and data

    def client_env(self) -> dict[str, str]:
        """Environment for subprocesses (loaderd, workers) that should use this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.credentials.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.credentials.secret_access_key,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self, **kwargs: Any) -> S3Client:
        """Our S3 client pointed at this server with its credentials."""
        return S3Client(endpoint_url=self.endpoint_url, credentials=self.credentials, **kwargs)

    def create_bucket(self, name: str) -> None:
        """Create a bucket (no error if it exists) and remember it across restarts."""
        self.client().create_bucket(name, exist_ok=True)
        if name not in self._seed["buckets"]:
            self._seed["buckets"].append(name)

    def snapshot(self) -> int:
        """Remember every object the server holds now (from any client), replacing what was
        remembered; returns how many. Call before kill() when a restart must bring back
        objects written by other clients (push_model, loaderd tests). Copies the bytes to the
        state directory, so keep it for test-sized data."""
        client = self.client()
        directory = Path(tempfile.mkdtemp(prefix="snapshot-", dir=self._state_dir))
        seed: dict[str, list] = {"buckets": client.list_buckets(), "objects": []}
        for bucket in seed["buckets"]:
            for obj in client.list_prefix(bucket, ""):
                path = directory / f"{len(seed['objects']):06d}"
                path.write_bytes(client.get_object_bytes(bucket, obj.key))
                seed["objects"].append({"bucket": bucket, "key": obj.key, "path": str(path)})
        self._seed = seed
        return len(seed["objects"])

    def remember(self, bucket: str, key: str, path: str | Path) -> None:
        """Reload ``path`` as s3://bucket/key whenever the server (re)starts."""
        if bucket not in self._seed["buckets"]:
            self._seed["buckets"].append(bucket)
        self._seed["objects"] = [o for o in self._seed["objects"]
                                 if (o["bucket"], o["key"]) != (bucket, key)]
        self._seed["objects"].append({"bucket": bucket, "key": key,
                                      "path": str(Path(path).resolve())})

    def upload_file(self, path: str | Path, bucket: str, key: str, *, client: S3Client | None = None,
                    create_bucket: bool = True) -> None:
        """Put one local file and remember it across restarts."""
        if create_bucket:
            self.create_bucket(bucket)
        (client or self.client()).put_file(bucket, key, Path(path))
        self.remember(bucket, key, path)

    def upload_dir(self, local_dir: str | Path, bucket: str, prefix: str) -> str:
        """Put every file of a flat directory under ``prefix``; returns its s3:// URI."""
        prefix = prefix.strip("/")
        self.create_bucket(bucket)
        client = self.client()
        for path in sorted(Path(local_dir).iterdir()):
            if path.is_file():
                self.upload_file(path, bucket, f"{prefix}/{path.name}" if prefix else path.name,
                                 client=client, create_bucket=False)
        return f"s3://{bucket}/{prefix}"
