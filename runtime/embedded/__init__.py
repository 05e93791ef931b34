"""The node's warm pool (fork server) and its client: embedded deployment only.

A pool keeps pre-imported worker processes the local backend adopts; on Kubernetes a pod is the
unit and no pool runs.
"""
