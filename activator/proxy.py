"""Forward one HTTP request to a function instance and stream the answer back.

Hop-by-hop headers are dropped both ways (RFC 9110 §7.6.1); bodies stream in chunks so SSE
tokens reach the client as they are generated. Only this module talks to instances.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import requests
from flask import Request, Response

from hydraserve.errors import TemporaryError

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailers", "transfer-encoding", "upgrade", "host", "content-length"}


class InstanceProxy:
    def __init__(self, timeout_s: float = 300.0) -> None:
        self._session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=16, pool_maxsize=64)
        self._session.mount("http://", adapter)
        self._timeout_s = timeout_s

    def forward(self, base_url: str, path: str, request: Request, *,
                on_first_byte: Callable[[], None], on_done: Callable[[], None]) -> Response:
        """Send ``request`` to ``base_url + path``; ``on_done`` runs when the body is finished."""
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        url = base_url.rstrip("/") + "/" + path.lstrip("/")
        try:
            upstream = self._session.request(request.method, url, params=list(request.args.items(multi=True)),
                                             data=request.get_data(), headers=headers, stream=True,
                                             timeout=(5.0, self._timeout_s))
        except requests.RequestException as exc:
            on_done()
            raise TemporaryError(f"function instance unreachable: {type(exc).__name__}",
                                 retry_after_s=1.0) from None
        on_first_byte()

        def body() -> Iterator[bytes]:
            try:
                yield from upstream.iter_content(chunk_size=None)
            finally:
                upstream.close()
                on_done()

        out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
        return Response(body(), status=upstream.status_code, headers=out_headers, direct_passthrough=True)
