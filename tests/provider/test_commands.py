"""`hydraserve plan` and `hydraserve simulate` end to end, in-process (small runs)."""

from __future__ import annotations

import json

import pytest

from hydraserve.cli import main


def test_plan_command_prints_candidates_then_plan_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--size-gb", "13.5", "--layers", "32", "--ttft-slo", "7.5"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    plan = json.loads(out[-1])
    assert plan["pipeline_size"] == 2 and plan["candidates"][0]["pipeline_size"] == 1
    assert any("TTFT" in line and "SLO" in line for line in out[:-1])


def test_simulate_command_json_last(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    from hydraserve.provider.sim.workload import write_sample_trace
    trace = tmp_path / "t.csv"
    write_sample_trace(str(trace), n_funcs=20, invocations=500)
    assert main(["simulate", "--trace", str(trace), "--rate", "0.3", "--cv", "2", "--policy",
                 "hydraserve,ours", "--duration", "600", "--copies", "4"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    for key in ("slo_attainment", "ttft_p50_s", "ttft_p99_s", "cost_gb_s"):
        assert key in result
    assert {r["policy"] for r in result["rows"]} == {"hydraserve", "ours"}
    assert "slo_attainment" in out[0]


def test_simulate_plot(tmp_path) -> None:
    out = tmp_path / "f.png"
    assert main(["simulate", "--rate", "0.2,0.3", "--cv", "2", "--policy", "serverless-vllm,hydraserve",
                 "--duration", "300", "--copies", "2", "--plot", str(out), "--json"]) == 0
    assert out.stat().st_size > 1000
