"""Pipeline stage plan: which decoder layers (and embeddings / head) each stage holds.

Shared by the placement service (which chooses it), loaderd (which prefetches the byte ranges
of a stage) and the runtime (which builds only its stage's modules). docs/PROTOCOLS.md describes
it; hydraserve.weights.layout decides which tensors each stage holds.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_PIPELINE_SIZE = 4


class StageSpec(BaseModel):
    """One pipeline stage: decoder layers [layer_start, layer_end) of a model with num_layers."""

    model_config = ConfigDict(frozen=True)

    index: int = Field(ge=0, lt=MAX_PIPELINE_SIZE)
    num_stages: int = Field(ge=1, le=MAX_PIPELINE_SIZE)
    layer_start: int = Field(ge=0)
    layer_end: int = Field(ge=0)
    num_layers: int = Field(ge=1)

    @model_validator(mode="after")
    def _check_bounds(self) -> StageSpec:
        if self.index >= self.num_stages:
            raise ValueError(f"stage index {self.index} >= num_stages {self.num_stages}")
        if not (0 <= self.layer_start <= self.layer_end <= self.num_layers):
            raise ValueError(
                f"layer range [{self.layer_start}, {self.layer_end}) outside 0..{self.num_layers}"
            )
        return self

    @property
    def is_first(self) -> bool:
        """Stage 0 owns the token (and position) embeddings."""
        return self.index == 0

    @property
    def is_last(self) -> bool:
        """The last stage owns the final norm and the LM head."""
        return self.index == self.num_stages - 1

    @classmethod
    def whole(cls, num_layers: int) -> StageSpec:
        """The single stage of an unsplit model."""
        return cls(index=0, num_stages=1, layer_start=0, layer_end=num_layers, num_layers=num_layers)


class StagePlan(BaseModel):
    """All stages of one pipeline group; stages tile [0, num_layers) in order."""

    model_config = ConfigDict(frozen=True)

    num_layers: int = Field(ge=1)
    stages: list[StageSpec] = Field(min_length=1, max_length=MAX_PIPELINE_SIZE)

    @model_validator(mode="after")
    def _check_tiling(self) -> StagePlan:
        expected_start = 0
        for i, stage in enumerate(self.stages):
            if stage.index != i or stage.num_stages != len(self.stages):
                raise ValueError(f"stage {i} has index {stage.index} of {stage.num_stages}")
            if stage.num_layers != self.num_layers:
                raise ValueError(f"stage {i} disagrees on num_layers")
            if stage.layer_start != expected_start:
                raise ValueError(f"stage {i} starts at {stage.layer_start}, expected {expected_start}")
            expected_start = stage.layer_end
        if expected_start != self.num_layers:
            raise ValueError(f"stages end at layer {expected_start}, model has {self.num_layers}")
        return self

    @classmethod
    def from_boundaries(cls, num_layers: int, boundaries: list[int]) -> StagePlan:
        """Build from layer boundaries [0, b1, ..., num_layers]."""
        n = len(boundaries) - 1
        return cls(
            num_layers=num_layers,
            stages=[
                StageSpec(
                    index=i,
                    num_stages=n,
                    layer_start=boundaries[i],
                    layer_end=boundaries[i + 1],
                    num_layers=num_layers,
                )
                for i in range(n)
            ],
        )
