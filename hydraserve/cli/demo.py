"""`hydraserve demo`: start the embedded stack, cold-start one request, print the timeline, exit.

The nodes are network namespaces with capped links when this runs as root (the planner then
splits the model over several nodes by itself, and the group consolidates after its first
token); otherwise they share loopback and the pipeline size is forced, which the output says.
Only reads arguments and wires the stack, the client and the report together.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from hydraserve.cli.flags import add_setting_flags

DEFAULT_PROMPT = "The quick brown fox"
DEMO_IDLE_S = 10.0  # zero this soon after the last request (after the consolidation), for a second cold start


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=2, help="emulated nodes (one loaderd each)")
    parser.add_argument("--link-mbit", type=float, default=100.0,
                        help="each node's link cap, both ways (network namespaces + tc; needs root); 0: loopback")
    parser.add_argument("--pipeline-size", type=int, default=None, choices=range(1, 5),
                        help="force the group size (default: the planner's choice; 2 when links cannot be capped)")
    add_setting_flags(parser, ("ttft_slo_s", "group_replicas"))  # the planner splits when one node would miss the SLO
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="push this Hugging Face model directory instead of generating one")
    parser.set_defaults(func=run)


def _say(message: str) -> None:
    print(message, flush=True)


def stack_options(args: argparse.Namespace) -> tuple[Any, str]:
    """The stack to start and, in words, who picks the pipeline size."""
    from hydraserve.embedded.netns import netns_available
    from hydraserve.embedded.stack import StackOptions

    capped = args.link_mbit > 0 and netns_available()[0]
    forced = args.pipeline_size or (None if capped else min(2, args.nodes))
    function: dict[str, Any] = {"min_pipeline_size": forced, "max_pipeline_size": forced} if forced else {}
    function["group_replicas"] = args.group_replicas
    if forced and not args.pipeline_size:
        who = f"forced to {forced} (links not capped: on loopback the planner would pick one worker)"
    else:
        who = f"forced to {forced}" if forced else "the planner's choice"
    # fp32 as the checkpoint is (vLLM would serve it in bf16 on a CPU): the compact engine answering
    # a cold start's first requests and vLLM then give the same greedy tokens, which the demo checks
    options = StackOptions(nodes=args.nodes, model_dir=args.model_dir, link_mbit=args.link_mbit or None,
                           ttft_slo_s=args.ttft_slo_s, function=function, idle_timeout_s=DEMO_IDLE_S,
                           worker={"dtype": "float32"})
    return options, who


def run(args: argparse.Namespace) -> int:
    from hydraserve.contracts.timeline_report import format_timeline, summary
    from hydraserve.embedded.demo_client import stream_completion
    from hydraserve.embedded.stack import LocalStack
    from hydraserve.logs import configure_logging

    configure_logging("demo", "WARNING")
    started = time.monotonic()
    options, who = stack_options(args)
    _say("Starting the embedded stack: S3 (moto server), model push, loaderd per node, placement, gateway")
    with LocalStack(options) as stack:
        assert stack.gateway is not None
        _say(f"  ready in {time.monotonic() - started:.1f} s: model {stack.model_uri}, gateway {stack.gateway_url}")
        _say(f"  nodes: {stack.emulation}")
        _say(f"  pipeline size: {who}")
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
        _say(f"  {len(cold.token_ids)} tokens, finish_reason={cold.finish_reason}, "
             f"cold TTFT {cold.ttft_s:.2f} s (client side)")
        group = _wait_for_consolidation(stack)
        endpoints = _wait_for_replicas(stack, group)
        timeline = stack.gateway.cold_start_timeline(name)
        _say("\nCold-start timeline (wall clock, all components; stageN: the group's other workers):")
        _say(format_timeline(timeline))
        served_by = "the consolidated worker" if group and group.consolidated.is_set() else "the same instance"
        warm = stream_completion(stack.function_url() + "/v1/completions", body)
        _say(f"\nSame request again, warm ({served_by}): TTFT {warm.ttft_s:.3f} s, "
             f"same tokens: {warm.token_ids == cold.token_ids}")
        same = [warm.token_ids == cold.token_ids]
        for endpoint in endpoints[1:]:  # each replica answers on its own
            direct = stream_completion(endpoint.url + "/v1/completions", body)
            same.append(direct.token_ids == cold.token_ids)
            _say(f"  straight to replica {endpoint.instance_id}: TTFT {direct.ttft_s:.3f} s, "
                 f"same tokens: {same[-1]}")
        again, again_timeline = _cold_start_again(stack, body, cold.token_ids)
        same.append(again.token_ids == cold.token_ids)
        report = {"cold_ttft_s": round(cold.ttft_s or 0, 3), "warm_ttft_s": round(warm.ttft_s or 0, 3),
                  "second_cold_ttft_s": round(again.ttft_s or 0, 3),
                  "second_cold_adopted": _adopted(again_timeline),
                  "same_tokens_warm": all(same), "tokens": len(cold.token_ids),
                  "text": cold.text, "nodes": stack.emulation,
                  "pipeline_size": group.plan.pipeline_size if group else None,
                  "consolidated": bool(group and group.consolidated.is_set()), "replicas": len(endpoints),
                  **summary(timeline)}
    _say(f"\nStopped everything; shared-memory segments left behind: {len(stack.leftovers)}")
    print(json.dumps(report), flush=True)
    return 0 if not stack.leftovers else 1


def _wait_for_consolidation(stack: Any, timeout_s: float = 60.0) -> Any:
    """The running group; if it consolidates, wait for that (said on the way)."""
    scaler = stack.gateway.scaler(stack.options.function_name)
    group = stack.backend.group(scaler.endpoints[0].instance_id) if scaler.endpoints else None
    if group is None or group.plan.pipeline_size == 1:
        return group
    if not group.plan.stages[0].full:
        _say(f"  served by a group of {group.plan.pipeline_size} workers (no full worker: it stays a group)")
        return group
    _say(f"  served by a group of {group.plan.pipeline_size} workers on {', '.join(group.plan.nodes)}; "
         "its head now loads the other layers in the background...")
    waited = time.monotonic()
    if group.consolidated.wait(timeout_s):
        kept = sum(st.full for st in group.plan.stages) - 1
        others = (f"{kept} other full worker(s) stay to become replicas, the partial ones were stopped and their "
                  "memory freed") if kept else "the others were stopped and their memory freed"
        _say(f"  consolidated {time.monotonic() - waited:.1f} s later: its head holds the whole model; {others}")
    else:
        _say(f"  not consolidated within {timeout_s:.0f} s (the group keeps serving)")
    return group


def _cold_start_again(stack: Any, body: dict[str, Any], expected: list[int],
                      timeout_s: float = 120.0) -> tuple[Any, Any]:
    """Once the function is back at zero: the same request cold-starts it again, now from the
    node holding its bytes and, with a warm pool there, an adopted pooled runtime."""
    from hydraserve.contracts.timeline_report import format_timeline
    from hydraserve.embedded.demo_client import stream_completion

    name = stack.options.function_name
    scaler = stack.gateway.scaler(name)
    _say(f"\nWaiting for '{name}' to scale to zero ({stack.options.idle_timeout_s:g} s idle)...")
    waited = time.monotonic()
    while scaler.state.value != "zero" and time.monotonic() - waited < timeout_s:
        time.sleep(0.1)
    _say(f"  at zero after {time.monotonic() - waited:.1f} s: every worker stopped, the weights stay in loaderd")
    again = stream_completion(stack.function_url() + "/v1/completions", body)
    timeline = stack.gateway.cold_start_timeline(name)
    how = "an adopted pooled runtime" if _adopted(timeline) else "a new process"
    _say(f"Second cold start ({how}): TTFT {again.ttft_s:.3f} s, same tokens: {again.token_ids == expected}")
    _say(format_timeline(timeline))
    return again, timeline


def _adopted(timeline: Any) -> bool:
    spawned = [e for e in timeline.events if e.name == "worker_spawned"]
    return bool(spawned) and all(e.detail.get("adopted") for e in spawned)


def _wait_for_replicas(stack: Any, group: Any, timeout_s: float = 90.0) -> list[Any]:
    """The function's instances once the group's other full workers serve on their own too."""
    scaler = stack.gateway.scaler(stack.options.function_name)
    wanted = sum(st.full for st in group.plan.stages) if group is not None and group.consolidated.is_set() else 1
    if wanted > 1:
        _say(f"  {wanted - 1} more full worker(s) grow into the whole model and become replicas...")
    waited = time.monotonic()
    while len(scaler.endpoints) < wanted and time.monotonic() - waited < timeout_s:
        time.sleep(0.1)
    if wanted > 1:
        _say(f"  {len(scaler.endpoints)} instance(s) serve, {time.monotonic() - waited:.1f} s after the consolidation")
    return scaler.endpoints


if __name__ == "__main__":
    demo = argparse.ArgumentParser(prog="hydraserve demo")
    configure(demo)
    sys.exit(run(demo.parse_args()))
