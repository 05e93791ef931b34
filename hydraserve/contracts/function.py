"""A function's settings: the one typed definition, with the one default of each.

Everything that takes a function's settings reads them here: the gateway (``hydraserve up``,
``fn create/update`` through its admin API), ``kn hydra create`` (provider/knative/service.py
extends it with where the workers run), the interceptor (from the Service's annotations), the
planner (FunctionSpec's SLO defaults) and the CLI flags, generated from these fields
(hydraserve/cli/flags.py), so ``--help`` shows these defaults and no command has its own.
Names are validated once here, so no other module sees a hostile name.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from hydraserve.contracts.durations import Duration

# DNS-1035 label, as Knative requires for Service names.
_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


def validate_function_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(f"invalid function name {name!r}: lowercase letters, digits and '-', "
                         "starting with a letter, at most 63 characters")
    return name


class FunctionConfig(BaseModel):
    """One LLM function as deployed by a user (durations: seconds, or a text such as ``7.5s``)."""

    name: str
    model_uri: str
    ttft_slo_s: Duration = Field(default=7.5, gt=0, allow_inf_nan=False, description="time-to-first-token target")
    tpot_slo_s: Duration = Field(default=0.2, gt=0, allow_inf_nan=False, description="time-per-output-token target")
    idle_timeout_s: Duration = Field(default=30.0, ge=0, allow_inf_nan=False, description="keep-alive after the last request (with "
                                  "keep_alive histogram: until the function's own history says otherwise)")
    keep_alive: Literal["fixed", "histogram"] = Field(
        default="histogram", description="fixed: idle_timeout_s always; histogram: the hybrid histogram policy "
        "of Serverless in the Wild on the function's idle times (pre-warm before a likely arrival, keep alive "
        "to the tail), idle_timeout_s until there is enough history (provider/keepalive.py)")
    max_queue: int = Field(default=10_000, ge=1, description="requests parked at once (as Knative's activator); "
                           "more get 503 + Retry-After")
    request_timeout_s: Duration = Field(default=120.0, gt=0, allow_inf_nan=False, description="longest a request waits for a free instance")
    concurrency: int = Field(default=32, ge=0, description="requests one instance serves at once (Knative's "
                             "containerConcurrency; 0 = no limit); more wait, and start another instance")
    max_instances: int = Field(default=4, ge=1, le=64, description="instances a function scales out to")
    max_pipeline_size: int = Field(default=4, ge=1, le=4, description="largest pipeline group a cold start may use")
    min_pipeline_size: int = Field(default=1, ge=1, le=4, description="smallest (above 1: a forced group size)")
    consolidate: bool = Field(default=True, description="a group becomes one worker once it serves (False: "
                              "it stays a group until it scales to zero)")
    group_replicas: int = Field(default=1, ge=1, le=4, description="standalone replicas a consolidated pipeline "
                                "group becomes at least (its first N stages get memory for the whole model; at "
                                "most the group's size; more where the TPOT SLO needs more full workers)")
    max_start_attempts: int = Field(default=3, ge=1, le=10, description="cold starts tried while they lose workers")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return validate_function_name(value)

    @model_validator(mode="after")
    def _pipeline_sizes(self) -> FunctionConfig:
        if self.min_pipeline_size > self.max_pipeline_size:
            raise ValueError(f"min_pipeline_size {self.min_pipeline_size} is above max_pipeline_size "
                             f"{self.max_pipeline_size}")
        return self


def setting_default(name: str) -> Any:
    """The default of FunctionConfig's field ``name``, for contracts that carry the same setting."""
    return FunctionConfig.model_fields[name].default
