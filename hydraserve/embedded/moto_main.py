"""Subprocess entry point of the embedded S3 server: seed moto's store, then serve HTTP.

Started by :class:`hydraserve.embedded.s3.EmbeddedS3` as ``python -m
hydraserve.embedded.moto_main``. moto keeps objects in memory, so a killed server loses them.
Everything below happens BEFORE the port opens, so a restarted server answers with the same
objects and keys from its first request (no window of NoSuchBucket or refused keys):
- the seed file (JSON written by EmbeddedS3) lists buckets and local files to load;
- ``--store DIR``: objects put since the first start (by any client: ``model push``, loaderd
  tests) were written through to DIR as they were put, and are loaded back; puts and deletes
  from now on are written through again;
- ``--credentials FILE``: IAM authentication is on from the first request and the one user it
  holds has the access key in FILE, the same across restarts (moto's IAM is in memory too).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

ACCOUNT = "123456789012"  # moto's DEFAULT_ACCOUNT_ID (imported after the auth setting is made)


def _backend() -> Any:
    from moto.s3.models import s3_backends

    return s3_backends[ACCOUNT]["aws"]


def _ensure_bucket(backend: Any, name: str) -> None:
    """The seed and the store may both name a bucket."""
    if name not in backend.buckets:
        backend.create_bucket(name, "us-east-1")


def _seed(seed_file: Path) -> None:
    backend = _backend()
    seed = json.loads(seed_file.read_text())
    for bucket in seed.get("buckets", []):
        _ensure_bucket(backend, bucket)
    for obj in seed.get("objects", []):
        backend.put_object(obj["bucket"], obj["key"], Path(obj["path"]).read_bytes())


class WriteThrough:
    """Every bucket made and object put or deleted, mirrored in a directory (bytes in files, an
    index rewritten atomically), loaded back at the next start."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "objects").mkdir(parents=True, exist_ok=True)
        self._index_path = root / "index.json"
        self._lock = threading.Lock()
        self.index: dict[str, Any] = json.loads(self._index_path.read_text()) if self._index_path.exists() \
            else {"buckets": [], "objects": {}}

    def load(self) -> None:
        backend = _backend()
        for bucket in self.index["buckets"]:
            _ensure_bucket(backend, bucket)
        for name, (bucket, key) in self.index["objects"].items():
            backend.put_object(bucket, key, (self.root / "objects" / name).read_bytes())

    def install(self) -> None:
        """Wrap the backend's writes (multipart completion puts through put_object too)."""
        backend = _backend()
        put, delete, create = backend.put_object, backend.delete_object, backend.create_bucket

        def put_object(bucket: str, key: str, value: bytes, *args: Any, **kwargs: Any) -> Any:
            stored = put(bucket, key, value, *args, **kwargs)
            self._put(bucket, key, bytes(value))
            return stored

        def delete_object(bucket: str, key: str, *args: Any, **kwargs: Any) -> Any:
            deleted = delete(bucket, key, *args, **kwargs)
            self._delete(bucket, key)
            return deleted

        def create_bucket(bucket: str, *args: Any, **kwargs: Any) -> Any:
            made = create(bucket, *args, **kwargs)
            with self._lock:
                if bucket not in self.index["buckets"]:
                    self.index["buckets"].append(bucket)
                    self._save()
            return made

        backend.put_object, backend.delete_object, backend.create_bucket = put_object, delete_object, create_bucket

    @staticmethod
    def _name(bucket: str, key: str) -> str:
        return hashlib.sha256(f"{bucket}/{key}".encode()).hexdigest()

    def _put(self, bucket: str, key: str, value: bytes) -> None:
        name = self._name(bucket, key)
        with self._lock:
            partial = self.root / "objects" / f"{name}.partial"
            partial.write_bytes(value)
            os.replace(partial, self.root / "objects" / name)
            self.index["objects"][name] = [bucket, key]
            self._save()

    def _delete(self, bucket: str, key: str) -> None:
        name = self._name(bucket, key)
        with self._lock:
            if self.index["objects"].pop(name, None) is not None:
                (self.root / "objects" / name).unlink(missing_ok=True)
                self._save()

    def _save(self) -> None:
        partial = self._index_path.with_suffix(".partial")
        partial.write_text(json.dumps(self.index))
        os.replace(partial, self._index_path)


def _require(credentials_file: Path) -> None:
    """One IAM user allowed everything, with exactly the access key in the file."""
    from moto.iam.models import iam_backends

    keys = json.loads(credentials_file.read_text())
    iam = iam_backends[ACCOUNT]["global"]
    iam.create_user(region_name="us-east-1", user_name="hydraserve")
    iam.put_user_policy("hydraserve", "all", json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    key = iam.create_access_key("hydraserve")
    key.access_key_id, key.secret_access_key = keys["access_key_id"], keys["secret_access_key"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--seed", type=Path, default=None)
    parser.add_argument("--store", type=Path, default=None, help="write every put through to this directory")
    parser.add_argument("--credentials", type=Path, default=None, help="JSON access key: authentication on")
    args = parser.parse_args()
    if args.credentials is not None:
        os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"  # read once, when moto is imported
        _require(args.credentials)
    if args.seed is not None and args.seed.exists():
        _seed(args.seed)
    if args.store is not None:
        store = WriteThrough(args.store)
        store.load()
        store.install()
    from moto.server import main as moto_main

    moto_main(["-H", args.host, "-p", str(args.port)])


if __name__ == "__main__":
    main()
