"""Subprocess entry point of the embedded S3 server: seed moto's store, then serve HTTP.

Started by :class:`hydraserve.embedded.s3.EmbeddedS3` as ``python -m
hydraserve.embedded.moto_main``. moto keeps objects in memory, so a killed server loses them;
the seed file (JSON written by EmbeddedS3) lists buckets and local files to load into the
store BEFORE the port opens, so a restarted server answers with the same objects from its
first request (no window where clients would see NoSuchBucket).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moto.core import DEFAULT_ACCOUNT_ID


def _seed(seed_file: Path) -> None:
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    seed = json.loads(seed_file.read_text())
    for bucket in seed.get("buckets", []):
        backend.create_bucket(bucket, "us-east-1")
    for obj in seed.get("objects", []):
        backend.put_object(obj["bucket"], obj["key"], Path(obj["path"]).read_bytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--seed", type=Path, default=None)
    args = parser.parse_args()
    if args.seed is not None and args.seed.exists():
        _seed(args.seed)
    from moto.server import main as moto_main

    moto_main(["-H", args.host, "-p", str(args.port)])


if __name__ == "__main__":
    main()
