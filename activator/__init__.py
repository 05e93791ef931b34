"""The activator: what intercepts a function's scale-from-zero and asks placement for a plan.

One job, two deployments; each lives in its own subpackage and neither imports the other:

- ``embedded/`` (only ``hydraserve up``/``demo``): the local gateway. Requests arrive here,
  wait through a cold start, and are proxied to a ready instance; it scales to zero.
- ``knative/`` (only on Kubernetes): the interceptor. Knative's activator holds the requests;
  ours watches for a revision's pod scaling from zero, asks the placement service, binds the
  pods to the planned nodes and gives each its stage.
"""
