"""The backend-neutral cold start against its launcher port: a fake launcher (no processes), the
real placement service in-process and real loaderds (local directories standing in for S3).
Every step in order, the worker environment written through the contract, and every failure
path leaving no plan, lease or worker behind."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hydraserve.auth import NodeKeys, Principal, verify_worker_token
from hydraserve.contracts.function import FunctionConfig
from hydraserve.contracts.plan import FunctionSpec, NodeInfo, WorkerReport
from hydraserve.contracts.timeline import Moment, Timeline
from hydraserve.contracts.worker import WorkerEnvironment, WorkerStatus
from hydraserve.errors import InstanceFailedError, TemporaryError
from hydraserve.loaderd.daemon import LoaderDaemon
from hydraserve.loaderd.service import LoaderConfig
from hydraserve.modeltools.tiny import TinySpec, make_tiny_model
from hydraserve.provider.coldstart import ColdStart, ColdStartOptions
from hydraserve.provider.embedded.local import LocalNode
from hydraserve.provider.model_spec import describe_model
from hydraserve.provider.service import PlacementService
from hydraserve.provider.worker_port import WorkerSlot
from hydraserve.weights.model_files import LocalModelFiles
from tests.loaderd.conftest import LocalStores, write_manifest

URI = "s3://models/tiny"
TOKEN = "c" * 32


@dataclass
class FakeWorker:
    url: str
    env: WorkerEnvironment
    spawned_at: float
    node: str
    fail: str | None = None
    stopped: bool = False
    consolidated: bool = False
    state: str = "ready"
    adopted: bool = False
    gone: bool = False  # "killed": lost once wait_ready ran

    def wait_ready(self, timeout_s: float) -> None:
        if self.gone:
            raise TemporaryError("worker exited with code -9")
        if self.fail:
            raise TemporaryError(self.fail)

    def status(self) -> WorkerStatus:
        return WorkerStatus(status=self.state, consolidated=self.consolidated)  # type: ignore[arg-type]

    def timeline(self) -> Timeline:
        return Timeline()

    def stop(self, grace_s: float = 10.0) -> object:
        self.stopped = True
        return 0

    def lost(self) -> bool:
        return self.gone and not self.stopped


@dataclass
class FakeLauncher:
    """Records what it was asked to start; the environment crosses the contract both ways."""

    fail_ready: str | None = None
    fail_launch: Exception | None = None
    lose_stage: int | None = None  # this stage's worker is killed before it is ready
    workers: list[FakeWorker] = field(default_factory=list)
    ports: int = 40000

    def reserve(self, node: str) -> WorkerSlot:
        self.ports += 2
        return WorkerSlot("127.0.0.1", self.ports, self.ports + 1)

    def launch(self, node: str, env: WorkerEnvironment) -> FakeWorker:
        if self.fail_launch is not None:
            raise self.fail_launch
        written = env.to_env()  # what a child process or a pod would be given
        assert WorkerEnvironment.from_env(written) == env
        worker = FakeWorker(f"http://{env.host}:{env.port}", env, env.spawned_at or 0.0, node, self.fail_ready)
        worker.gone = self.lose_stage is not None and (env.stage.index if env.stage else 0) == self.lose_stage
        self.workers.append(worker)
        return worker


S3_URL = "http://s3:9000"  # the cold start names it; the daemons are configured for it (their bytes are local)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_tiny_model(tmp_path_factory.mktemp("coldstart") / "tiny", TinySpec(arch="llama", layers=4))
    write_manifest(root, per_tensor=True)
    return root


@pytest.fixture
def loaderds(model_dir: Path, node_name: str) -> Iterator[list[LoaderDaemon]]:
    daemons = [LoaderDaemon(LoaderConfig(node_name=f"{node_name}{i}", budget_bytes=256 << 20, endpoint_url=S3_URL),
                            TOKEN, open_model=LocalStores({URI: model_dir})).start() for i in range(2)]
    yield daemons
    for d in daemons:
        d.stop()


def _daemon_of(loaderds: list[LoaderDaemon], node: str) -> LoaderDaemon:
    return next(d for d in loaderds if d.service.config.node_name == node)


def spec(model_dir: Path, scale: int = 1, ttft_slo_s: float = 10.0) -> FunctionSpec:
    """The tiny model's real description; ``scale`` multiplies its bytes (to make fetches slow)."""
    s = describe_model(FunctionConfig(name="tiny", model_uri=URI, ttft_slo_s=ttft_slo_s), LocalModelFiles(model_dir))
    return s.model_copy(update={"model_size_bytes": s.model_size_bytes * scale,
                                "layer_bytes": [b * scale for b in s.layer_bytes or []],
                                "embed_bytes": s.embed_bytes * scale, "head_bytes": s.head_bytes * scale,
                                "tied_bytes": s.tied_bytes * scale})


