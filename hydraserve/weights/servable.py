"""Whether the serving engine runs a model's architecture: asked of vLLM's own registry, at
``model push`` and when a function is created, so an unsupported model is refused there, naming
its architecture, instead of failing at its first cold start.

vLLM lists the architectures it implements (``config.json``'s ``architectures``, e.g.
``LlamaForCausalLM``) in ``vllm/model_executor/models/registry.py``. Importing vLLM takes seconds,
so the list is read from that file's source (its text-generation tables) without
importing it; where vLLM is not installed (a laptop pushing a model) there is nothing to ask and
the check is skipped, said so in the log.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydraserve.errors import UnsupportedModelError

log = logging.getLogger(__name__)
# vLLM's own text-generation models, and those it serves through its Transformers backend
REGISTRY_TABLES = ("_TEXT_GENERATION_MODELS", "_TRANSFORMERS_SUPPORTED_MODELS")


@functools.cache
def vllm_architectures() -> frozenset[str] | None:
    """The text-generation architectures the installed vLLM implements; None without vLLM."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        return None
    registry = Path(spec.origin).parent / "model_executor" / "models" / "registry.py"
    tables: dict[str, frozenset[str]] = {}
    for node in ast.parse(registry.read_text(encoding="utf-8")).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.value, ast.Dict)):
            continue
        target = node.targets[0]
        if isinstance(target, ast.Name) and target.id in REGISTRY_TABLES:
            tables[target.id] = frozenset(str(k.value) for k in node.value.keys if isinstance(k, ast.Constant))
    if set(tables) != set(REGISTRY_TABLES):
        raise RuntimeError(f"{registry} lacks {set(REGISTRY_TABLES) - set(tables)}: this vLLM lists its models elsewhere")
    return frozenset().union(*tables.values())


def check_servable(config: Mapping[str, Any], where: str) -> None:
    """UnsupportedModelError naming the architecture if vLLM does not run ``config`` (a parsed
    config.json of the model at ``where``)."""
    known = vllm_architectures()
    if known is None:
        log.warning("vLLM is not installed here: %s's architecture is not checked", where)
        return
    named = config.get("architectures")
    if not isinstance(named, list) or not named or not all(isinstance(a, str) for a in named):
        raise UnsupportedModelError(f"{where}/config.json names no architecture (its 'architectures' list, as "
                                    "transformers' save_pretrained writes it)", param="model")
    missing = [a for a in named if a not in known]
    if missing:
        raise UnsupportedModelError(f"{where}: vLLM does not run the architecture {', '.join(missing)} "
                                    f"(model_type {config.get('model_type')!r}); it runs {len(known)} others, "
                                    "listed in vLLM's supported models", param="model")
