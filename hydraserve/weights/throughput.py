"""Measure S3TensorSource throughput: a checkpoint fetched with N concurrent ranges of C bytes.

``python -m hydraserve.weights.throughput [--endpoint-url URL] [--mb 64]`` writes a llama-shaped
safetensors checkpoint of about ``--mb`` MB, uploads it (to the given endpoint, or to an
embedded moto server started for the run) and prints MB/s for every (concurrency, chunk)
pair, plus the raw single-GET rate of the object store (DESIGN.md §6: report the store's own
throughput beside every result). Used by the loader benchmark and to pick defaults.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from hydraserve.weights.ranges import MiB
from hydraserve.weights.s3 import S3Client


def write_checkpoint(out: Path, total_mb: int, layers: int = 8) -> Path:
    """A llama-named fp32 checkpoint of about ``total_mb`` MB (random bytes, real header)."""
    import torch
    from safetensors.torch import save_file

    per_tensor = total_mb * 1_000_000 // (layers * 4 + 2) // 4  # fp32 elements
    cols = 1024
    rows = max(1, per_tensor // cols)
    tensors = {"model.embed_tokens.weight": torch.rand(rows, cols), "lm_head.weight": torch.rand(rows, cols)}
    for i in range(layers):
        for part in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
            tensors[f"model.layers.{i}.{part}.weight"] = torch.rand(rows, cols)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text('{"model_type": "llama"}')
    return out


def measure(client: S3Client, uri: str, concurrency: int, chunk_bytes: int,
            repeats: int = 2) -> tuple[float, float]:
    """Best MB/s of ``repeats`` whole-checkpoint fetches through S3TensorSource, and the
    seconds until layer 0 could be loaded (what overlapping load with fetch starts from)."""
    from hydraserve.weights.model_files import open_model
    from hydraserve.weights.s3_source import S3TensorSource

    model = open_model(uri, client=client)
    layer0 = next(n for n in model.tensor_index() if n.startswith("model.layers.0."))
    best, first = 0.0, float("inf")
    for _ in range(repeats):
        started = time.monotonic()
        source = model.tensor_source(concurrency=concurrency, chunk_bytes=chunk_bytes)
        assert isinstance(source, S3TensorSource)
        source.get(layer0)
        first = min(first, time.monotonic() - started)
        source.wait_all()
        elapsed = time.monotonic() - started
        best = max(best, source.total_bytes / elapsed / 1e6)
        source.close()
    return best, first


def raw_get_rate(client: S3Client, bucket: str, key: str, size: int) -> float:
    started = time.monotonic()
    client.get_range(bucket, key, 0, size)
    return size / (time.monotonic() - started) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint-url", default=None, help="default: start an embedded moto server")
    parser.add_argument("--mb", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--chunk-mib", type=int, nargs="+", default=[8, 32])
    args = parser.parse_args()
    from hydraserve.weights.push import push_model

    server = None
    if args.endpoint_url is None:
        from hydraserve.embedded.s3 import EmbeddedS3

        server = EmbeddedS3().start()
        client = server.client()
    else:
        client = S3Client(args.endpoint_url)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = write_checkpoint(Path(tmp) / "m", args.mb)
            push_model(model_dir, "s3://throughput/m", client=client, progress=False,
                       create_bucket=True)
            size = client.head("throughput", "m/model.safetensors").size
            print(f"checkpoint {size / 1e6:.1f} MB at {client.endpoint_url}")
            print(f"raw single GET of the whole object: {raw_get_rate(client, 'throughput', 'm/model.safetensors', size):.0f} MB/s")
            for chunk in args.chunk_mib:
                for conc in args.concurrency:
                    rate, first = measure(client, "s3://throughput/m", conc, chunk * MiB)
                    print(f"concurrency {conc:2d}  chunk {chunk:3d} MiB  {rate:7.1f} MB/s  "
                          f"layer 0 ready after {first:.2f} s")
    finally:
        if server is not None:
            server.close()


if __name__ == "__main__":
    main()
