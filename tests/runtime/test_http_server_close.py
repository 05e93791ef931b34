"""DrainingServer.close frees its port and its thread, also when the event loop's trigger is gone."""

from __future__ import annotations

import errno
import socket

import requests

from hydraserve.http_server import DrainingServer


def hello(environ: dict, start_response: object) -> list[bytes]:
    start_response("200 OK", [("content-type", "text/plain")])  # type: ignore[operator]
    return [b"hi"]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_close_after_serving_frees_port_and_thread() -> None:
    server = DrainingServer(hello, "127.0.0.1", 0, threads=2).start()
    session = requests.Session()  # keeps an idle keep-alive connection open across close()
    assert session.get(server.url, timeout=5).text == "hi"
    server.close()
    session.close()
    assert not server._thread.is_alive()
    assert port_is_free(server.port)


def test_close_survives_a_dead_trigger() -> None:
    """Seen once in CI: the trigger's pipe was already closed when close() pulled it (EBADF)."""
    server = DrainingServer(hello, "127.0.0.1", 0, threads=2).start()
    assert requests.get(server.url, timeout=5).text == "hi"

    def dead_pipe() -> None:
        raise OSError(errno.EBADF, "Bad file descriptor")

    # not a real os.close: a closed fd number can be reused by another test's socket at once
    server._server.trigger._physical_pull = dead_pipe
    server.close()
    assert not server._thread.is_alive()
    assert port_is_free(server.port)
