"""A function's model as the placement service sees it: its FunctionSpec, read from the model.

Every backend needs it once per function (at deploy time, not on a cold start): the real bytes
of each decoder layer, of what only stage 0 holds and of what only the last stage holds, by the
stage slicer's own rules (hydraserve.weights.layout), so the planner's byte counts are the
bytes loaderd will fetch. Reads config.json and the safetensors headers (one ranged GET each).
A model whose architecture the serving engine does not run is refused here, naming it: a function
of it is never created (hydraserve.weights.servable).
"""

from __future__ import annotations

from hydraserve.contracts.function import FunctionConfig
from hydraserve.contracts.plan import FunctionSpec
from hydraserve.contracts.stage import MAX_PIPELINE_SIZE
from hydraserve.weights.layout import stage_byte_profile
from hydraserve.weights.model_files import StoredModelFiles
from hydraserve.weights.servable import check_servable


def describe_model(function: FunctionConfig, files: StoredModelFiles) -> FunctionSpec:
    """The FunctionSpec of ``function`` (whose model ``files`` opens) with its SLOs, once vLLM is
    known to serve the model."""
    names = files.list_files()
    check_servable(files.config() if "config.json" in names else {}, function.model_uri, names)
    return spec_of(function, files)


def spec_of(function: FunctionConfig, files: StoredModelFiles) -> FunctionSpec:
    """The FunctionSpec of any model the stage slicer reads (whether vLLM serves it or not)."""
    sizes = {name: entry.nbytes for name, entry in files.tensor_index().items()}
    profile = stage_byte_profile(sizes, files.architecture())
    return FunctionSpec(
        name=function.name, model_uri=function.model_uri, model_size_bytes=profile.total_bytes,
        num_layers=len(profile.per_layer_bytes), layer_bytes=profile.per_layer_bytes,
        embed_bytes=profile.first_extra_bytes, head_bytes=profile.last_extra_bytes,
        tied_bytes=profile.tied_bytes, ttft_slo_s=function.ttft_slo_s, tpot_slo_s=function.tpot_slo_s,
        max_pipeline_size=function.max_pipeline_size, min_pipeline_size=function.min_pipeline_size,
        min_full_workers=function.group_replicas if function.consolidate else 0,
        max_full_workers=MAX_PIPELINE_SIZE if function.consolidate else 0)  # a full worker that never consolidates wastes memory
