"""Errors keep their meaning across HTTP: every HydraError class, raised in a real server (the
one error-to-response mapping), comes back from the one client as the same class, with its
status, retry decision, code, param and Retry-After."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
from flask import Flask, request

import hydraserve.errors as errors
from hydraserve.errors import HydraError, error_from_response
from hydraserve.http_client import ServiceClient
from hydraserve.http_errors import install_error_handlers
from hydraserve.http_server import DrainingServer


def every_error_class() -> list[type[HydraError]]:
    found, todo = [], [HydraError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return sorted(found, key=lambda c: c.__name__)


CLASSES = every_error_class()


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    app = Flask("errors-under-test")
    app.config["MAX_CONTENT_LENGTH"] = 16
    install_error_handlers(app)

    @app.post("/raise/<name>")
    def raise_(name: str) -> str:
        cls = next(c for c in CLASSES if c.__name__ == name)
        raise cls(f"{name} happened", param="p", retry_after_s=7)

    @app.post("/echo")
    def echo() -> bytes:
        return request.get_data()  # reading the body enforces MAX_CONTENT_LENGTH

    @app.get("/crash")
    def crash() -> str:
        raise ZeroDivisionError("boom")

    srv = DrainingServer(app, "127.0.0.1", 0).start()
    yield srv.url
    srv.close()


def test_the_classes_under_test_are_all_of_them() -> None:
    names = {c.__name__ for c in CLASSES}
    assert {"IntegrityError", "StorageError", "OverloadedError", "UnreachableError", "ContextLengthError",
            "PayloadTooLargeError", "UnsupportedModelError", "SafetensorsFormatError", "EngineError",
            "UnauthorizedError", "NotFoundError", "PermanentError", "TemporaryError"} <= names
    assert len({(c.error_type, c.error_code) for c in CLASSES}) == len(CLASSES)  # one wire name each


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_each_class_survives_the_round_trip(server: str, cls: type[HydraError]) -> None:
    client = ServiceClient("svc", server)
    with pytest.raises(HydraError) as info:
        client.request("POST", f"/raise/{cls.__name__}")
    got = info.value
    assert type(got) is cls
    assert got.retryable == cls.retryable and got.status == cls.status
    assert got.param == "p" and got.retry_after_s == 7 and got.code == cls.error_code
    assert got.message == f"svc /raise/{cls.__name__}: {cls.status} {cls.__name__} happened"
    body = requests.post(f"{server}/raise/{cls.__name__}", timeout=5).json()["error"]
    assert body["type"] == cls.error_type and body["retryable"] is cls.retryable  # for non-Python clients too


def test_a_retryable_integrity_failure_stays_retryable(server: str) -> None:
    with pytest.raises(errors.IntegrityError) as info:
        ServiceClient("loaderd", server).request("POST", "/raise/IntegrityError")
    assert info.value.retryable and info.value.status == 502


def test_flask_refusals_and_crashes_come_back_as_our_classes(server: str) -> None:
    client = ServiceClient("svc", server)
    with pytest.raises(errors.NotFoundError):
        client.request("GET", "/no/such/route")
    with pytest.raises(errors.PayloadTooLargeError):
        client.request("POST", "/echo", json={"x": "y" * 100})
    with pytest.raises(errors.InvalidRequestError, match="405"):  # wrong method
        client.request("GET", "/raise/HydraError")
    with pytest.raises(HydraError, match="internal error: ZeroDivisionError") as info:
        client.request("GET", "/crash")
    assert type(info.value) is HydraError and not info.value.retryable


def test_nothing_answering_is_unreachable() -> None:
    with pytest.raises(errors.UnreachableError, match=r"svc at http://127\.0\.0\.1:9 did not answer") as info:
        ServiceClient("svc", "http://127.0.0.1:9", timeout_s=2).request("GET", "/x")
    assert info.value.retryable


@pytest.mark.parametrize(("status", "body", "cls"), [
    (404, "<html>not found</html>", errors.NotFoundError),
    (401, {"error": {"message": "no"}}, errors.UnauthorizedError),
    (429, {}, errors.OverloadedError),
    (400, {"error": {"type": "someone_elses_error"}}, errors.InvalidRequestError),
    (503, "bad gateway", errors.TemporaryError),
    (500, {"error": {"message": "x", "retryable": True}}, errors.TemporaryError),
    (502, None, errors.PermanentError),
    (500, [], HydraError),
])
def test_bodies_of_other_servers_map_by_status(status: int, body: object, cls: type[HydraError]) -> None:
    assert type(error_from_response(status, body, source="proxy")) is cls


def test_a_class_without_a_wire_name_is_refused_at_definition() -> None:
    with pytest.raises(TypeError, match="must declare error_type"):
        type("Unnamed", (errors.TemporaryError,), {})
    with pytest.raises(TypeError, match="share the wire name"):
        type("Twin", (errors.TemporaryError,), {"error_type": "overloaded_error"})
