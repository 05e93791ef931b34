"""``hydraserve model push DIR s3://bucket/prefix``: upload a model directory, manifest last.

Wired into the ``model`` command group by hydraserve.cli.model through
:func:`configure_push`; the embedded demo and tests call :func:`push_model` directly. The
manifest (sizes + sha256 per file, and, format 2, per safetensors header and tensor so
loaderd can verify each tensor as it lands; hydraserve.contracts.model) is written after every file, and an
old one is deleted before the first byte goes up, so a manifest present at the prefix always
describes a complete upload. boto3 and tqdm are imported inside the handler only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hydraserve.contracts.model import ModelManifest
    from hydraserve.weights.s3 import S3Client


def push_model(local_dir: str | Path, uri: str, endpoint_url: str | None = None, progress: bool = True,
               *, create_bucket: bool = False, client: S3Client | None = None) -> ModelManifest:
    """Upload every file of ``local_dir`` under ``uri`` (multipart for big files), then the
    manifest; returns the manifest. Raises StorageError / TemporaryError / InvalidRequestError.
    """
    from tqdm import tqdm

    from hydraserve.contracts.model import MANIFEST_FILE
    from hydraserve.weights.manifest import compute_manifest, model_dir_files
    from hydraserve.weights.s3 import S3Client, parse_s3_uri

    target = parse_s3_uri(uri)
    local = Path(local_dir)
    files = model_dir_files(local)
    s3 = client or S3Client(endpoint_url)
    total = sum(p.stat().st_size for p in files)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="sha256",
              disable=not progress, file=sys.stderr) as bar:
        manifest = compute_manifest(local, on_bytes=bar.update)
    if create_bucket:
        s3.create_bucket(target.bucket, exist_ok=True)
    manifest_key = target.child(MANIFEST_FILE)
    s3.delete(manifest_key.bucket, manifest_key.key)
    with tqdm(total=manifest.total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
              desc=f"push {target}", disable=not progress, file=sys.stderr) as bar:
        for path in files:
            obj = target.child(path.name)
            s3.put_file(obj.bucket, obj.key, path, callback=bar.update)
    s3.put_bytes(manifest_key.bucket, manifest_key.key,
                 manifest.model_dump_json(indent=1).encode(), content_type="application/json")
    return manifest


def configure_push(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``push`` to the ``model`` group (``subparsers`` is its add_subparsers() action)."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "push", help="upload a model directory to S3 (manifest written last)",
        description="Upload a Hugging Face model directory to s3://bucket/prefix with a "
                    "progress bar; write hydraserve-manifest.json (sizes, sha256 per file and per tensor) last.")
    p.add_argument("dir", help="local model directory (config.json, tokenizer, *.safetensors)")
    p.add_argument("uri", help="destination, s3://bucket/prefix")
    p.add_argument("--endpoint-url", default=None,
                   help="S3 endpoint (default: AWS_ENDPOINT_URL or AWS)")
    p.add_argument("--create-bucket", action="store_true", help="create the bucket if missing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_push)
    return p


def push_checked(local_dir: str | Path, uri: str, endpoint_url: str | None = None, *, progress: bool = True,
                 create_bucket: bool = False) -> ModelManifest:
    """``push_model`` of a directory the serving engine can serve: one it cannot is refused,
    saying what to fix, before a byte is uploaded (hydraserve.weights.servable)."""
    import json

    from hydraserve.errors import NotFoundError
    from hydraserve.weights.servable import check_servable

    directory = Path(local_dir)
    if not directory.is_dir():
        raise NotFoundError(f"{local_dir} is not a directory")
    files = [p.name for p in directory.iterdir() if p.is_file()]
    config = json.loads((directory / "config.json").read_text()) if "config.json" in files else {}
    check_servable(config, str(local_dir), files)
    return push_model(directory, uri, endpoint_url, progress=progress, create_bucket=create_bucket)


def _run_push(args: argparse.Namespace) -> int:
    from hydraserve.errors import HydraError

    try:
        manifest = push_checked(args.dir, args.uri, args.endpoint_url, progress=not args.no_progress,
                                create_bucket=args.create_bucket)
    except HydraError as exc:
        print(f"hydraserve model push: {exc.message}", file=sys.stderr)
        return 1
    print(f"pushed {len(manifest.files)} files, {manifest.total_bytes} bytes to {args.uri}")
    return 0
