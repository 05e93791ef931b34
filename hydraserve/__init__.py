"""HydraServe on Knative: serverless LLM functions that cold-start in seconds.

Import root for the whole distribution. The components live in their own packages:
``hydraserve.runtime`` (function runtime and engine), ``hydraserve.loaderd`` (per-node loader
daemon), ``hydraserve.provider`` (placement service, backends, simulator),
``hydraserve.activator`` (scale-from-zero gateway) and ``hydraserve.weights`` (model files:
safetensors layout, S3 access, manifests). Components talk through ``hydraserve.contracts``.
"""

__version__ = "0.1.0"
