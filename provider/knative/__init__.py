"""Knative: the function as a Knative Service and the kn plugin."""
