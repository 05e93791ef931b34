"""Model tools for users and tests: tiny random models in the Hugging Face layout
(``hydraserve model tiny``, whose command is hydraserve/cli/model.py)."""
