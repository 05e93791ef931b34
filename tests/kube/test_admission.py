"""Which pods the interceptor may start (activator/knative/admission.py), without a cluster: the
operator's model allowlist as written in hydraserve-config, and the one loaderd mount a function
pod may have. The interceptor's use of both is tested against the API in test_interceptor.py."""

from __future__ import annotations

from typing import Any

import pytest

from hydraserve.activator.knative.admission import ModelAllowlist, admission_problem, mount_problem
from hydraserve.provider.knative.service import HydraService, knative_service, loaderd_model_dir

MODEL = "s3://models/team-a/chat"


def revision_pod(model: str = MODEL, namespace: str = "default") -> dict[str, Any]:
    template = knative_service(HydraService(name="chat", namespace=namespace, model_uri=model))["spec"]["template"]
    return {"metadata": {"name": "chat-1", "namespace": namespace, **template["metadata"]}, "spec": template["spec"]}


def test_an_allowlist_covers_its_prefixes_by_whole_path_segments() -> None:
    allowlist = ModelAllowlist.parse("""
        # the operator's comment
        default=s3://models/team-a/, s3://shared
        team-b=s3://models/team-b; team-c=s3://models/team-a/chat
    """)
    assert allowlist is not None
    assert allowlist.allows("default", MODEL) and allowlist.allows("default", "s3://models/team-a")
    assert allowlist.allows("default", "s3://shared/anything/at/all")
    assert not allowlist.allows("default", "s3://models/team-ab/chat")  # a prefix of the name is not a prefix
    assert not allowlist.allows("default", "s3://models/team-b/chat")
    assert allowlist.allows("team-c", "s3://models/team-a/chat/") and not allowlist.allows("team-c", "s3://models/team-a")
    assert not allowlist.allows("unlisted", MODEL)  # a namespace not listed may use no model
    assert not allowlist.allows("default", "s3://models/team-a/../team-b")  # never reached by traversal


@pytest.mark.parametrize("text", ["default", "Default=s3://models/a", "default=s3://m/a", "default=/models/a",
                                  "default=s3://models/a/../b"])
def test_a_malformed_allowlist_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        ModelAllowlist.parse(text)


def test_no_allowlist_configured_allows_every_model_as_before() -> None:
    assert ModelAllowlist.parse("") is None and ModelAllowlist.parse(" \n# nothing\n") is None
    assert admission_problem(revision_pod(), MODEL, None) is None
    refused = admission_problem(revision_pod(), MODEL, ModelAllowlist.parse("default=s3://models/team-b"))
    assert refused is not None and "not allowed in namespace default" in refused


def test_the_revision_kn_hydra_writes_passes_and_a_writable_mount_does_not() -> None:
    pod = revision_pod()
    assert mount_problem(pod, MODEL) is None
    assert mount_problem(pod, "s3://models/team-a/other") is not None  # another model's directory
    pod["spec"]["containers"][0]["volumeMounts"][0]["readOnly"] = False
    problem = mount_problem(pod, MODEL)
    assert problem is not None and "writable" in problem and loaderd_model_dir(MODEL) in problem
