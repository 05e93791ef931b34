"""Local backends of the embedded deployment: workers as processes on this machine or in its
emulated nodes (network namespaces), adopted from a warm pool where one runs.

Run only there. Both implement ``hydraserve.contracts.backend.FunctionBackend`` for the gateway.
"""
