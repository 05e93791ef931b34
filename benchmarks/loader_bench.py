"""`hydraserve bench loader`: loaderd vs single-stream boto3 vs Run:ai streamer, same model, same link.

Called by hydraserve.cli.bench. With root: one emulated node (hydraserve/embedded/netns.py) whose
link is capped with tc; s3rver (npm, real S3 protocol, file-backed) in the root namespace; each
contender runs inside the node. Without root: everything on loopback, uncapped (said so in the
output). Reports the store's own uncapped throughput (so the store is never the hidden
bottleneck), CPU per run, loaderd's time until the first layer is usable, and ends with one JSON
line. s3rver is installed on first use into benchmarks/.s3rver with npm.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from hydraserve.processes import free_port

HERE = Path(__file__).resolve().parent
S3RVER_DIR = HERE / ".s3rver"
BUCKET = "bench"
CREDS = {"AWS_ACCESS_KEY_ID": "S3RVER", "AWS_SECRET_ACCESS_KEY": "S3RVER", "AWS_DEFAULT_REGION": "us-east-1",
         "AWS_EC2_METADATA_DISABLED": "true"}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate-mbit", type=float, default=400.0, help="node link cap (tc tbf), Mbit/s")
    parser.add_argument("--layers", type=int, default=12, help="decoder layers of the synthetic model")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size (fp16; ~20*h^2 B per layer)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=None, help="loaderd ranged GETs in flight")
    parser.add_argument("--chunk-bytes", type=int, default=None, help="loaderd's largest ranged GET")
    parser.add_argument("--min-chunk-bytes", type=int, default=None, help="loaderd's smallest ranged GET")
    parser.add_argument("--no-netns", action="store_true", help="loopback only, even as root")
    parser.add_argument("--skip-runai", action="store_true")
    parser.add_argument("--workdir", default=None, help="keep model and store files here")
    parser.set_defaults(func=run)


# -- model and store ---------------------------------------------------------------------------

def make_model(root: Path, layers: int, hidden: int, vocab: int, shards: int) -> list[Path]:
    """A Llama-shaped fp16 checkpoint of random bytes in standard safetensors shards."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    rng = np.random.default_rng(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.from_numpy(rng.integers(0, 2**15, size=shape, dtype=np.int16)).view(torch.float16)

    names: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        names += [(p + f"self_attn.{x}_proj.weight", (hidden, hidden)) for x in "qkvo"]
        names += [(p + "mlp.gate_proj.weight", (2 * hidden, hidden)), (p + "mlp.up_proj.weight", (2 * hidden, hidden)),
                  (p + "mlp.down_proj.weight", (hidden, 2 * hidden)), (p + "input_layernorm.weight", (hidden,)),
                  (p + "post_attention_layernorm.weight", (hidden,))]
    names += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    root.mkdir(parents=True, exist_ok=True)
    per = -(-len(names) // shards)
    files, weight_map = [], {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
        part = {n: rand(*shape) for n, shape in names[s * per:(s + 1) * per]}
        save_file(part, str(root / fname))
        weight_map.update(dict.fromkeys(part, fname))
        files.append(root / fname)
    if shards > 1:
        (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                  "hidden_size": hidden, "num_hidden_layers": layers,
                                                  "vocab_size": vocab, "num_attention_heads": 16,
                                                  "intermediate_size": 2 * hidden, "torch_dtype": "float16"}))
    return files


def ensure_s3rver() -> Path:
    """The s3rver executable, npm-installed into benchmarks/.s3rver on first use."""
    exe = S3RVER_DIR / "node_modules" / ".bin" / "s3rver"
    if exe.exists():
        return exe
    if shutil.which("npm") is None:
        raise SystemExit("s3rver needs Node.js and npm (apt-get install nodejs npm), then rerun")
    S3RVER_DIR.mkdir(parents=True, exist_ok=True)
    (S3RVER_DIR / ".gitignore").write_text("*\n")
    print("installing s3rver with npm into benchmarks/.s3rver ...", file=sys.stderr)
    subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(S3RVER_DIR), "s3rver@3"],
                   check=True, stdout=subprocess.DEVNULL)
    return exe