def setup(loaderds: list[LoaderDaemon], launcher: FakeLauncher, *, nic_gbps: float = 16.0,
          urls: list[str] | None = None, **options: object) -> tuple[ColdStart, PlacementService]:
    placement = PlacementService()
    nodes = {}
    for i, url in enumerate(urls or [d.url for d in loaderds]):
        name = loaderds[i].service.config.node_name if i < len(loaderds) else f"node{i}"  # as its daemon knows it
        placement.register_node(NodeInfo(name=name, gpus=1, gpu_memory_gb=40, nic_gbps=nic_gbps, loaderd_url=url))
        nodes[name] = LocalNode(name, url, loaderds[i].token if i < len(loaderds) else TOKEN)
    return ColdStart(placement, launcher, nodes, ColdStartOptions(**options)), placement  # type: ignore[arg-type]


def leases(d: LoaderDaemon) -> int:
    return len(d.service.registry.leases)


def test_the_protocol_runs_in_order_and_writes_the_worker_environment(loaderds: list[LoaderDaemon],
                                                                       model_dir: Path) -> None:
    launcher = FakeLauncher()
    coldstart, placement = setup(loaderds, launcher, s3_endpoint_url=S3_URL)
    timeline = Timeline()
    timeline.mark(Moment.REQUEST_RECEIVED, component="test")
    group = coldstart.run(spec(model_dir), timeline)

    names = [e.name for e in timeline.events]
    assert names[:4] == ["request_received", "plan_decided", "prefetch_started", "worker_spawned"]
    (worker,) = launcher.workers
    assert group.head is worker and group.plan.pipeline_size == 1
    env = worker.env
    node = next(n for n in group.plan.stages).node
    daemon = _daemon_of(loaderds, node)
    assert (env.function, env.model_uri, env.instance_id) == ("tiny", URI, group.plan.instance_id)
    assert env.stage is None and env.full and env.is_head and env.peers == [f"127.0.0.1:{env.transport_port}"]
    assert env.loaderd_url == daemon.url and env.loaderd_token is not None
    worker_token = env.loaderd_token.get_secret_value()  # the worker's own, not the node's
    assert worker_token != TOKEN and worker_token not in repr(env)
    keys = NodeKeys.derive(TOKEN, node)
    assert verify_worker_token(keys, worker_token, time.time()) == Principal(subject=f"{env.instance_id}/0",
                                                                             admin=False, model_uri=URI)
    assert env.s3_endpoint_url == S3_URL and env.host == "127.0.0.1"
    assert placement.status().active_plans == 1
    assert placement.plan_of(group.plan.plan_id) is not None
    assert leases(daemon) == 0  # the prefetch pin is dropped once the worker is ready (it holds its own)
    coldstart.stop(group)
    assert worker.stopped and placement.status().active_plans == 0


def test_a_node_the_backend_cannot_launch_on_is_planned_around(loaderds: list[LoaderDaemon],
                                                                model_dir: Path) -> None:
    """Issue 22 item 10: a node registered with the placement that this backend does not have
    (a fake one, or one it lost) failed every cold start planned on it; it is planned around,
    its reservation released."""
    launcher = FakeLauncher()
    coldstart, placement = setup(loaderds, launcher)
    placement.register_node(NodeInfo(name="aaa-fake", gpus=1, gpu_memory_gb=400, nic_gbps=400))  # the planner's favourite
    probe = placement.plan(coldstart.plan_request(spec(model_dir)))
    assert probe.nodes == ["aaa-fake"]
    placement.report(WorkerReport(plan_id=probe.plan_id, event="failed"))
    group = coldstart.run(spec(model_dir), Timeline())
    assert "aaa-fake" not in group.plan.nodes and placement.status().active_plans == 1
    coldstart.stop(group)
    assert placement.status().active_plans == 0


