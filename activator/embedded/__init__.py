"""The local gateway: the activator of the embedded deployment (``hydraserve up``/``demo``).

Runs only there. It holds requests through a cold start (``waiting``), proxies them (``proxy``),
scales functions up and down (``scaler``, ``start_failures``), counts usage and serves the
admin API that ``hydraserve fn`` talks to (``admin_routes``/``admin_client``). It reaches the
machines through a ``hydraserve.contracts.backend.FunctionBackend`` (provider/embedded).
"""
