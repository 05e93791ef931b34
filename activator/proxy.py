"""Forward one HTTP request to a function instance and stream the answer back.

Hop-by-hop headers are dropped both ways (RFC 9110 §7.6.1); bodies stream in chunks so SSE
tokens reach the client as they are generated. Only this module talks to instances. An
instance that cannot serve, before it sent anything (nothing answers at its address, or it
answers 503 with an instance failure), raises InstanceFailedError so the gateway can retry the
request elsewhere; one that breaks off a stream under way ends it with an SSE error event
(OpenAI's shape, which the openai client raises as an APIError) and reports ``on_broken``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import requests
from flask import Request, Response

from hydraserve.errors import InstanceFailedError, TemporaryError, error_from_response

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailers", "transfer-encoding", "upgrade", "host", "content-length"}


class InstanceProxy:
    def __init__(self, timeout_s: float = 300.0) -> None:
        self._session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=16, pool_maxsize=64)
        self._session.mount("http://", adapter)
        self._timeout_s = timeout_s

    def forward(self, base_url: str, path: str, request: Request, *, on_first_byte: Callable[[], None],
                on_done: Callable[[], None], on_broken: Callable[[str], None]) -> Response:
        """Send ``request`` to ``base_url + path``; ``on_done`` runs when the body is finished
        (or the request failed), ``on_broken`` when the instance broke off a body under way."""
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        url = base_url.rstrip("/") + "/" + path.lstrip("/")
        try:
            upstream = self._session.request(request.method, url, params=list(request.args.items(multi=True)),
                                             data=request.get_data(), headers=headers, stream=True,
                                             timeout=(5.0, self._timeout_s))
        except requests.ConnectionError as exc:
            on_done()
            raise InstanceFailedError(f"function instance unreachable: {type(exc).__name__}",
                                      retry_after_s=1.0) from None
        except requests.RequestException as exc:
            on_done()
            raise TemporaryError(f"function instance did not answer: {type(exc).__name__}",
                                 retry_after_s=1.0) from None
        if upstream.status_code == 503:
            failure = _instance_failure(upstream)
            if failure is not None:
                on_done()
                raise failure
        on_first_byte()
        event_stream = upstream.headers.get("content-type", "").startswith("text/event-stream")

        def body() -> Iterator[bytes]:
            broken: InstanceFailedError | None = None
            try:
                yield from upstream.iter_content(chunk_size=None)
            except requests.RequestException as exc:
                broken = InstanceFailedError(f"function instance broke off the response: {type(exc).__name__}")
                if event_stream:  # the client hears it first; tearing the instance down takes seconds
                    yield f"data: {json.dumps(broken.to_openai())}\n\n".encode()
            finally:
                upstream.close()
                on_done()
                if broken is not None:
                    on_broken(broken.message)

        out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
        return Response(body(), status=upstream.status_code, headers=out_headers, direct_passthrough=True)


def _instance_failure(upstream: requests.Response) -> InstanceFailedError | None:
    """The InstanceFailedError a 503 carries, if it is one (read and closed); None otherwise."""
    if not upstream.headers.get("content-type", "").startswith("application/json"):
        return None
    try:
        body = json.loads(upstream.content)
    except ValueError:
        return None
    finally:
        upstream.close()
    error = error_from_response(503, body, source="function instance")
    return error if isinstance(error, InstanceFailedError) else None
