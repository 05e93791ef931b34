"""The Kubernetes interceptor: the activator on a Knative cluster.

Runs only on Kubernetes, in the control-plane Deployment (``hydraserve interceptor``). While it
holds the Lease (``leader``) it watches scale-from-zero pods, asks the placement service,
binds pods to nodes (``pods``, ``nodes``) and writes each function's NetworkPolicy (``policy``).
"""