def test_a_worker_that_cannot_start_stops_the_group_and_frees_plan_and_leases(
        loaderds: list[LoaderDaemon], model_dir: Path) -> None:
    launcher = FakeLauncher(fail_ready="worker failed to start: no GPU")
    coldstart, placement = setup(loaderds, launcher)
    with pytest.raises(TemporaryError, match="no GPU"):
        coldstart.run(spec(model_dir), Timeline())
    assert [w.stopped for w in launcher.workers] == [True]
    assert placement.status().active_plans == 0
    assert all(leases(d) == 0 for d in loaderds)


def test_a_launcher_that_raises_becomes_a_clear_temporary_error(loaderds: list[LoaderDaemon],
                                                                model_dir: Path) -> None:
    launcher = FakeLauncher(fail_launch=OSError("exec format error"))
    coldstart, placement = setup(loaderds, launcher)
    with pytest.raises(TemporaryError, match="cold start failed: OSError: exec format error"):
        coldstart.run(spec(model_dir), Timeline())
    assert placement.status().active_plans == 0 and all(leases(d) == 0 for d in loaderds)


def test_an_unreachable_loaderd_skips_the_prefetch_and_the_worker_fetches_itself(
        loaderds: list[LoaderDaemon], model_dir: Path) -> None:
    launcher = FakeLauncher()
    dead = "http://127.0.0.1:9"
    coldstart, _ = setup(loaderds, launcher, urls=[dead, dead])
    timeline = Timeline()
    coldstart.run(spec(model_dir), timeline)
    skipped = timeline.first("prefetch_skipped")
    assert skipped is not None and "did not answer" in str(skipped.detail["reason"])
    assert timeline.first("prefetch_started") is None
    assert launcher.workers[0].env.loaderd_url == dead  # the worker tries, then falls back to S3


def test_the_baseline_prefetches_nothing_and_gives_no_loaderd(loaderds: list[LoaderDaemon],
                                                              model_dir: Path) -> None:
    launcher = FakeLauncher()
    coldstart, _ = setup(loaderds, launcher, prefetch=False)
    timeline = Timeline()
    coldstart.run(spec(model_dir), timeline)
    assert timeline.first("prefetch_skipped") is not None and timeline.first("prefetch_started") is None
    assert launcher.workers[0].env.loaderd_url is None
    assert all(not d.service.registry.segments for d in loaderds)


def test_a_pipeline_group_prefetches_each_stage_on_its_node_and_tells_each_worker_its_part(
        loaderds: list[LoaderDaemon], model_dir: Path) -> None:
    """On slow NICs the planner splits the model over both nodes; each node's loaderd is told to
    fetch only its stage before any worker exists, and each worker learns its stage and peers."""
    launcher = FakeLauncher()
    coldstart, _ = setup(loaderds, launcher, nic_gbps=1.0, max_pipeline_size=2)
    big = spec(model_dir, scale=16_000, ttft_slo_s=80.0)  # ~15 GB: over one 1 Gbit/s NIC, 130 s
    group = coldstart.run(big, Timeline())
    assert group.plan.pipeline_size == 2 and len(set(group.plan.nodes)) == 2
    addresses = [f"{w.env.host}:{w.env.transport_port}" for w in launcher.workers]
    for st, worker in zip(group.plan.stages, launcher.workers, strict=True):
        env = worker.env
        assert env.stage == st.stage and env.full == st.full and env.peers == addresses
        assert env.is_head == (st.stage.index == 0)
        daemon = _daemon_of(loaderds, st.node)
        groups = {s.group for s in daemon.service.registry.segments.values()}
        layers = {f"layer.{i}" for i in range(st.stage.layer_start, st.stage.layer_end)}
        assert layers <= groups and not {f"layer.{i}" for i in range(4)} - layers & groups  # only its stage
    coldstart.stop(group)


