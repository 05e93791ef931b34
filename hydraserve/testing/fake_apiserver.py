"""An honest fake Kubernetes API server over real HTTP (no kube-apiserver can run on these
machines), driven by the official kubernetes client exactly as a cluster would be.

Built on kmock's KubernetesEmulator (by Kopf's author): its request parsing, discovery
endpoints and Status errors. kmock 0.8 keeps objects as merged JSON without versions, so this
subclass serves every resource request from a store of its own that adds what our code relies on:

- ``metadata.resourceVersion`` from one cluster-wide counter; a PUT or PATCH carrying a stale
  one, or a DELETE whose preconditions fail, gets 409 Conflict; ``uid``, ``creationTimestamp``,
  ``generateName`` and the namespace are filled in on create; an existing name is 409
  AlreadyExists;
- list and watch with ``labelSelector`` (=, ==, !=, in, notin, key, !key) and ``fieldSelector``
  (=, ==, != on any dotted path, e.g. spec.nodeName or spec.schedulerName); a watch starts
  from ``resourceVersion`` (410 Gone when older than the history kept) or, without one, with
  every object ADDED; ``timeoutSeconds`` ends it;
- PUT replaces, PATCH applies a JSON merge patch (strategic merge patches too, as merge
  patches: lists are replaced, not merged by key) or a JSON patch;
- ``pods/binding`` (POST) sets ``spec.nodeName`` and the PodScheduled condition and copies the
  Binding's annotations onto the pod, as the real pod registry does; binding a bound pod is 409;
- ``status`` subresources (GET, PUT, PATCH) change only ``.status``; a Secret's ``stringData``
  is stored base64-encoded in ``data``;
- deletion honours finalizers (deletionTimestamp until they are removed) and collects dependents
  (ownerReferences by uid, background policy);
- a bearer token is required (401 without it); each user's requests are counted apart, with the
  namespace each was made in (None: cluster-wide) (RBAC is not enforced: tests check a role
  against what its user did, and where).

Not emulated (tests that need them play the part, or run against a real cluster): the kubelet
(pods never run: a test sets their status as a kubelet would), the scheduler and every
controller (Deployments, Knative), admission and defaulting, RBAC, server-side apply and field
managers, pagination (limit/continue), protobuf, and watch bookmarks.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime
import json
import re
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp.web
import jsonpatch
import kmock
from kmock import Request

Key = tuple[str, str, str | None, str]  # (apiVersion path, plural, namespace, name)
HISTORY = 10_000  # watch events kept for resumption


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
                "code": self.code, "reason": self.reason, "message": self.message}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def dotted(obj: dict[str, Any], path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return "" if value is None else str(value)


_LABEL_SET = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split_requirements(selector: str) -> list[str]:
    """Split on commas outside parentheses."""
    parts, depth, current = [], 0, ""
    for ch in selector:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    if current.strip():
        parts.append(current)
    return parts


def label_matches(labels: dict[str, str], selector: str) -> bool:
    for req in _split_requirements(selector):
        req = req.strip()
        if m := _LABEL_SET.match(req):
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            if (labels.get(key) in values) != (op == "in") or (op == "in" and key not in labels):
                return False
        elif "!=" in req:
            key, value = (s.strip() for s in req.split("!=", 1))
            if labels.get(key) == value:
                return False
        elif "=" in req:
            key, value = (s.strip() for s in req.replace("==", "=").split("=", 1))
            if labels.get(key) != value:
                return False
        elif req.startswith("!"):
            if req[1:].strip() in labels:
                return False
        elif req not in labels:
            return False
    return True


def field_matches(obj: dict[str, Any], selector: str) -> bool:
    for req in _split_requirements(selector):
        if "!=" in req:
            path, value = (s.strip() for s in req.split("!=", 1))
            if dotted(obj, path) == value:
                return False
        else:
            path, value = (s.strip() for s in req.replace("==", "=").split("=", 1))
            if dotted(obj, path) != value:
                return False
    return True


@dataclass
class Watcher:
    api: str
    plural: str
    namespace: str | None
    name: str | None
    labels: str
    fields: str
    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)

    def wants(self, key: Key, obj: dict[str, Any]) -> bool:
        api, plural, namespace, name = key
        return (api, plural) == (self.api, self.plural) and self.namespace in (None, namespace) \
            and self.name in (None, name) and label_matches(obj["metadata"].get("labels") or {}, self.labels) \
            and field_matches(obj, self.fields)


class FakeKubernetes(kmock.KubernetesEmulator):
    """The handler: kmock's emulator with versioned objects, selectors, watches and subresources."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.token = ""
        self.users: dict[str, str] = {}  # bearer token -> user name (more users than the admin)
        self.requests_by_user: dict[str, dict[str, int]] = {}
        self.scoped_by_user: dict[str, set[tuple[str, str | None]]] = {}  # ("VERB plural", namespace or None)
        self.store: dict[Key, dict[str, Any]] = {}
        self.history: list[tuple[int, Key, dict[str, Any]]] = []
        self.watchers: list[Watcher] = []
        self.revision = 0
        self.counts: dict[str, int] = {}  # "VERB plural[/sub]" -> requests served (GET, LIST, WATCH, POST...)

    async def _handle(self, request: Request) -> aiohttp.web.StreamResponse:
        if request.resource is None and request.namespace is None:
            return await super()._handle(request)  # discovery, /version
        try:
            given = request.headers.get("Authorization", "").removeprefix("Bearer ")
            user = "admin" if given == self.token else self.users.get(given)
            if not given or user is None:
                raise ApiError(401, "Unauthorized", "a bearer token is required")
            return await self._serve(request, user)
        except ApiError as exc:
            return aiohttp.web.json_response(exc.status(), status=exc.code)

    # ---- routing ------------------------------------------------------------------------------
    async def _serve(self, request: Request, user: str) -> aiohttp.web.StreamResponse:
        res, namespace, name, sub = request.resource, request.namespace, request.name, request.subresource
        if res is None or res.plural is None:  # /api/v1/namespaces/NAME: the namespace itself
            api, plural, name, namespace = "api/v1", "namespaces", namespace, None
        else:
            api = f"apis/{res.group}/{res.version}" if res.group else f"api/{res.version}"
            plural = res.plural
        method = str(request.method.value).upper()
        verb = "WATCH" if request.params.get("watch", "").lower() in ("true", "1") else method
        verb = "LIST" if verb == "GET" and name is None else verb
        what = f"{verb} {plural}{'/' + sub if sub else ''}"
        self.counts[what] = self.counts.get(what, 0) + 1
        mine = self.requests_by_user.setdefault(user, {})
        mine[what] = mine.get(what, 0) + 1
        self.scoped_by_user.setdefault(user, set()).add((what, namespace))
        if verb == "WATCH":
            return await self._watch(request, api, plural, namespace, name)
        if name is None:
            if method == "GET":
                return self._json(self._list(api, plural, namespace, request.params))
            if method == "POST":
                return self._json(self._create(api, plural, namespace, request.data), 201)
            raise ApiError(405, "MethodNotAllowed", f"{method} on a collection")
        key: Key = (api, plural, namespace, name)
        if sub == "binding" and plural == "pods" and method == "POST":
            return self._json(self._bind(key, request.data), 201)
        if sub not in (None, "status"):
            raise ApiError(404, "NotFound", f"subresource {sub!r} is not emulated")
        if method == "GET":
            return self._json(self._get(key))
        if method == "PUT":
            return self._json(self._replace(key, request.data, status_only=sub == "status"))
        if method == "PATCH":
            kind = request.headers.get("Content-Type", "").split(";")[0]
            return self._json(self._patch(key, request.data, kind, status_only=sub == "status"))
        if method == "DELETE":
            return self._json(self._delete(key, request.data if isinstance(request.data, dict) else {}))
        raise ApiError(405, "MethodNotAllowed", method)

    @staticmethod
    def _json(body: dict[str, Any], status: int = 200) -> aiohttp.web.Response:
        return aiohttp.web.json_response(body, status=status)

    # ---- the store ----------------------------------------------------------------------------
    def _get(self, key: Key) -> dict[str, Any]:
        obj = self.store.get(key)
        if obj is None:
            raise ApiError(404, "NotFound", f'{key[1]} "{key[3]}" not found')
        return obj

    def _commit(self, key: Key, obj: dict[str, Any], kind: str) -> dict[str, Any]:
        self.revision += 1
        obj["metadata"]["resourceVersion"] = str(self.revision)
        if kind == "DELETED":
            self.store.pop(key, None)
        else:
            self.store[key] = obj
        event = {"type": kind, "object": copy.deepcopy(obj)}
        self.history.append((self.revision, key, event))
        del self.history[:-HISTORY]
        for watcher in self.watchers:
            if watcher.wants(key, obj):
                watcher.queue.put_nowait(event)
        return obj

    def _list(self, api: str, plural: str, namespace: str | None, params: Mapping[str, str]) -> dict[str, Any]:
        probe = Watcher(api, plural, namespace, None, params.get("labelSelector", ""), params.get("fieldSelector", ""))
        items = [copy.deepcopy(obj) for key, obj in sorted(self.store.items(), key=lambda kv: str(kv[0]))
                 if probe.wants(key, obj)]
        return {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": str(self.revision)},
                "items": items}

    def _create(self, api: str, plural: str, namespace: str | None, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or not isinstance(body.get("metadata"), dict):
            raise ApiError(400, "BadRequest", "the body must be an object with metadata")
        obj = copy.deepcopy(body)
        meta = obj["metadata"]
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if not meta.get("name"):
            raise ApiError(422, "Invalid", "metadata.name: Required value")
        if namespace is not None:
            meta["namespace"] = namespace
        key: Key = (api, plural, namespace, meta["name"])
        if key in self.store:
            raise ApiError(409, "AlreadyExists", f'{plural} "{meta["name"]}" already exists')
        if "resourceVersion" in meta:
            raise ApiError(400, "BadRequest", "resourceVersion should not be set on objects to be created")
        _fold_string_data(plural, obj)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        meta["generation"] = 1
        if plural == "pods":
            obj.setdefault("status", {}).setdefault("phase", "Pending")
        return self._commit(key, obj, "ADDED")

    def _check_version(self, key: Key, current: dict[str, Any], given: Any) -> None:
        if given and given != current["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {key[1]} "{key[3]}": the object '
                           "has been modified; please apply your changes to the latest version and try again")

    def _write(self, key: Key, current: dict[str, Any], new: dict[str, Any], status_only: bool) -> dict[str, Any]:
        if status_only:
            new = {**copy.deepcopy(current), "status": new.get("status", {})}
        else:
            new["status"] = copy.deepcopy(current.get("status", new.get("status", {})))
        keep = {k: current["metadata"][k] for k in ("uid", "creationTimestamp", "namespace", "name",
                                                     "deletionTimestamp", "generation") if k in current["metadata"]}
        new.setdefault("metadata", {}).update(keep)
        if not status_only and new.get("spec") != current.get("spec"):
            new["metadata"]["generation"] = current["metadata"].get("generation", 1) + 1
        meta = new["metadata"]
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            return self._remove(key, new)
        return self._commit(key, new, "MODIFIED")

    def _replace(self, key: Key, body: Any, *, status_only: bool) -> dict[str, Any]:
        current = self._get(key)
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body must be an object")
        self._check_version(key, current, (body.get("metadata") or {}).get("resourceVersion"))
        if key[1] == "pods" and not status_only and (body.get("spec") or {}).get("nodeName") != \
                (current.get("spec") or {}).get("nodeName"):
            raise ApiError(422, "Invalid", "spec.nodeName: pod updates may not change it (use the binding)")
        new = copy.deepcopy(body)
        _fold_string_data(key[1], new)
        return self._write(key, current, new, status_only)

    def _patch(self, key: Key, body: Any, content_type: str, *, status_only: bool) -> dict[str, Any]:
        current = self._get(key)
        if content_type == "application/json-patch+json":
            try:
                new = jsonpatch.apply_patch(copy.deepcopy(current), body)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                raise ApiError(422, "Invalid", f"json patch: {exc}") from exc
        elif content_type in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            if not isinstance(body, dict):
                raise ApiError(400, "BadRequest", "a merge patch must be an object")
            self._check_version(key, current, (body.get("metadata") or {}).get("resourceVersion"))
            new = merge_patch(current, body)
        else:
            raise ApiError(415, "UnsupportedMediaType", f"patch type {content_type!r} is not emulated")
        return self._write(key, current, new, status_only)

    def _delete(self, key: Key, options: dict[str, Any]) -> dict[str, Any]:
        current = self._get(key)
        pre = options.get("preconditions") or {}
        if pre.get("uid") and pre["uid"] != current["metadata"]["uid"]:
            raise ApiError(409, "Conflict", f"precondition failed: uid {pre['uid']} is not {current['metadata']['uid']}")
        self._check_version(key, current, pre.get("resourceVersion"))
        if current["metadata"].get("finalizers"):
            if not current["metadata"].get("deletionTimestamp"):
                marked = copy.deepcopy(current)
                marked["metadata"]["deletionTimestamp"] = _now()
                return self._commit(key, marked, "MODIFIED")
            return current
        return self._remove(key, copy.deepcopy(current))

    def _remove(self, key: Key, obj: dict[str, Any]) -> dict[str, Any]:
        gone = self._commit(key, obj, "DELETED")
        uid = obj["metadata"]["uid"]
        for dep_key, dep in list(self.store.items()):  # the garbage collector, background policy
            owners = dep["metadata"].get("ownerReferences") or []
            if dep_key in self.store and any(ref.get("uid") == uid for ref in owners):
                self._delete(dep_key, {})
        return gone

    def _bind(self, key: Key, body: Any) -> dict[str, Any]:
        pod = self._get(key)
        target = (body or {}).get("target") or {}
        if not target.get("name"):
            raise ApiError(422, "Invalid", "target.name: Required value")
        if pod.get("spec", {}).get("nodeName"):
            raise ApiError(409, "Conflict", f'pod {key[3]} is already assigned to node "{pod["spec"]["nodeName"]}"')
        if pod["metadata"].get("deletionTimestamp"):
            raise ApiError(409, "Conflict", f"pod {key[3]} is being deleted, cannot be assigned to a host")
        bound = copy.deepcopy(pod)
        bound["spec"]["nodeName"] = target["name"]
        annotations = ((body or {}).get("metadata") or {}).get("annotations") or {}
        if annotations:
            bound["metadata"]["annotations"] = {**(bound["metadata"].get("annotations") or {}), **annotations}
        conditions = [c for c in bound["status"].get("conditions", []) if c.get("type") != "PodScheduled"]
        scheduled = {"type": "PodScheduled", "status": "True", "lastTransitionTime": _now()}
        bound["status"]["conditions"] = [*conditions, scheduled]
        self._commit(key, bound, "MODIFIED")
        return {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Success", "code": 201}

    # ---- watch --------------------------------------------------------------------------------
    async def _watch(self, request: Request, api: str, plural: str, namespace: str | None,
                     name: str | None) -> aiohttp.web.StreamResponse:
        params = request.params
        fields = params.get("fieldSelector", "")
        if name is not None:
            fields = ",".join(s for s in (fields, f"metadata.name={name}") if s)
        watcher = Watcher(api, plural, namespace, None, params.get("labelSelector", ""), fields)
        since = params.get("resourceVersion", "")
        backlog: list[dict[str, Any]]
        if since in ("", "0"):
            backlog = [{"type": "ADDED", "object": copy.deepcopy(obj)} for key, obj in self.store.items()
                       if watcher.wants(key, obj)]
        else:
            oldest = self.history[0][0] if self.history else self.revision + 1
            if int(since) < oldest - 1:
                gone = ApiError(410, "Expired", f"too old resource version: {since} ({oldest - 1})")
                backlog = [{"type": "ERROR", "object": gone.status()}]
            else:
                backlog = [event for rv, key, event in self.history
                           if rv > int(since) and watcher.wants(key, event["object"])]
        raw = request._raw_request
        assert raw is not None
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        self.watchers.append(watcher)  # before the first await: no event between backlog and live is lost
        timeout = float(params.get("timeoutSeconds") or 1800)
        try:
            await response.prepare(raw)
            for event in backlog:
                await response.write(json.dumps(event).encode() + b"\n")
                if event["type"] == "ERROR":
                    return response
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while (left := deadline - loop.time()) > 0:
                try:
                    event = await asyncio.wait_for(watcher.queue.get(), left)
                except TimeoutError:
                    break
                await response.write(json.dumps(event).encode() + b"\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.watchers.remove(watcher)
        return response


def _fold_string_data(plural: str, obj: dict[str, Any]) -> None:
    """A Secret's stringData is stored base64-encoded in data, as the API server does."""
    if plural == "secrets" and obj.get("stringData"):
        data = obj.setdefault("data", {})
        for k, v in obj.pop("stringData").items():
            data[k] = base64.b64encode(str(v).encode()).decode()


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeApiServer:
    """The fake served on 127.0.0.1 from a thread of its own (the kubernetes client is sync)."""

    def __init__(self, token: str = "") -> None:
        self.token = token or uuid.uuid4().hex
        self.handler = FakeKubernetes()
        self.handler.token = self.token
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="fake-apiserver", daemon=True)

    def __enter__(self) -> FakeApiServer:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fake API server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with self.handler:
            server = aiohttp.web.Server(self.handler)
            runner = aiohttp.web.ServerRunner(server)
            await runner.setup()
            site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self.url = f"http://127.0.0.1:{port}"
            self._ready.set()
            await self._stop.wait()
            await runner.cleanup()

    def call(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` on the server's loop (between requests) and return its result."""
        async def run() -> Any:
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def objects(self, plural: str, namespace: str | None = None) -> list[dict[str, Any]]:
        return self.call(lambda: [copy.deepcopy(o) for (api, p, ns, n), o in self.handler.store.items()
                                  if p == plural and namespace in (None, ns)])

    def kubeconfig(self, user: str | None = None) -> dict[str, Any]:
        """A kubeconfig for the admin, or for ``user`` (its requests counted apart; the fake
        authorizes everyone for everything: RBAC is checked from what each user did)."""
        token = self.token
        if user is not None:
            token = next((t for t, u in self.handler.users.items() if u == user), "") or uuid.uuid4().hex
            self.handler.users[token] = user
        return {"apiVersion": "v1", "kind": "Config", "current-context": "fake",
                "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                "users": [{"name": "fake", "user": {"token": token}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}]}

