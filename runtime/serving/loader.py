"""The ``hydraserve`` load format: vLLM takes each tensor from loaderd's shared memory as it lands.

vLLM builds the model with its own modules (any architecture it runs) and asks this loader for
the weights of the stage its arguments name (``--model-loader-extra-config '{"stage": ...}'``,
null for the whole model). The loader opens the model as the worker's environment says
(hydraserve.contracts.worker, read in this process: vLLM's engine and worker processes inherit
it): through the node's loaderd for an s3:// model, whose fetch began at placement; S3 itself
(the same fetch engine) when no daemon answers; a local directory. It takes exactly the tensors
of this worker's pipeline stage (vLLM's own layer partition must be the plan's: checked) and
feeds them to the model's ``load_weights`` as they land (hydraserve.runtime.serving.weight_stream):
vLLM's set-up (process, import, model construction) runs while the bytes arrive. The tensors are zero-copy views of the segments; vLLM's weight loaders copy them into its
parameters (fusing q/k/v, gate/up), and on a GPU that copy is the host-to-device transfer, tensor
by tensor as they land. Every parameter must be filled, else the load fails naming what is
missing. The loaderd lease is given back once the copy is done. Marks ``weights_attached``,
``first_tensor_loaded`` and ``weights_loaded`` on this process's :data:`LOAD_TIMELINE`, which the
worker reads through its vLLM worker extension (hydraserve.runtime.serving.extension).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

from torch import nn
from vllm.config import ModelConfig
from vllm.model_executor.model_loader.base_loader import BaseModelLoader

from hydraserve.contracts.stage import StageSpec
from hydraserve.contracts.timeline import Timeline
from hydraserve.contracts.worker import WorkerEnvironment
from hydraserve.errors import UnsupportedModelError
from hydraserve.runtime.serving.weight_stream import stream_weights
from hydraserve.weights.model_files import ModelFiles

LOAD_TIMELINE = Timeline()  # this process's loading moments (the worker extension hands them out)


class HydraServeModelLoader(BaseModelLoader):
    """vLLM's loader interface over our model files (hydraserve.weights) and loaderd."""

    def download_model(self, model_config: ModelConfig) -> None:
        """Nothing to download: loaderd (or the fetch engine) streams the bytes during the load."""

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        from hydraserve.runtime.startup import open_files

        settings = WorkerEnvironment.from_env()
        extra = self.load_config.model_loader_extra_config
        planned = extra.get("stage") if isinstance(extra, dict) else None  # this engine's stage (None: whole)
        files = open_files(settings, LOAD_TIMELINE)
        try:
            load = cast("Callable[..., set[str] | None]", model.load_weights)  # every vLLM model has it
            stage = self._my_stage(StageSpec.model_validate(planned) if planned else None, files)
            loaded = stream_weights(files, stage, load, LOAD_TIMELINE)
            _check_every_parameter_filled(model, loaded, files.uri)
        finally:
            files.release_leases()

    @staticmethod
    def _my_stage(planned: StageSpec | None, files: ModelFiles) -> StageSpec:
        """The plan's stage for this engine (the engine's arguments carry it: a consolidating
        head runs a group's stage and the whole model side by side), which must be the layers
        vLLM built here."""
        from vllm.distributed.parallel_state import get_pp_group
        from vllm.distributed.utils import get_pp_indices

        config = files.config()
        num_layers = int(config.get("num_hidden_layers") or config.get("n_layer") or 0)
        stage = planned or StageSpec.whole(max(1, num_layers))
        group = get_pp_group()
        if group.world_size != stage.num_stages or group.rank_in_group != stage.index:
            raise ValueError(f"vLLM runs pipeline rank {group.rank_in_group} of {group.world_size}, the plan "
                             f"says stage {stage.index} of {stage.num_stages}")
        if group.world_size > 1:
            start, end = get_pp_indices(num_layers, group.rank_in_group, group.world_size)
            if (start, end) != (stage.layer_start, stage.layer_end):
                raise ValueError(f"vLLM built layers [{start}, {end}) here, the plan's stage holds "
                                 f"[{stage.layer_start}, {stage.layer_end}) (VLLM_PP_LAYER_PARTITION)")
        return stage


def _check_every_parameter_filled(model: nn.Module, loaded: set[str] | None, uri: str) -> None:
    """vLLM's models return the parameters they filled; one left out would serve random weights."""
    if loaded is None:
        return
    missing = sorted({name for name, _ in model.named_parameters()} - set(loaded))
    if missing:
        raise UnsupportedModelError(f"{uri}: the checkpoint did not fill {len(missing)} parameter(s) of vLLM's "
                                    f"model, e.g. {', '.join(missing[:5])}", param="model")
