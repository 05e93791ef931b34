"""The emulated cluster (needs root and iproute2; skipped with the reason otherwise): each node a
network namespace whose link tc caps both ways, its loaderd and workers inside it, S3 outside.
A pipeline group of 2 cold-starts across the namespaces (its fetches cross the caps), answers
with transformers' tokens, consolidates, and on close every namespace, veth, bridge, process
and shared memory segment is gone."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from hydraserve.embedded.demo_client import stream_completion
from hydraserve.embedded.netns import netns_available
from hydraserve.embedded.stack import LocalStack, StackOptions
from tests.e2e.test_cold_start import PROMPT, transformers_greedy

OK, WHY = netns_available()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(not OK, reason=WHY)]


def sent_bytes(device: str) -> int:
    """Bytes the tbf qdisc on ``device`` let through (tc -s)."""
    out = subprocess.run(["tc", "-s", "qdisc", "show", "dev", device], capture_output=True, text=True).stdout
    words = out.split()
    return int(words[words.index("Sent") + 1])


def test_a_group_cold_starts_across_capped_namespaces_and_everything_is_removed(group_llama_dir: Path) -> None:
    options = StackOptions(nodes=2, model_dir=group_llama_dir, link_mbit=100, progress=False,
                           function_name="grouped", function={"min_pipeline_size": 2, "max_pipeline_size": 2})
    with LocalStack(options) as stack:
        cluster = stack.cluster
        assert cluster is not None and "capped at 100 Mbit/s" in stack.emulation
        assert stack.s3.endpoint_url.startswith(f"http://{cluster.host_ip}:")  # outside every node
        for node in stack.nodes:  # each loaderd listens on its node's own address
            assert node.loaderd_url.startswith(f"http://{cluster.nodes[node.name].ip}:")
        result = stream_completion(stack.function_url() + "/v1/completions",
                                   {"prompt": PROMPT, "max_tokens": 8, "temperature": 0})
        assert result.status == 200, result.error
        assert result.token_ids == transformers_greedy(group_llama_dir, PROMPT, 8)[:len(result.token_ids)]
        assert stack.gateway is not None and stack.gateway.scaler("grouped").endpoints
        group = stack.backend.group(stack.gateway.scaler("grouped").endpoints[0].instance_id)
        assert group is not None and group.plan.pipeline_size == 2
        for st, worker in zip(group.plan.stages, group.workers, strict=True):
            node = cluster.nodes[st.node]
            assert worker.url.startswith(f"http://{node.ip}:")  # the worker runs inside its node
            assert sent_bytes(node.veth_host) >= st.stage_bytes  # its stage came in through the cap
        assert group.consolidated.wait(60)
        names = [n for n in (*[n.netns for n in cluster.nodes.values()], cluster.bridge)]
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert [n for n in names if n in listing + links] == []
    assert stack.leftovers == [] and stack.backend.launcher.running() == []
