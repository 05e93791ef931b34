"""Backends that carry out a placement plan: local processes (embedded default) and
Kubernetes pods (production). Both implement hydraserve.activator.ports.FunctionBackend."""