@contextmanager
def s3rver(data_dir: Path, host: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    exe = ensure_s3rver()
    port = free_port(host)
    proc = subprocess.Popen([str(exe), "-d", str(data_dir), "-a", host, "-p", str(port), "--silent",
                             "--configure-bucket", BUCKET], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection((host, port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None:
                    raise SystemExit(f"s3rver exited: {proc.stderr.read().decode() if proc.stderr else ''}") from None
                time.sleep(0.1)
        yield f"http://{host}:{port}", proc
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()


def s3_client(endpoint: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=CREDS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=CREDS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1",
                        config=Config(max_pool_connections=64, s3={"addressing_style": "path"}))


def upload(endpoint: str, root: Path, prefix: str) -> None:
    from hydraserve.contracts.model import MANIFEST_FILE
    from hydraserve.weights.manifest import compute_manifest

    client = s3_client(endpoint)
    manifest = compute_manifest(root)  # as `hydraserve model push` writes it: loaderd verifies
    for path in sorted(root.iterdir()):
        client.upload_file(str(path), BUCKET, f"{prefix}/{path.name}")
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/{MANIFEST_FILE}", Body=manifest.model_dump_json().encode())


def store_raw(endpoint: str, files: list[Path], prefix: str, streams: int = 8, chunk: int = 8 << 20) -> float:
    """The store's own throughput (MB/s) with parallel 8 MiB ranged GETs, no cap."""
    client = s3_client(endpoint)
    jobs = [(f"{prefix}/{f.name}", a, min(a + chunk, f.stat().st_size))
            for f in files for a in range(0, f.stat().st_size, chunk)]

    def get(job: tuple[str, int, int]) -> int:
        key, a, b = job
        return len(client.get_object(Bucket=BUCKET, Key=key, Range=f"bytes={a}-{b - 1}")["Body"].read())

    start = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        total = sum(pool.map(get, jobs))
    return total / (time.perf_counter() - start) / 1e6


# -- contenders (each runs inside the node) ----------------------------------------------------

SINGLE_STREAM = r"""
import json, resource, sys, time, boto3
from botocore.config import Config
endpoint, bucket, keys = sys.argv[1], sys.argv[2], sys.argv[3:]
c = boto3.client("s3", endpoint_url=endpoint, config=Config(s3={"addressing_style": "path"}))
t = time.perf_counter(); total = 0
for key in keys:
    body = c.get_object(Bucket=bucket, Key=key)["Body"]
    buf = bytearray(c.head_object(Bucket=bucket, Key=key)["ContentLength"]); view = memoryview(buf); pos = 0
    while chunk := body.read(1 << 20):
        view[pos:pos + len(chunk)] = chunk; pos += len(chunk)
    total += pos
wall = time.perf_counter() - t; ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"bytes": total, "seconds": wall, "cpu_s": ru.ru_utime + ru.ru_stime}))
"""

RUNAI = r"""
import json, resource, sys, time
from runai_model_streamer import SafetensorsStreamer
uris = sys.argv[1:]
t = time.perf_counter(); total = 0
with SafetensorsStreamer() as s:
    s.stream_files(uris)
    for name, tensor in s.get_tensors():
        total += tensor.numel() * tensor.element_size()
wall = time.perf_counter() - t; ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"bytes": total, "seconds": wall, "cpu_s": ru.ru_utime + ru.ru_stime}))
"""


def run_script(prefix: list[str], script: str, args: list[str], env: dict[str, str]) -> dict[str, float]:
    done = subprocess.run([*prefix, sys.executable, "-c", script, *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_loaderd(prefix: list[str], listen_ip: str, endpoint: str, uri: str, model_bytes: int,
                workdir: Path, args: argparse.Namespace) -> dict[str, float]:
    """Prefetch the whole model through a loaderd in the node; time the first layer and the end."""
    from hydraserve.auth import new_token_file
    from hydraserve.contracts.loader import PrefetchRequest
    from hydraserve.loaderd.daemon import spawn_loaderd
    from hydraserve.weights.segment import SegmentReader

    token, token_file = new_token_file(workdir)
    extra = []
    if args.concurrency:
        extra += ["--concurrency", str(args.concurrency)]
    if args.chunk_bytes:
        extra += ["--chunk-bytes", str(args.chunk_bytes)]
    if args.min_chunk_bytes:
        extra += ["--min-chunk-bytes", str(args.min_chunk_bytes)]
    port = free_port("127.0.0.1") if not prefix else 7070
    daemon = spawn_loaderd(port=port, node_name=f"bench{os.getpid()}", budget_bytes=2 * model_bytes + (64 << 20),
                           token=token, token_file=token_file, host=listen_ip, endpoint_url=endpoint,
                           extra_args=extra, prefix=prefix, env=CREDS, log_path=workdir / "loaderd.log")
    try:
        client = daemon.client()
        cpu0 = proc_cpu_s(daemon.proc.pid)
        t0 = time.perf_counter()
        lease = client.prefetch(PrefetchRequest(model_uri=uri))
        answered = time.perf_counter() - t0
        group_ready: dict[str, float] = {}
        readers = [SegmentReader(s.path) for s in lease.segments]
        first_groups = {"embed", "layer.0"} & {s.group for s in lease.segments} or {lease.segments[0].group}
        first_ready = None
        first_bytes = sum(s.tensor_bytes for s in lease.segments if s.group in first_groups)
        done: set[str] = set()
        for info, reader in zip(lease.segments, readers, strict=True):  # streaming order
            for i in range(len(reader.tensors)):
                reader.wait_ready(i, timeout_s=900)
            done.add(info.group)
            group_ready[info.group] = round(time.perf_counter() - t0, 3)
            if first_ready is None and first_groups <= done:
                first_ready = time.perf_counter() - t0
        wall = time.perf_counter() - t0
        deadline = time.monotonic() + 60  # format 1 manifests: files are hashed after their last byte
        while time.monotonic() < deadline and any(s.state == "filling" for s in client.status().segments):
            time.sleep(0.01)
        cpu = proc_cpu_s(daemon.proc.pid) - cpu0  # verification included
        for reader in readers:
            reader.close()
        client.release(lease.lease_id)
        status = client.status()
        assert all(s.state == "complete" for s in status.segments), "partial segments after the fetch"
        print(f"loaderd: prefetch answered in {answered:.3f} s; group ready at (s): {group_ready}",
              file=sys.stderr)
        return {"bytes": lease.bytes_total, "seconds": wall, "cpu_s": cpu, "first_layer_ready_s": first_ready or wall,
                "first_layer_bytes": first_bytes, "prefetch_answer_s": answered}
    finally:
        daemon.stop()
        token_file.unlink(missing_ok=True)


# -- the run -----------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    from hydraserve.embedded.netns import EmulatedCluster, NodeSpec, netns_available

    use_netns, why = (False, "--no-netns") if args.no_netns else netns_available()
    notes = [] if use_netns else [f"no network namespace ({why}): loopback, uncapped"]
    with ExitStack() as stack:
        workdir = Path(args.workdir) if args.workdir else Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix="hs-loader-bench-")))
        model_dir = workdir / "model"
        files = make_model(model_dir, args.layers, args.hidden, args.vocab, args.shards)
        model_bytes = sum(f.stat().st_size for f in files)
        print(f"model: {len(files)} safetensors files, {model_bytes / 1e6:.1f} MB", file=sys.stderr)
        prefix_key = f"m{os.getpid()}"
        store_dir = workdir / "store"
        store_dir.mkdir(exist_ok=True)
        if use_netns:
            cluster = stack.enter_context(EmulatedCluster([NodeSpec("bench", rate_mbit=args.rate_mbit)]))
            node = cluster.nodes["bench"]
            endpoint, store_proc = stack.enter_context(s3rver(store_dir, cluster.host_ip))
            prefix, listen_ip, link = node.prefix, node.ip, node.link_mb_s
        else:
            endpoint, store_proc = stack.enter_context(s3rver(store_dir, "127.0.0.1"))
            prefix, listen_ip, link = [], "127.0.0.1", None
        upload(endpoint, model_dir, prefix_key)
        keys = [f"{prefix_key}/{f.name}" for f in files]
        uri = f"s3://{BUCKET}/{prefix_key}"
        env = {**CREDS, "AWS_ENDPOINT_URL": endpoint, "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0"}

        results: dict[str, dict[str, float]] = {}
        store_cpu0 = proc_cpu_s(store_proc.pid)
        t = time.perf_counter()
        raw = store_raw(endpoint, files, prefix_key)
        results["store_raw"] = {"mb_s": raw, "store_cpu": (proc_cpu_s(store_proc.pid) - store_cpu0)
                                / (time.perf_counter() - t)}
        print(f"store raw (uncapped, 8 x 8 MiB ranged GETs): {raw:.1f} MB/s", file=sys.stderr)

        def measured(name: str, fn: Any) -> None:
            cpu0 = proc_cpu_s(store_proc.pid)
            t0 = time.perf_counter()
            r = fn()
            r["mb_s"] = r["bytes"] / r["seconds"] / 1e6
            r["cpu_cores"] = r["cpu_s"] / r["seconds"]
            r["store_cpu_cores"] = (proc_cpu_s(store_proc.pid) - cpu0) / (time.perf_counter() - t0)
            results[name] = r
            print(f"{name}: {r['mb_s']:.1f} MB/s, {r['seconds']:.2f} s, client CPU {r['cpu_cores']:.2f} cores, "
                  f"store CPU {r['store_cpu_cores']:.2f} cores", file=sys.stderr)

        measured("loaderd", lambda: run_loaderd(prefix, listen_ip, endpoint, uri, model_bytes, workdir, args))
        measured("single_stream", lambda: run_script(prefix, SINGLE_STREAM, [endpoint, BUCKET, *keys], env))
        if args.skip_runai:
            notes.append("Run:ai streamer skipped (--skip-runai)")
        else:
            try:
                measured("runai", lambda: run_script(prefix, RUNAI, [f"s3://{BUCKET}/{k}" for k in keys], env))
            except Exception as exc:
                notes.append(f"Run:ai streamer failed: {str(exc)[-300:]}")
        summary = _summary(results, link, model_bytes, args, use_netns, notes)
        for line in _checks(summary):
            print(line, file=sys.stderr)
        print(json.dumps(summary))
    return 0


def _summary(results: dict[str, dict[str, float]], link: float | None, model_bytes: int,
             args: argparse.Namespace, netns: bool, notes: list[str]) -> dict[str, Any]:
    ld = results["loaderd"]
    first_fetch_s = ld["first_layer_bytes"] / (ld["mb_s"] * 1e6)
    return {
        "benchmark": "loader", "netns": netns, "rate_mbit": args.rate_mbit if netns else None,
        "link_mb_s": link, "model_mb": round(model_bytes / 1e6, 1),
        "store_raw_mb_s": round(results["store_raw"]["mb_s"], 1),
        "loaderd_mb_s": round(ld["mb_s"], 1),
        "single_stream_mb_s": round(results["single_stream"]["mb_s"], 1),
        "runai_mb_s": round(results["runai"]["mb_s"], 1) if "runai" in results else None,
        "first_layer_ready_s": round(ld["first_layer_ready_s"], 3),
        "first_layer_mb": round(ld["first_layer_bytes"] / 1e6, 1),
        "first_layer_fetch_s": round(first_fetch_s, 3),
        "cpu_cores": {k: round(v["cpu_cores"], 2) for k, v in results.items() if "cpu_cores" in v},
        "store_cpu_cores": {k: round(v.get("store_cpu_cores", v.get("store_cpu", 0.0)), 2) for k, v in results.items()},
        "loaderd_concurrency": args.concurrency, "loaderd_chunk_bytes": args.chunk_bytes,
        "loaderd_min_chunk_bytes": args.min_chunk_bytes,
        "notes": notes,
    }


def _checks(s: dict[str, Any]) -> list[str]:
    out = []
    link, ld = s["link_mb_s"], s["loaderd_mb_s"]
    if link and link < s["store_raw_mb_s"] / 2:
        out.append(f"target loaderd >= 0.9 x link: {ld} vs {0.9 * link:.1f} MB/s -> "
                   f"{'met' if ld >= 0.9 * link else 'MISSED'}")
    if s["runai_mb_s"]:
        out.append(f"target loaderd >= Run:ai: {ld} vs {s['runai_mb_s']} MB/s -> "
                   f"{'met' if ld >= s['runai_mb_s'] else 'MISSED'}")
    bound = s["first_layer_fetch_s"] + 0.1
    out.append(f"target first layer <= fetch time + 0.1 s: {s['first_layer_ready_s']} vs {bound:.3f} s -> "
               f"{'met' if s['first_layer_ready_s'] <= bound else 'MISSED'}")
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    configure(p)
    a = p.parse_args()
    sys.exit(a.func(a))
