"""HydraServe on Knative: serverless LLM functions that cold-start in seconds.

Import root of the distribution. What runs where (docs/LAYOUT.md has the map):

- ``activator`` intercepts scale-from-zero: ``activator.embedded`` is the local gateway,
  ``activator.knative`` the Kubernetes interceptor.
- ``provider``: placement and the cold-start protocol (both deployments); its ``embedded``
  local backends and its ``knative`` Service writer.
- ``runtime``: inside a function's worker (both); ``runtime.embedded`` the node's warm pool.
- ``loaderd``: the per-node loader daemon (both).
- ``embedded``: the embedded deployment's own services (S3, emulated nodes, the stack).
- ``cli``: every command, one module each, named after it.
- Shared by all: ``contracts`` (one typed contract per seam), ``weights`` (model files and the
  one path that moves their bytes), and small kernels (``errors``, ``auth``, ``http_*``,
  ``logs``, ``processes``, ``kube``).
- ``testing``: fakes for tests and benchmarks, never imported by production code.
"""

__version__ = "0.1.0"
