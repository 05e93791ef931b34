"""``hydraserve generate``: one prompt through our compact engine, from a local dir or s3:// URI.

Wired by hydraserve.cli. Streams the text to stderr as it is generated and prints, as its last
stdout line, one JSON object: token_ids (generated only), text, finish_reason, prompt_token_ids,
and timings. Greedy unless --temperature is given. torch is imported inside the handler only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory or s3://bucket/prefix")
    parser.add_argument("--endpoint-url", default=None, help="S3 endpoint for s3:// models")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="compute dtype (default: the checkpoint's)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's; 1 is much faster on a busy CPU)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt as one user chat message")
    parser.add_argument("--quiet", action="store_true", help="do not stream text to stderr")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hydraserve.errors import HydraError
    from hydraserve.runtime.engine.factory import load_engine
    from hydraserve.runtime.engine.types import SamplingParams

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    try:
        engine = load_engine(args.model, endpoint_url=args.endpoint_url, dtype=args.dtype, max_num_seqs=1)
    except (FileNotFoundError, HydraError, ValueError) as exc:
        print(f"error: cannot load {args.model}: {exc}", file=sys.stderr)
        return 1
    loaded = time.perf_counter()
    tokenizer = engine.tokenizer
    if args.chat:
        prompt_ids = tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        prompt_ids = tokenizer.encode(args.prompt)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))
    token_ids: list[int] = []
    parts: list[str] = []
    finish_reason = None
    first_token_at = None
    try:
        for delta in engine.submit(prompt_ids, params):
            if first_token_at is None:
                first_token_at = time.perf_counter()
            token_ids += delta.token_ids
            parts.append(delta.text)
            finish_reason = delta.finish_reason or finish_reason
            if not args.quiet and delta.text:
                print(delta.text, end="", file=sys.stderr, flush=True)
    except HydraError as exc:
        print(json.dumps(exc.to_openai()))
        return 1
    finally:
        engine.shutdown(drain=False)
    done = time.perf_counter()
    if not args.quiet:
        print(file=sys.stderr)
    print(json.dumps({
        "model": engine.model_name,
        "prompt_token_ids": prompt_ids,
        "token_ids": token_ids,
        "text": "".join(parts),
        "finish_reason": finish_reason,
        "load_s": round(loaded - started, 4),
        "ttft_s": round((first_token_at or done) - loaded, 4),
        "total_s": round(done - started, 4),
    }, ensure_ascii=False))
    return 0
