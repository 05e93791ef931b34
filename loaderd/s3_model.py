"""Model indexes and ranged reads from S3, through hydraserve.weights (the only S3 client and
safetensors parser). Used by the daemon (hydraserve.loaderd.daemon.default_backends) and by the
runtime's direct-S3 fallback.

``resolve_model`` reads the listing (sizes, ETags), each safetensors header (one ranged GET per
file), the push manifest (sha256 per file; format 2 also per header and per tensor, the
header's checked here) and config.json (tied embeddings), and checks that
sizes agree: an object whose size no longer matches its manifest is refused before any byte is
fetched. ``S3RangeReader`` streams each range straight into the segment (no extra copy).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from hydraserve.errors import IntegrityError, StorageError
from hydraserve.loaderd.model_index import FileMeta, ModelIndex
from hydraserve.loaderd.segment import TensorSpec
from hydraserve.weights.layout import FIRST_STAGE_ROLES, Role, names_for_stage, role_of
from hydraserve.weights.manifest import read_manifest
from hydraserve.weights.model_files import S3ModelFiles, open_model
from hydraserve.weights.s3 import S3Client, S3Uri, parse_s3_uri, validate_file_name

log = logging.getLogger(__name__)

HEAD_ORDER = 1_000_000


def group_of(name: str) -> tuple[int, str]:
    """Segment group of a tensor and its streaming order: embeddings, layer 0.., then head."""
    role = role_of(name)
    if role.role is Role.LAYER and role.layer is not None:
        return 1 + role.layer, f"layer.{role.layer}"
    if role.role in FIRST_STAGE_ROLES:
        return 0, "embed"
    if role.role is Role.OTHER:
        return 0, "other"  # every stage takes these: their own group, shared by all stages
    return HEAD_ORDER, "head"


_clients: dict[str | None, S3Client] = {}
_clients_lock = threading.Lock()


def client_for(endpoint_url: str | None) -> S3Client:
    """One S3 client per endpoint for the process (creating one costs ~0.15 s of a cold start)."""
    with _clients_lock:
        client = _clients.get(endpoint_url)
        if client is None:
            client = _clients[endpoint_url] = S3Client(endpoint_url)
        return client


def _tied_embeddings(model: S3ModelFiles) -> bool:
    try:
        return bool(json.loads(model.read_bytes("config.json")).get("tie_word_embeddings", False))
    except (StorageError, ValueError):
        return False


def resolve_model(uri: str, endpoint_url: str | None = None, *, client: S3Client | None = None) -> ModelIndex:
    """The index of an ``s3://bucket/prefix`` model (validated URI; raises StorageError etc.).

    The listing (with a speculative GET of the shard index), the headers, the manifest and
    config.json are read concurrently: two round trips before the first tensor can be fetched."""
    location = parse_s3_uri(uri)
    client = client or client_for(endpoint_url)
    model = open_model(str(location), client=client)
    assert isinstance(model, S3ModelFiles)
    with ThreadPoolExecutor(max_workers=2) as pool:  # the LIST is shared: model.objects()
        manifest_f = pool.submit(read_manifest, model)
        tie_f = pool.submit(_tied_embeddings, model)
        headers = model.headers()
        listing = model.objects()
        manifest = manifest_f.result()
        tie = tie_f.result()
    files: dict[str, FileMeta] = {}
    for name, header in headers.items():
        obj = listing.get(name)
        if obj is None:
            raise StorageError(f"{uri}/{name} is listed in the index but not in the bucket", code="no_such_key")
        sha = head_sha = None
        tensor_sha: dict[str, str] | None = None
        if manifest is not None:
            try:
                entry = manifest.file(name)
            except KeyError:
                entry = None
            if entry is not None:
                if entry.size != obj.size:
                    raise IntegrityError(f"{uri}/{name}: {obj.size} B in S3, manifest says {entry.size} B")
                sha = entry.sha256
                head_sha, tensor_sha = entry.header_sha256, entry.tensors
                if tensor_sha is not None and set(tensor_sha) != set(header.entries):
                    raise IntegrityError(f"{uri}/{name}: header's tensors differ from the manifest's")
        if header.data_end > obj.size:
            raise IntegrityError(f"{uri}/{name}: header needs {header.data_end} B, object has {obj.size}")
        files[name] = FileMeta(name, obj.size, header.data_start, sha, obj.etag.strip('"') or None,
                               head_sha, tensor_sha)
    if manifest is None:
        log.warning("no push manifest: sizes are checked, and whole files against their ETags where those "
                    "are MD5s; no per-tensor sha256", extra={"model": uri})
    specs = [TensorSpec(name, loc.entry.dtype, tuple(loc.entry.shape), loc.file, loc.entry.start, loc.entry.end,
                        (files[loc.file].tensor_sha256 or {}).get(name))
             for name, loc in model.tensor_index().items()]
    specs.sort(key=lambda s: (s.file, s.start))
    # Format 2 manifests: the header that gave every tensor its dtype, shape and range must be
    # the pushed one (a tensor's hash covers its bytes, not how they are interpreted). The bytes
    # are the ones parsed above: no second GET.
    for f, meta in files.items():
        if meta.header_sha256 is not None and hashlib.sha256(model.header_bytes(f)).hexdigest() != meta.header_sha256:
            raise IntegrityError(f"{uri}/{f}: safetensors header does not match the manifest's sha256")

    index = ModelIndex(uri=str(location), endpoint_url=client.endpoint_url, files=files, tensors=specs,
                       group_of=group_of,
                       names_for_stage=lambda names, stage: names_for_stage(names, stage, tie),
                       read_header=model.header_bytes)
    index.handle = (client, location)

    def is_current() -> bool:
        now = {o.key.rsplit("/", 1)[-1]: o for o in client.list_prefix(location.bucket, location.key)}
        return all(f in now and now[f].size == m.size and (now[f].etag.strip('"') or None) == m.etag
                   for f, m in files.items())

    index.is_current = is_current

    def read_file(name: str) -> bytes:
        obj = location.child(validate_file_name(name))
        return bytes(client.get_object_bytes(obj.bucket, obj.key))

    index.read_file = read_file
    return index


class S3RangeReader:
    """RangeReader over one model's S3 prefix (the S3 client retries and resumes each range)."""

    kind = "s3"

    def __init__(self, index: ModelIndex) -> None:
        client, location = index.handle
        self._client: S3Client = client
        self._location: S3Uri = location
        self.label = str(location)

    def read(self, file: str, start: int, end: int) -> bytes:
        obj = self._location.child(file)
        return bytes(self._client.get_range(obj.bucket, obj.key, start, end))

    def read_into(self, file: str, start: int, out: memoryview) -> None:
        obj = self._location.child(file)
        self._client.get_range_into(obj.bucket, obj.key, start, out)