def test_each_stage_reports_its_own_fetch_and_start_up(loaderds: list[LoaderDaemon], model_dir: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Each node calibrates its bandwidth from its own stage's bytes (not the group's total over
    one node's time) and its start-up from its own worker; a cold start without prefetch (its
    workers fetch their own weights) is no calibration sample at all."""
    launcher = FakeLauncher()
    coldstart, placement = setup(loaderds, launcher, nic_gbps=1.0, max_pipeline_size=2)
    reports: list[WorkerReport] = []
    real = placement.report
    monkeypatch.setattr(placement, "report", lambda r, **kw: reports.append(r) or real(r, **kw))
    group = coldstart.run(spec(model_dir, scale=16_000, ttft_slo_s=80.0), Timeline())
    ready = [r for r in reports if r.event == "ready"]
    assert [r.stage for r in ready] == [0, 1]
    for report, st in zip(ready, group.plan.stages, strict=True):
        daemon = _daemon_of(loaderds, st.node)
        own = sum(seg.layout.tensor_bytes for seg in daemon.service.registry.segments.values())
        assert report.timings.fetch_bytes == own > 0  # this node's stage, fetched fresh
        assert report.timings.cold_start_s is not None and report.timings.sample
    coldstart.stop(group)
    reports.clear()
    baseline, _ = setup(loaderds, FakeLauncher(), prefetch=False)
    monkeypatch.setattr(baseline, "_placement", placement)
    baseline.run(spec(model_dir), Timeline())
    assert [r.timings.sample for r in reports if r.event == "ready"] == [False]


def test_once_the_head_consolidated_the_other_stages_go_and_their_memory_is_freed(
        loaderds: list[LoaderDaemon], model_dir: Path) -> None:
    launcher = FakeLauncher()
    coldstart, placement = setup(loaderds, launcher, nic_gbps=1.0, max_pipeline_size=2, watch_s=0.02)
    timeline = Timeline()
    group = coldstart.run(spec(model_dir, scale=16_000, ttft_slo_s=80.0), timeline)
    head, inner = launcher.workers
    assert group.plan.stages[0].full and not group.consolidated.wait(0.2)  # not before the head says so
    head.consolidated = True
    assert group.consolidated.wait(5)
    assert inner.stopped and not head.stopped and group.workers == [head]
    freed = {n.name: sum(n.gpu_free_gb) for n in placement.status().nodes}
    assert freed[group.plan.stages[1].node] == 40  # the inner stage's node: all free again
    assert freed[group.plan.stages[0].node] < 40  # the head keeps its whole-model memory
    assert placement.status().active_plans == 1 and timeline.first("group_consolidated") is not None
    coldstart.stop(group)
    assert head.stopped and placement.status().active_plans == 0


def _two_full_workers(model_dir: Path) -> FunctionSpec:
    return spec(model_dir, scale=16_000, ttft_slo_s=80.0).model_copy(update={"min_full_workers": 2})


def _free_gb(placement: PlacementService) -> dict[str, float]:
    return {n.name: sum(n.gpu_free_gb) for n in placement.status().nodes}


def _replicas_within(coldstart: ColdStart, group: object, timeout_s: float = 5.0) -> list[object]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        taken = coldstart.take_replicas(group)  # type: ignore[arg-type]
        if taken:
            return list(taken)
        time.sleep(0.01)
    return []


def test_a_group_with_two_full_workers_becomes_two_replicas_each_freed_on_its_own(
        loaderds: list[LoaderDaemon], model_dir: Path) -> None:
    launcher = FakeLauncher()
    coldstart, placement = setup(loaderds, launcher, nic_gbps=1.0, max_pipeline_size=2, watch_s=0.02)
    timeline = Timeline()
    group = coldstart.run(_two_full_workers(model_dir), timeline)
    head, inner = launcher.workers
    assert [st.full for st in group.plan.stages] == [True, True] and inner.env.full
    head.consolidated = True
    assert group.consolidated.wait(5) and group.workers == [head] and not inner.stopped
    assert coldstart.take_replicas(group) == []  # not before the inner stage says it serves alone
    inner.consolidated = True
    (replica,) = _replicas_within(coldstart, group)
    assert replica.workers == [inner] and replica.instance_id == f"{group.instance_id}-s1"
    assert coldstart.take_replicas(group) == []  # handed out once
    assert timeline.first("replica_ready") is not None
    assert all(free < 40 for free in _free_gb(placement).values())  # both keep whole-model memory
    coldstart.stop(group)
    assert head.stopped and not inner.stopped and placement.status().active_plans == 1
    assert _free_gb(placement)[group.plan.stages[0].node] == 40  # the head's memory alone came back
    coldstart.stop(replica)
    assert inner.stopped and placement.status().active_plans == 0
    assert all(free == 40 for free in _free_gb(placement).values())


@pytest.mark.parametrize("how", ["draining", "lost", "group_stopped"])
def test_a_full_stage_that_does_not_become_a_replica_is_stopped_and_freed(
        loaderds: list[LoaderDaemon], model_dir: Path, how: str) -> None:
    """Its build failed (it drains after the release), it died, or its group scaled in first."""
    launcher = FakeLauncher()
    coldstart, placement = setup(loaderds, launcher, nic_gbps=1.0, max_pipeline_size=2, watch_s=0.02)
    timeline = Timeline()
    group = coldstart.run(_two_full_workers(model_dir), timeline)
    head, inner = launcher.workers
    head.consolidated = True
    assert group.consolidated.wait(5)
    if how == "draining":
        inner.state = "draining"
    elif how == "lost":
        inner.gone = True
    else:
        coldstart.stop(group)
    deadline = time.monotonic() + 5
    while timeline.first("replica_failed") is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert timeline.first("replica_failed") is not None and inner.stopped
    assert coldstart.take_replicas(group) == []
    assert _free_gb(placement)[group.plan.stages[1].node] == 40
    coldstart.stop(group)
    assert placement.status().active_plans == 0


def test_a_stage_lost_during_the_cold_start_names_its_node_and_a_retry_avoids_it(
        loaderds: list[LoaderDaemon], model_dir: Path) -> None:
    launcher = FakeLauncher(lose_stage=1)
    coldstart, placement = setup(loaderds, launcher, nic_gbps=1.0, max_pipeline_size=2)
    big = spec(model_dir, scale=16_000, ttft_slo_s=80.0)
    timeline = Timeline()
    with pytest.raises(InstanceFailedError, match="worker lost on") as failed:
        coldstart.run(big, timeline)
    head, inner = launcher.workers
    assert failed.value.nodes == (inner.node,) and head.node != inner.node
    assert head.stopped and placement.status().active_plans == 0 and all(leases(d) == 0 for d in loaderds)
    assert timeline.first("cold_start_failed") is not None
    launcher.lose_stage = None
    group = coldstart.run(big, Timeline(), exclude_nodes=failed.value.nodes)
    assert group.plan.nodes == [head.node]  # one node left: a single worker there
    coldstart.stop(group)


def test_a_group_that_fails_while_serving_names_the_lost_node_and_frees_everything(
        loaderds: list[LoaderDaemon], model_dir: Path) -> None:
    launcher = FakeLauncher()
    coldstart, placement = setup(loaderds, launcher, nic_gbps=1.0, max_pipeline_size=2)
    group = coldstart.run(spec(model_dir, scale=16_000, ttft_slo_s=80.0), Timeline())
    head, inner = launcher.workers
    assert coldstart.lost_nodes(group) == ()
    inner.gone = True  # killed while serving
    assert coldstart.lost_nodes(group) == (group.plan.stages[1].node,)
    assert coldstart.fail(group, "stage 1 died") == (group.plan.stages[1].node,)
    assert head.stopped and placement.status().active_plans == 0
    assert all(sum(n.gpu_free_gb) == 40 for n in placement.status().nodes)


def test_a_group_without_a_full_worker_stays_a_group(loaderds: list[LoaderDaemon], model_dir: Path) -> None:
    launcher = FakeLauncher()
    coldstart, placement = setup(loaderds, launcher, nic_gbps=1.0, max_pipeline_size=2, watch_s=0.02)
    stays = spec(model_dir, scale=16_000, ttft_slo_s=80.0).model_copy(update={"min_full_workers": 0,
                                                                             "max_full_workers": 0})
    group = coldstart.run(stays, Timeline())
    assert group.plan.pipeline_size == 2 and not any(st.full for st in group.plan.stages)
    assert all(not w.env.full for w in launcher.workers)  # no worker was given the whole model's memory
    launcher.workers[0].consolidated = True  # even a head that said so is not watched
    assert not group.consolidated.wait(0.3) and len(group.workers) == 2
    coldstart.stop(group)
    assert placement.status().active_plans == 0


def test_cold_starts_run_concurrently_without_sharing_state(loaderds: list[LoaderDaemon], model_dir: Path) -> None:
    launcher = FakeLauncher()
    coldstart, placement = setup(loaderds, launcher)
    groups = []
    threads = [threading.Thread(target=lambda: groups.append(coldstart.run(spec(model_dir), Timeline())))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(groups) == 4 and len({g.plan.instance_id for g in groups}) == 4
    assert len({w.url for w in launcher.workers}) == 4
    for g in groups:
        coldstart.stop(g)
    assert placement.status().active_plans == 0
