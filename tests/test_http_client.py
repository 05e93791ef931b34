"""The one internal HTTP client tells "nothing listens" (the request never arrived: its work may
be done elsewhere) from "no answer came" (it may have been carried out), over TCP and over a
Unix socket (a node's warm pool), against real sockets."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from hydraserve.errors import NotListeningError, UnreachableError
from hydraserve.http_client import ServiceClient, unix_socket_session
from hydraserve.processes import free_port


def serve_once(listener: socket.socket, answer: bytes | None) -> threading.Thread:
    """Accept one connection, read the request, then answer ``answer`` or hang up without one."""
    def run() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            if answer is not None:
                conn.sendall(answer)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def tcp_listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        yield listener


def test_nothing_listening_is_not_listening() -> None:
    client = ServiceClient("svc", f"http://127.0.0.1:{free_port()}", "t", timeout_s=2)
    with pytest.raises(NotListeningError):
        client.request("GET", "/v1/status")


def test_a_hang_up_after_the_request_is_unreachable_not_not_listening(tcp_listener: socket.socket) -> None:
    serve_once(tcp_listener, None)
    client = ServiceClient("svc", f"http://127.0.0.1:{tcp_listener.getsockname()[1]}", "t", timeout_s=2)
    with pytest.raises(UnreachableError) as raised:
        client.request("POST", "/v1/adopt", json={})
    assert not isinstance(raised.value, NotListeningError)


def test_no_answer_in_time_is_unreachable_not_not_listening(tcp_listener: socket.socket) -> None:
    client = ServiceClient("svc", f"http://127.0.0.1:{tcp_listener.getsockname()[1]}", "t", timeout_s=0.3)
    with pytest.raises(UnreachableError) as raised:  # accepted by the kernel's backlog, never answered
        client.request("GET", "/v1/status")
    assert not isinstance(raised.value, NotListeningError)


def test_a_unix_socket_session_carries_the_token_and_both_failures(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    client = ServiceClient("pool", "http://unix", "secret", timeout_s=2, session=unix_socket_session(path))
    with pytest.raises(NotListeningError):  # no socket file yet
        client.request("GET", "/v1/status")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen()
        seen: list[bytes] = []

        def answer() -> None:
            conn, _ = listener.accept()
            with conn:
                seen.append(conn.recv(65536))
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n"
                             b"Connection: close\r\n\r\n{\"ok\": true}")
        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        assert client.request("GET", "/v1/status").json() == {"ok": True}
        thread.join(2)
        assert b"Authorization: Bearer secret" in seen[0]
        serve_once(listener, None)
        with pytest.raises(UnreachableError) as raised:
            client.request("GET", "/v1/status")
        assert not isinstance(raised.value, NotListeningError)
    with pytest.raises(NotListeningError):  # the file is there, nothing listens (a pool that died)
        client.request("GET", "/v1/status")
