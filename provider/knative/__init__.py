"""A function as a Knative Service: the one writer of its manifest and annotations.

Kubernetes only: read by ``kn hydra`` (which creates the Service) and by the interceptor (which
reads its settings back from the annotations).
"""
