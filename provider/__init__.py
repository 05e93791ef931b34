"""The provider: placement and the cold-start protocol, shared by both deployments.

Runs in both (the embedded stack in-process; on Kubernetes inside the interceptor's control
plane): the cluster model, the SLO-driven planner and its service, the keep-alive policy, the
cold-start protocol (``coldstart``, ``prefetch``, ``worker_port``) and the trace-driven
simulator (``sim``). What is only one deployment's lives apart:

- ``embedded/``: the local backends that start workers as processes (and in emulated nodes);
- ``knative/``: the function written as a Knative Service (read by ``kn hydra`` and the
  interceptor).
"""
