"""A Knative function pod learns its stage from its annotations, as the kubelet's Downward API
writes them into a file (one key="value" per line, values quoted as Go's strconv.Quote does)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hydraserve.contracts.pod import (
    ROLE_ANNOTATION,
    ROLE_FILE_KEY,
    parse_downward_annotations,
    role_annotation,
)
from hydraserve.contracts.stage import StageSpec
from hydraserve.contracts.worker import WorkerEnvironment
from hydraserve.testing.fake_kubelet import go_quote


def test_the_downward_api_file_format_is_read() -> None:
    # The example of the Kubernetes docs ("Expose Pod Information to Containers Through Files").
    text = 'build="two"\nbuilder="john-doe"\nkubernetes.io/config.seen="2026-12-01T10:00:00.1Z"\n'
    assert parse_downward_annotations(text) == {"build": "two", "builder": "john-doe",
                                                "kubernetes.io/config.seen": "2026-12-01T10:00:00.1Z"}
    assert parse_downward_annotations('a="x\\"y\\\\z\\n\\u00e9"\nbroken\nb=unquoted\n') == {"a": 'x"y\\z\né'}


def test_a_function_pod_takes_its_stage_from_its_role_file(tmp_path: Path) -> None:
    stage = StageSpec(index=0, num_stages=2, layer_start=0, layer_end=2, num_layers=4)
    placed = WorkerEnvironment(model_uri="s3://m/tiny", function="chat", instance_id="chat-1a2b3c4d", stage=stage,
                               transport_port=8090, peers=["hs-a-s0.ns.svc:8090", "hs-a-s1.ns.svc:8090"],
                               loaderd_url="http://10.0.0.7:8470", loaderd_token="secret-token",
                               loaderd_lease="heartbeat", full=True)
    value = role_annotation(placed.model_dump(mode="json"))
    assert "secret-token" not in value and "loaderd_token" not in json.loads(value)
    role_file = tmp_path / "annotations"
    role_file.write_text(f'autoscaling.knative.dev/initial-scale="0"\n{ROLE_ANNOTATION}={go_quote(value)}\n')
    # What Knative's revision template gives the container (its env was fixed before placement).
    env = {"PORT": "8080", "K_SERVICE": "chat", "HYDRASERVE_MODEL_URI": "s3://m/tiny",
           "HYDRASERVE_LOADERD_TOKEN": "from-the-secret", ROLE_FILE_KEY: str(role_file)}
    got = WorkerEnvironment.from_env(env)
    assert got.stage == stage and got.peers == placed.peers and got.instance_id == "chat-1a2b3c4d"
    assert got.loaderd_url == "http://10.0.0.7:8470" and got.loaderd_lease == "heartbeat"
    assert got.host == "0.0.0.0" and got.port == 8080  # its peers and probes come from outside the pod
    assert got.loaderd_token is not None and got.loaderd_token.get_secret_value() == "from-the-secret"


def test_a_pod_not_placed_by_the_interceptor_keeps_its_environment(tmp_path: Path) -> None:
    role_file = tmp_path / "annotations"
    role_file.write_text('autoscaling.knative.dev/initial-scale="0"\n')
    got = WorkerEnvironment.from_env({"HYDRASERVE_MODEL_URI": "s3://m/tiny", ROLE_FILE_KEY: str(role_file)})
    assert got.stage is None and got.host == "127.0.0.1"


def test_a_role_that_is_not_an_object_stops_the_worker(tmp_path: Path) -> None:
    role_file = tmp_path / "annotations"
    role_file.write_text(f'{ROLE_ANNOTATION}="[1, 2]"\n')
    with pytest.raises(ValueError, match="not a JSON object"):
        WorkerEnvironment.from_env({"HYDRASERVE_MODEL_URI": "s3://m/tiny", ROLE_FILE_KEY: str(role_file)})
