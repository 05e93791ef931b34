"""A pipeline group on this machine: the head in this process, the other stages as worker
processes, linked over loopback TCP. For ``hydraserve generate --pipeline-size N``.

Stages are split by bytes the way the placement service splits them (the stage slicer's byte
profile, hydraserve.weights.layout). Each inner stage is a real `python -m
hydraserve.runtime.worker` with its part in its environment (hydraserve.contracts.worker); the
head loads stage 0 and wires itself as a group's head (hydraserve.runtime.roles), so this is the
serving path of a cold-started group, minus placement and loaderd. ``close()`` stops every stage.
"""

from __future__ import annotations

import secrets
import sys
import time
from pathlib import Path

from pydantic import SecretStr

from hydraserve.contracts.timeline import Timeline
from hydraserve.contracts.worker import WorkerEnvironment
from hydraserve.processes import ChildProcess, free_port
from hydraserve.runtime.engine.engine import LLMEngine
from hydraserve.runtime.roles import HeadRole
from hydraserve.runtime.startup import load_my_stage, open_files
from hydraserve.runtime.transport.link import listen
from hydraserve.weights.layout import balanced_stage_plan, stage_byte_profile


class LocalGroup:
    """``with LocalGroup(model, 2) as group: group.engine.submit(...)``."""

    def __init__(self, model_uri: str, pipeline_size: int, *, endpoint_url: str | None = None,
                 dtype: str | None = None, max_batch: int = 1, log_dir: Path | None = None) -> None:
        head = WorkerEnvironment(model_uri=model_uri, s3_endpoint_url=endpoint_url, dtype=dtype, max_batch=max_batch,
                                 engine="compact",  # its stages link by our TCP ring, proven by the group's secret
                                 link_secret=SecretStr(secrets.token_urlsafe(32)))
        files = open_files(head, Timeline())
        sizes = {name: entry.nbytes for name, entry in files.tensor_index().items()}
        profile = stage_byte_profile(sizes, files.architecture())
        plan = balanced_stage_plan(profile.per_layer_bytes, profile.first_extra_bytes, profile.last_extra_bytes,
                                   pipeline_size)
        links = [free_port() for _ in plan.stages]
        peers = [f"127.0.0.1:{port}" for port in links]
        self.stages: list[ChildProcess] = []
        self.engine: LLMEngine | None = None
        try:
            for stage, link in zip(plan.stages[1:], links[1:], strict=True):
                env = head.model_copy(update={"stage": stage, "peers": peers, "transport_port": link,
                                              "port": free_port(), "spawned_at": time.time()})
                self.stages.append(ChildProcess(f"stage-{stage.index}", [sys.executable, "-m", "hydraserve.runtime.worker"],
                                                log_path=log_dir / f"stage-{stage.index}.log" if log_dir else None,
                                                env=env.to_env()))
            settings = head.model_copy(update={"stage": plan.stages[0], "peers": peers, "transport_port": links[0]})
            role = HeadRole(settings, listen(peers[0]))
            loaded = load_my_stage(settings, files, Timeline(), role.prepare)
            self.engine = role.wire(loaded, Timeline())
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown(drain=False, timeout=5)
            close = getattr(self.engine.executor, "close", None)
            if close is not None:
                close()
        for stage in self.stages:
            stage.stop(grace_s=5)

    def __enter__(self) -> LocalGroup:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
