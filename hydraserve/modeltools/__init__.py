"""Model tools for users and tests: tiny random models (``hydraserve model tiny``) and the
``model`` command group that also hosts ``push`` (hydraserve.weights.push)."""
