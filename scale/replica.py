"""One Serve replica: the pipeline loaded once on its device, the unchanged Engine around it, one job at a time.
The engine does not know it runs here; this class only turns a handle call into Engine.generate and back."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import time
from collections.abc import AsyncIterator

from ray import serve

from config.log_lines import LOG_DATE_FORMAT, LOG_FORMAT, OneLinePerRecord
from pipeline.engine_events import EngineSpec, Finished, Progress, Refused, Started, Worker
from pipeline.engine_types import GenerationError
from pipeline.engine_worker import build_engine, engine_state
from pipeline.requests import RequestError
from pipeline.snapshot import enable_fault_tracebacks, exit_on_fatal

log = logging.getLogger("zimage.replica")

_DONE = object()  # ends a request's event queue: the engine's call has returned or raised


def configure_replica_logging(level: str, replica_id: str) -> None:
    """The service's one line format, on the replica's stdout (Ray forwards it to the front's log, and keeps it in
    the session's worker-*.out), with the replica's id in every line: N engines write the same request lines."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(OneLinePerRecord(LOG_FORMAT.replace("%(message)s", f"replica={replica_id} %(message)s"),
                                          LOG_DATE_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)


class EngineReplica:
    def __init__(self, spec: EngineSpec) -> None:
        context = serve.get_replica_context()
        self.replica = Worker(id=context.replica_id.unique_id, host=socket.gethostname(), pid=os.getpid())
        configure_replica_logging(spec.log_level, self.replica.id)
        enable_fault_tracebacks()
        started = time.perf_counter()
        self.engine, source = build_engine(spec, on_fatal=exit_on_fatal(spec.crash_dir, "replica"))
        log.info("replica ready host=%s pid=%d device=%s source=%s seconds=%.1f", self.replica.host,
                 self.replica.pid, self.engine.device, source, time.perf_counter() - started)

    async def generate(self, request, arrived_at: float | None, owner: str | None) -> AsyncIterator[object]:
        """Started, Progress per step, then Finished, or Refused with the engine's error. `arrived_at` is the
        front's wall-clock time of arrival (time.time()): the monotonic clocks of two processes, or hosts, do not
        compare. The engine runs on a thread so that this replica's event loop stays free for Serve's health checks
        while the GPU works."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        received_at = None if arrived_at is None else time.monotonic() - max(0.0, time.time() - arrived_at)

        def progress(step: int, total: int) -> None:
            loop.call_soon_threadsafe(events.put_nowait, Progress(step, total))

        yield Started(self.replica)
        job = loop.run_in_executor(None, lambda: self.engine.generate(request, progress, received_at, owner))
        job.add_done_callback(lambda _job: events.put_nowait(_DONE))
        while (event := await events.get()) is not _DONE:
            yield event
        try:
            result = await job
        except (RequestError, GenerationError) as error:
            yield Refused(error)
            return
        yield Finished(request_id=result.request_id, path=result.path, request=result.request,
                       timings=result.timings, notices=result.notices, gpu_peak_bytes=result.gpu_peak_bytes,
                       worker=self.replica, engine_state=engine_state(self.engine))

    def describe(self) -> dict[str, object]:
        """For the front at start: the memory guard (the sizes the UI offers; the replicas of one deployment run on
        the same kind of GPU) and which pipeline serves."""
        return {"memory_guard": self.engine.memory_guard, "engine_state": engine_state(self.engine)}

    def adapters(self) -> list:
        """The engine's LoRA adapters (pipeline.adapters.AdapterInfo), the folder looked at again."""
        return self.engine.adapters()

    def check_health(self) -> None:
        """Serve calls this every health_check_period_s; raising marks the replica unhealthy and replaces it."""
        if not self.engine.healthy:
            raise RuntimeError(f"replica {self.replica.id}: the engine is unhealthy after a fatal error")
