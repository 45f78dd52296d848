"""The front's engine when the engines are Serve replicas: what webui and app.py use of pipeline.engine.Engine
(generate with progress, state, history, draining, the output dir), over a DeploymentHandle. Serve routes each
request to a free replica, queues the rest, and replaces a replica that dies; this class turns its outcomes into
the engine's errors, so the web layer answers them as it answers a local engine's."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from pipeline.engine_elsewhere import EngineElsewhere
from pipeline.engine_events import ENGINE_STATE_KEYS, Finished, Progress, Refused, Started, Worker
from pipeline.engine_types import AdapterInfo, GenerationError, GenerationResult, ServiceBusy, outcome_of
from pipeline.memory import MemoryGuard
from pipeline.metrics import ServiceMetrics
from pipeline.requests import GenerationRequest, Limits
from pipeline.serving import EngineStatus
from scale.metrics import ReplicaMetrics

log = logging.getLogger("zimage.remote")

STATUS_TTL_S = 1.0  # /readyz, /metrics and every open page's status line ask: the controller is asked once a second


def summarize(states: list[dict[str, object]]) -> dict[str, object]:
    """The replicas' engine states as one: per key, the value every replica reports, or how many report each
    ("compiled×1 eager×1") while they differ (one compiles later than another, a replacement starts eager)."""
    if not states:
        return dict.fromkeys(ENGINE_STATE_KEYS, "unknown")  # the only replica was lost, and none has answered since
    summary = {}
    for key in ENGINE_STATE_KEYS:
        counts = Counter(str(state[key]) for state in states)
        summary[key] = states[0][key] if len(counts) == 1 else " ".join(
            f"{value}×{count}" for value, count in sorted(counts.items()))
    return summary


class ReplicaLost(ServiceBusy):
    """The replica running the request stopped (killed, crashed, its host lost) before it answered. Nothing reached
    the caller, and Serve is replacing the replica: the same request sent again runs on a live one."""


@dataclass(frozen=True, kw_only=True)
class RemoteResult(GenerationResult):
    """A GenerationResult, and the replica that made it."""

    replica: Worker


class RemoteEngine(EngineElsewhere):
    def __init__(self, handle: DeploymentHandle, *, app_name: str, deployment_name: str, replicas: int,
                 queue_size: int, limits: Limits, output_dir: Path, memory_guard: MemoryGuard | None,
                 engine_state: dict[str, object], metrics: ServiceMetrics | None = None) -> None:
        """`replicas`: how many were asked for; `memory_guard` and `engine_state`: one replica's, at start (the
        replicas of one deployment run on the same kind of device; the state stands for all until they answer)."""
        super().__init__(output_dir)
        self._handle = handle
        self._stream = handle.options(stream=True)
        self._adapters: tuple[float, list[AdapterInfo]] = (float("-inf"), [])  # (read at, what a replica said)
        self._app_name, self._deployment_name = app_name, deployment_name
        self.replicas = replicas
        self.parallel_jobs = replicas  # the front's queue lets one job through per replica: the rest wait there
        self.queue_size = queue_size
        self.limits = limits
        self.memory_guard = memory_guard
        self.compile_model = False  # each replica compiles its own copy (start_background_work)
        # Replica id → its engine's state (which pipeline serves, ...) as its latest answer gave it, least recent
        # first: `replicas` of them, a lost one dropped. Serve names no replica before it answers: "" stands for
        # those that have not answered yet.
        self._replica_states: OrderedDict[str, dict[str, object]] = OrderedDict({"": dict(engine_state)})
        self._metrics = ReplicaMetrics(metrics or ServiceMetrics(), self.replica_counts)
        self._tickets = itertools.count(1)
        self._running: dict[int, str] = {}  # ticket → "<replica id>/#ticket" while a request is out
        self._idle = threading.Condition()
        self.served = 0
        self._counts: tuple[float, tuple[int, int]] = (float("-inf"), (0, replicas))  # (read at, (ready, total))

    # -- what webui and app.py read ----------------------------------------------------------------------------------

    @property
    def in_flight(self) -> str | None:
        """The requests out at replicas now, space-separated ("<replica id>/#n", or "pending/#n" until a replica has
        taken request n), or None."""
        with self._idle:
            return " ".join(self._running.values()) or None

    @property
    def running_jobs(self) -> int:
        """Requests a replica is generating now (one per replica at most); not those still in Serve's queue."""
        with self._idle:
            return sum(not where.startswith("pending/") for where in self._running.values())

    @property
    def ready(self) -> bool:
        return self.replica_counts()[0] > 0

    @property
    def healthy(self) -> bool:
        """The front has no GPU to poison: a replica's fatal error ends that replica only, and Serve replaces it."""
        return True

    def replica_counts(self) -> tuple[int, int]:
        """(replicas running, replicas asked for), as Serve's controller reports them, at most STATUS_TTL_S old."""
        read_at, counts = self._counts
        if time.monotonic() - read_at > STATUS_TTL_S:
            application = serve.status().applications.get(self._app_name)
            deployment = application.deployments.get(self._deployment_name) if application else None
            running = deployment.replica_states.get("RUNNING", 0) if deployment else 0
            counts = (running, self.replicas)
            self._counts = (time.monotonic(), counts)
        return counts

    def status(self) -> EngineStatus:
        """Ready while at least one replica is; the replicas' engines summed up, and their counts."""
        ready, total = self.replica_counts()
        in_flight = self.in_flight
        with self._idle:
            engines = summarize(list(self._replica_states.values()))
        return EngineStatus(ready=ready > 0, healthy=self.healthy, busy=in_flight is not None, in_flight=in_flight,
                            served=self.served, **engines, device=f"{total} Serve replicas", replicas_ready=ready,
                            replicas_total=total)

    def adapters(self) -> list[AdapterInfo]:
        """One replica's adapters (every replica reads the same folder), at most STATUS_TTL_S old."""
        read_at, adapters = self._adapters
        if time.monotonic() - read_at > STATUS_TTL_S:
            adapters = self._handle.adapters.remote().result(timeout_s=STATUS_TTL_S)
            self._adapters = (time.monotonic(), adapters)
        return list(adapters)

    def gpu_memory(self) -> None:
        """The front holds no model, so it has no GPU memory to report (the replicas' GPUs are theirs, in their log
        lines)."""
        return None

    def state(self) -> dict[str, object]:
        """The status, for crash snapshots; the prompts are the replicas' own, in theirs."""
        return asdict(self.status()) | {"recent_prompts": []}

    def wait_idle(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: not self._running, timeout=timeout)

    # -- one request ---------------------------------------------------------------------------------------------------

    def generate(self, request: GenerationRequest, progress=None, received_at: float | None = None,
                 owner: str | None = None, on_gpu_done=None) -> RemoteResult:
        """As Engine.generate, on whichever replica Serve picks: RequestError, GenerationError and ServiceBusy as
        the replica's engine raised them; ServiceBusy when Serve's queue is full; ReplicaLost when the replica died
        before answering. `on_gpu_done` is not called: the replica's GPU work and save come back as one answer,
        and the caller's turn ends with it."""
        if self._draining:
            self._metrics.request_finished("busy", None, None)
            raise ServiceBusy("The service is shutting down; try again in a minute.")
        started = time.perf_counter()
        # Wall-clock time of arrival: the replica's monotonic clock is another process's, maybe another host's.
        arrived_at = time.time() - (time.monotonic() - received_at if received_at is not None else 0.0)
        ticket = next(self._tickets)
        with self._idle:
            self._running[ticket] = f"pending/#{ticket}"
        outcome, stage_ms, adapters = "error", None, []
        try:
            result = self._received(self._run(ticket, request, progress, arrived_at, owner), started)
            outcome, stage_ms = "ok", result.timings.by_stage()
            adapters = [choice.name for choice in result.request.loras]
            return result
        except BaseException as error:
            outcome = "error" if isinstance(error, ReplicaLost) else outcome_of(error)  # a lost replica: a fault
            raise
        finally:
            with self._idle:
                where = self._running.pop(ticket)
                self._idle.notify_all()
            replica = None if where.startswith("pending/") else where.partition("/")[0]
            self._metrics.request_finished(outcome, replica, stage_ms, adapters)

    def _run(self, ticket: int, request: GenerationRequest, progress, arrived_at: float,
             owner: str | None) -> Finished:
        """The replica's events, progress passed on, up to its Finished; Refused raised, and Serve's and Ray's
        errors turned into the engine's."""
        runs_on: Worker | None = None
        try:
            for event in self._stream.generate.remote(request, arrived_at, owner):
                if isinstance(event, Progress):
                    if progress is not None:
                        progress(event.step, event.total)
                elif isinstance(event, Started):
                    runs_on = event.worker
                    with self._idle:
                        self._running[ticket] = f"{runs_on.id}/#{ticket}"
                elif isinstance(event, Refused):
                    raise event.error  # none of the handlers below: it goes to the caller as the engine raised it
                else:
                    return event
        except BackPressureError:
            log.info("request outcome=busy reason=queue-full queued=%d", self.queue_size)
            raise ServiceBusy(f"The server is busy: every replica is working and {self.queue_size} requests are "
                              f"waiting already. Try again in a moment.") from None
        except DeploymentUnavailableError:
            raise ServiceBusy("No replica can take requests now (the deployment failed); the operator has to look "
                              "at the log. Try again later.") from None
        except RayActorError as error:
            lost = runs_on or Worker(id="unknown", host="unknown", pid=0)
            with self._idle:
                self._replica_states.pop(lost.id, None)
            log.warning("request outcome=replica-lost replica=%s host=%s pid=%d error=%r", lost.id, lost.host,
                        lost.pid, type(error).__name__)
            raise ReplicaLost(f"The server process making your image stopped before it finished (replica "
                              f"{lost.id}); nothing was saved. Try again: another replica takes it.") from None
        raise RuntimeError(f"replica {runs_on.id if runs_on else 'unknown'} ended the stream without a result")

    def _received(self, finished: Finished, started: float) -> RemoteResult:
        """Check the front can read the saved image (the output dir is shared), then count and list it."""
        try:
            self.saved(finished.path)
        except OSError as error:
            log.error("image not readable by the front replica=%s host=%s path=%s error=%r", finished.worker.id,
                      finished.worker.host, finished.path, str(error))
            raise GenerationError(
                f"The image was saved on host {finished.worker.host} at {finished.path}, but the front cannot read "
                f"it: every host must mount the same output directory at the same path.") from None
        with self._idle:
            self.served += 1
            self._replica_states.pop(finished.worker.id, None)
            self._replica_states[finished.worker.id] = finished.engine_state  # newest last
            if len(self._replica_states) > self.replicas:
                # Every replica has answered ("" goes), or one answered that replaced another (the least recent goes).
                self._replica_states.popitem(last=False)
        total_ms = (time.perf_counter() - started) * 1000
        log.info("request id=%s replica=%s host=%s pid=%d outcome=ok total_ms=%.0f engine_ms=%.0f hop_ms=%.1f",
                 finished.request_id, finished.worker.id, finished.worker.host, finished.worker.pid, total_ms,
                 finished.timings.total_ms, total_ms - finished.timings.total_ms)
        return RemoteResult(request_id=finished.request_id, image=None, path=finished.path,
                            request=finished.request, timings=finished.timings, notices=finished.notices,
                            gpu_peak_bytes=finished.gpu_peak_bytes, replica=finished.worker)
