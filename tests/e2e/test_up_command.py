"""`hydraserve up` as a user runs it: a child process, the printed curl examples, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from hydraserve.loaderd.registry import node_segment_files
from hydraserve.processes import free_port


def test_up_serves_openai_and_cloudevents_then_stops_cleanly(tiny_llama_dir: Path, tiny_opt_dir: Path,
                                                             tmp_path: Path) -> None:
    port = free_port()
    log = open(tmp_path / "up.log", "w+b")
    proc = subprocess.Popen([sys.executable, "-m", "hydraserve.cli", "up", "--port", str(port),
                             "--model-dir", str(tiny_llama_dir), "--nodes", "1", "--function", "fn"],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "up.log").read_text()
            if b"Try:" in (tmp_path / "up.log").read_bytes():
                break
            time.sleep(0.2)
        printed = (tmp_path / "up.log").read_text()
        assert f"{base}/v1/completions" in printed and f"{base}/functions/fn/v1/chat/completions" in printed
        nodes = next(line.split()[1:-3] for line in printed.splitlines() if line.strip().startswith("nodes "))
        assert nodes and all(n.startswith("node") for n in nodes)
        r = requests.post(f"{base}/v1/completions", timeout=120,  # the OpenAI endpoint, by model
                          json={"model": "fn", "prompt": "Hello", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        r = requests.post(f"{base}/functions/fn/", data=json.dumps({"prompt": "Hi", "max_tokens": 2}), timeout=60,
                          headers={"ce-specversion": "1.0", "ce-type": "dev.hydraserve.completion.request",
                                   "ce-source": "/curl", "ce-id": "1", "Content-Type": "application/json"})
        assert r.status_code == 200 and r.headers["ce-type"] == "dev.hydraserve.completion.response"
        assert requests.get(f"{base}/v1/functions", timeout=5).status_code == 401
        token_file = next(w.rstrip(")") for w in printed.split() if w.endswith("gateway.token)"))
        admin = {"Authorization": f"Bearer {Path(token_file).read_text()}"}
        functions = requests.get(f"{base}/v1/functions", headers=admin, timeout=5).json()["functions"]
        assert functions[0]["state"] == "ready"
        # the printed loaderctl line works as given and shows the model the cold start fetched
        ctl = next(line.split() for line in printed.splitlines() if line.strip().startswith("hydraserve loaderctl"))
        model_uri = next(w.rstrip(":,)") for w in printed.split() if w.startswith("s3://"))
        done = subprocess.run([sys.executable, "-m", "hydraserve.cli", *ctl[1:]], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert model_uri in done.stdout and "complete" in done.stdout
        # the README's path for a user's own model: model push -> fn create -> first request -> fn delete
        s3_env = next(w for w in printed.split() if w.endswith("s3.env;")).rstrip(";")
        env = os.environ | dict(line.split("=", 1) for line in Path(s3_env).read_text().splitlines())
        admin_flags = ["--gateway", base, "--token-file", token_file]
        for argv in (["model", "push", str(tiny_opt_dir), "s3://models/mine", "--create-bucket", "--no-progress"],
                     ["fn", "create", "mine", "--model", "s3://models/mine", "--ttft-slo", "20s", *admin_flags]):
            done = subprocess.run([sys.executable, "-m", "hydraserve.cli", *argv], capture_output=True, text=True,
                                  timeout=120, env=env)
            assert done.returncode == 0, done.stderr
        r = requests.post(f"{base}/v1/completions", timeout=120,
                          json={"model": "mine", "prompt": "Hello", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.json()["model"] == "mine", r.text
        assert sorted(m["id"] for m in requests.get(f"{base}/v1/models", timeout=5).json()["data"]) == ["fn", "mine"]
        done = subprocess.run([sys.executable, "-m", "hydraserve.cli", "fn", "delete", "mine", *admin_flags],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "1 instance(s) stopped" in done.stdout, done.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
        log.close()
    assert code == 0, (tmp_path / "up.log").read_text()[-3000:]
    leftovers = [path for node in nodes for path in node_segment_files("/dev/shm", node)]
    assert leftovers == [], "loaderd segments left behind by `hydraserve up`"
