"""`hydraserve loaderctl` against a real daemon and a real S3 server (moto over HTTP): prefetch
with --wait ends with every byte resident, a second prefetch downloads nothing, status shows the
model, release drops the pin, and failures (unknown model, bad token, no daemon) are one clear
line and exit code 1."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hydraserve.cli import main
from hydraserve.loaderd.daemon import LoaderDaemon
from hydraserve.loaderd.service import LoaderConfig
from hydraserve.processes import free_port

from .test_s3 import BUCKET, push

TOKEN = "c" * 32


@pytest.fixture
def daemon(s3_server: Any, shm_guard: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[LoaderDaemon]:
    for k, v in s3_server.client_env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("HYDRASERVE_LOADERD_TOKEN", TOKEN)
    d = LoaderDaemon(LoaderConfig(node_name=shm_guard, budget_bytes=64 << 20,
                                  endpoint_url=s3_server.endpoint_url), TOKEN).start()
    yield d
    d.stop()


@pytest.fixture
def model_uri(s3_server: Any, tmp_path: Path) -> str:
    from hydraserve.modeltools.tiny import TinySpec, make_tiny_model

    local = make_tiny_model(tmp_path / "m", TinySpec(arch="llama", layers=3, shard_size="100KB"))
    return push(s3_server, local, f"ctl-{uuid.uuid4().hex[:6]}")


def ctl(capsys: pytest.CaptureFixture[str], url: str, *args: str) -> tuple[int, str, str]:
    code = main(["loaderctl", "--url", url, *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_prefetch_wait_status_release(daemon: LoaderDaemon, model_uri: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = ctl(capsys, daemon.url, "prefetch", model_uri, "--wait")
    assert code == 0
    first = json.loads(out.strip().splitlines()[-1])
    assert first["bytes_total"] > 0
    assert first["bytes_ready"] == first["bytes_total"] == first["bytes_new"]
    assert all(s.state == "complete" for s in daemon.service.status().segments)

    code, out, _ = ctl(capsys, daemon.url, "prefetch", model_uri, "--wait")
    again = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and again["bytes_new"] == 0 and again["bytes_ready"] == first["bytes_total"]

    code, out, _ = ctl(capsys, daemon.url, "status")
    assert code == 0 and model_uri in out and "complete" in out
    code, out, _ = ctl(capsys, daemon.url, "status", "--json")
    held = json.loads(out)["models"]
    assert [m["bytes_complete"] for m in held if m["model_uri"] == model_uri] == [first["bytes_total"]]

    code, out, _ = ctl(capsys, daemon.url, "release", first["lease_id"])
    assert code == 0 and json.loads(out) == {"released": True}
    code, _, err = ctl(capsys, daemon.url, "release", first["lease_id"])
    assert code == 1 and "no lease" in err and "Traceback" not in err


def test_failures_are_one_clear_line(daemon: LoaderDaemon, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = ctl(capsys, daemon.url, "prefetch", f"s3://{BUCKET}/absent-{uuid.uuid4().hex[:6]}", "--wait")
    assert code == 1 and "absent-" in err and len(err.strip().splitlines()) == 1

    code, _, err = ctl(capsys, daemon.url, "prefetch", "s3://a/../../dev/shm")
    assert code == 1 and "Traceback" not in err

    monkeypatch.setenv("HYDRASERVE_LOADERD_TOKEN", "BADTOKEN" * 4)
    code, _, err = ctl(capsys, daemon.url, "status")
    assert code == 1 and "401" in err and TOKEN not in err and "BADTOKEN" not in err

    code, _, err = ctl(capsys, f"http://127.0.0.1:{free_port()}", "status")
    assert code == 1 and "did not answer" in err
