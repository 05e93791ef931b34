"""Test helpers and honest fakes (the fake Kubernetes API server lives here), importable by
the tests and by the benchmarks. Nothing in production code imports this package."""
