"""Test helpers and honest fakes, importable by the tests and the benchmarks: the fake
Kubernetes API server (``fake_apiserver``) and kubelet (``fake_kubelet``), a fake backend, a
real TCP proxy that cuts connections (``faults``) and a tensor source that counts what was
asked of it (``counting_source``). Nothing in production code imports this package
(import-linter holds it)."""
