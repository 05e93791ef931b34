"""The gateway's admin API: functions created, updated, described, read (logs, timeline) and
deleted at run time. The app's middleware checks the admin bearer token before any of these."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from hydraserve.contracts.function import FunctionConfig
from hydraserve.errors import InvalidRequestError
from hydraserve.http_json import decode_json, validate

if TYPE_CHECKING:
    from hydraserve.activator.embedded.gateway import Gateway

DEFAULT_LOG_TAIL, MAX_LOG_TAIL = 200, 10_000  # lines per worker that GET /v1/functions/{name}/logs returns


def _log_tail(text: str | None) -> int:
    """?tail=N, the lines per worker: bounded (a worker's log grows for as long as it serves)."""
    if text is None:
        return DEFAULT_LOG_TAIL
    try:
        tail = int(text)
    except ValueError:
        tail = 0
    if not 1 <= tail <= MAX_LOG_TAIL:
        raise InvalidRequestError(f"tail: must be a whole number from 1 to {MAX_LOG_TAIL}", param="tail")
    return tail


def add_admin_routes(router: web.UrlDispatcher, gateway: Gateway,
                     read_body: Callable[[web.Request], Awaitable[bytes]]) -> None:
    """/v1/functions and below (before the gateway's catch-all route)."""

    async def list_functions(_request: web.Request) -> web.Response:
        return web.json_response({"functions": [s.status() for s in gateway.functions()]})

    async def create_function(request: web.Request) -> web.Response:
        config = validate(FunctionConfig, decode_json(await read_body(request)))
        scaler = await gateway.create(config)
        return web.json_response(scaler.status() | {"config": config.model_dump(mode="json")}, status=201)

    async def describe_function(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        scaler = gateway.scaler(name)
        merged = await gateway.blocking(gateway.cold_start_timeline, name)
        return web.json_response(scaler.status() | {"config": scaler.config.model_dump(mode="json"),
                                                    "last_cold_start": merged.model_dump(mode="json")})

    async def update_function(request: web.Request) -> web.Response:
        scaler, changed = await gateway.update(request.match_info["name"], decode_json(await read_body(request)))
        return web.json_response(scaler.status() | {"config": scaler.config.model_dump(mode="json"), "changed": {
            k: {"from": old, "to": new} for k, (old, new) in changed.items()}})

    async def function_logs(request: web.Request) -> web.Response:
        tail = _log_tail(request.query.get("tail"))
        logs = await gateway.blocking(gateway.worker_logs, request.match_info["name"], tail)
        return web.json_response({"workers": [dataclasses.asdict(w) for w in logs]})

    async def delete_function(request: web.Request) -> web.Response:
        stopped = await gateway.delete(request.match_info["name"])
        return web.json_response({"name": request.match_info["name"], "deleted": True, "stopped_instances": stopped})

    async def timeline(request: web.Request) -> web.Response:
        merged = await gateway.blocking(gateway.cold_start_timeline, request.match_info["name"])
        return web.json_response(merged.model_dump(mode="json"))

    router.add_get("/v1/functions", list_functions)
    router.add_post("/v1/functions", create_function)
    router.add_get("/v1/functions/{name}", describe_function)
    router.add_patch("/v1/functions/{name}", update_function)
    router.add_delete("/v1/functions/{name}", delete_function)
    router.add_get("/v1/functions/{name}/logs", function_logs)
    router.add_get("/v1/functions/{name}/timeline", timeline)
