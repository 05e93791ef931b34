"""`hydraserve demo`: start the embedded stack, cold-start one request, print the timeline, exit.

Only reads arguments and wires the stack, the client and the report together.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEFAULT_PROMPT = "The quick brown fox"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=2, help="emulated nodes (one loaderd each)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="push this Hugging Face model directory instead of generating one")
    parser.set_defaults(func=run)


def _say(message: str) -> None:
    print(message, flush=True)


def run(args: argparse.Namespace) -> int:
    from hydraserve.contracts.timeline import Timeline
    from hydraserve.demo.client import stream_completion
    from hydraserve.demo.report import format_timeline, summary
    from hydraserve.demo.stack import LocalStack, StackOptions
    from hydraserve.logs import configure_logging

    configure_logging("demo", "WARNING")
    started = time.monotonic()
    _say("Starting the embedded stack: S3 (moto server), model push, loaderd per node, placement, gateway")
    with LocalStack(StackOptions(nodes=args.nodes, model_dir=args.model_dir)) as stack:
        _say(f"  ready in {time.monotonic() - started:.1f} s: model {stack.model_uri}, "
             f"{args.nodes} nodes, gateway {stack.gateway_url}")
        name = stack.options.function_name
        _say(f"\nFunction '{name}' is at zero. Sending: {args.prompt!r}")
        print("  answer: ", end="", flush=True)
        body = {"prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": 0}
        cold = stream_completion(stack.function_url() + "/v1/completions", body,
                                 on_text=lambda t: print(t, end="", flush=True))
        print(flush=True)
        if cold.status != 200:
            _say(f"  request failed: HTTP {cold.status} {cold.error}")
            return 1
        assert stack.gateway is not None
        timeline: Timeline = stack.gateway.cold_start_timeline(name)
        _say(f"  {len(cold.token_ids)} tokens, finish_reason={cold.finish_reason}, "
             f"cold TTFT {cold.ttft_s:.2f} s (client side)")
        _say("\nCold-start timeline (wall clock, all components):")
        _say(format_timeline(timeline))
        warm = stream_completion(stack.function_url() + "/v1/completions", body)
        _say(f"\nSame request again, warm: TTFT {warm.ttft_s:.3f} s, "
             f"same tokens: {warm.token_ids == cold.token_ids}")
        report = {"cold_ttft_s": round(cold.ttft_s or 0, 3), "warm_ttft_s": round(warm.ttft_s or 0, 3),
                  "tokens": len(cold.token_ids), "text": cold.text, **summary(timeline)}
    _say(f"\nStopped everything; shared-memory segments left behind: {len(stack.leftovers)}")
    print(json.dumps(report), flush=True)
    return 0 if not stack.leftovers else 1


if __name__ == "__main__":
    sys.exit(run(argparse.Namespace(nodes=2, prompt=DEFAULT_PROMPT, max_tokens=24, model_dir=None)))
