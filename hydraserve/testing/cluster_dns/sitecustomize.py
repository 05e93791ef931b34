"""Cluster DNS for a test's worker processes (imported at interpreter start-up when this folder
is on PYTHONPATH): names in HYDRASERVE_TEST_DNS (a JSON object: name -> IP) resolve to their IP,
as a cluster's DNS resolves a headless Service to its pod; every other name as usual.
hydraserve/testing/fake_kubelet.py builds the map from the Services and pods in the API."""

from __future__ import annotations

import json
import os
import socket

_NAMES: dict[str, str] = json.loads(os.environ.get("HYDRASERVE_TEST_DNS") or "{}")
if _NAMES:
    _getaddrinfo = socket.getaddrinfo

    def _cluster_getaddrinfo(host, *args, **kwargs):
        if isinstance(host, str) and host in _NAMES:
            host = _NAMES[host]
        return _getaddrinfo(host, *args, **kwargs)

    socket.getaddrinfo = _cluster_getaddrinfo
