"""The engine process: the weights loaded once on its device, the unchanged Engine around them, serving the jobs the
service's process (pipeline.engine_process) sends it over a pipe, and answering with pipeline.engine_events.

It starts as a standby: Python and the model libraries imported (seconds of the interpreter), nothing on the GPU,
waiting for Load. So when the engine process before it dies, what a restart costs is the weights read from the page
cache and a warm-up. The front's end ends it: it exits when its pipe closes, and the kernel kills it when the
thread that started it ends (PR_SET_PDEATHSIG), so no engine outlives the service holding GPU memory."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from multiprocessing.connection import Connection

from config import log_lines
from pipeline.acceleration import load_for_serving
from pipeline.engine import Engine, GenerationError
from pipeline.engine_events import (
    ENGINE_STATE_KEYS,
    EngineSpec,
    Fatal,
    Finished,
    GpuDone,
    Heartbeat,
    Job,
    Progress,
    Ready,
    Refused,
    Retire,
    StandingBy,
    Started,
    StartFailed,
    Worker,
)
from pipeline.loader import resolve_device
from pipeline.messages import StartupError, first_line
from pipeline.requests import RequestError
from pipeline.snapshot import enable_fault_tracebacks, install_snapshot_hooks, write_snapshot

log = logging.getLogger("zimage.worker")

HEARTBEAT_S = 1.0  # how often the engine process tells the front its state: its sign of life too
# Jobs one engine process holds at once: one on the GPU, the one before it still saving its image, and the next one
# waiting for the GPU (the front sends it as soon as the GPU work before it ends).
JOBS_AT_ONCE = 3


def build_engine(spec: EngineSpec, on_fatal) -> tuple[Engine, str]:
    """The engine of `spec`, loaded, warmed up (so ready) and its background work started; and where its weights
    came from."""
    device = resolve_device(spec.device)
    loaded = load_for_serving(spec.model_dir, device, verify=spec.verify_weights,
                              compile_cache_dir=spec.compile_cache_dir if spec.options.compile_model else None,
                              low_vram=spec.low_vram, gpu_memory_limit_gib=spec.options.gpu_memory_limit_bytes / 2**30)
    spec.faults.at_start()
    engine = Engine(loaded, spec.options, faults=spec.faults, on_fatal=on_fatal)
    engine.warm_up()
    engine.start_background_work(delay_s=spec.compile_delay_s)
    engine.build_attention_plans(spec.plan_sizes)
    return engine, loaded.source


def engine_state(engine: Engine) -> dict[str, object]:
    state = engine.state()
    return {key: state[key] for key in ENGINE_STATE_KEYS}


class _Pipe:
    """The engine process's end of the pipe: sends from several threads, one at a time."""

    def __init__(self, connection: Connection):
        self.connection = connection
        self._lock = threading.Lock()

    def send(self, message: object) -> None:
        with self._lock, contextlib.suppress(OSError):  # the front is gone: the receiving loop ends this process
            self.connection.send(message)


def worker_main(connection: Connection, started: float) -> None:
    """The engine process (from pipeline.engine_spawn): a standby until Load comes, then the engine's process until
    its pipe closes. `started`: time.perf_counter() when its imports began."""
    import pipeline.loader  # the model libraries, imported now: what makes a standby worth keeping

    pipeline.loader.import_model_libraries()
    pipe = _Pipe(connection)
    pipe.send(StandingBy(time.perf_counter() - started))
    try:
        load = connection.recv()
    except (EOFError, OSError):
        os._exit(0)
    log_lines.configure_logging(load.spec.log_level, prefix=f"engine={load.number} ")
    enable_fault_tracebacks()
    worker = Worker(id=f"engine-{load.number}", host=socket.gethostname(), pid=os.getpid())
    started = time.perf_counter()
    serving: list[Engine] = []  # the engine, once built: what the heartbeats tell of
    threading.Thread(target=_heartbeats, args=(serving, pipe), name="heartbeat", daemon=True).start()

    def on_fatal(error: BaseException, state: dict[str, object]) -> None:
        pipe.send(Fatal(first_line(error)))
        write_snapshot(load.spec.crash_dir, f"fatal in the engine process: {error}", state, error)
        log.critical("engine process exiting after a fatal error exit=1")
        logging.shutdown()
        os._exit(1)

    try:
        engine, source = build_engine(load.spec, on_fatal)
    except StartupError as error:
        pipe.send(StartFailed(str(error), error.exit_code))
        os._exit(error.exit_code)
    except Exception as error:
        log.exception("engine process failed to start")
        pipe.send(StartFailed(f"the engine failed to start: {first_line(error)}", 1))
        os._exit(1)
    install_snapshot_hooks(load.spec.crash_dir, engine.state)
    seconds = time.perf_counter() - started
    log.info("engine process ready pid=%d device=%s source=%s seconds=%.1f", worker.pid, engine.device, source,
             seconds)
    pipe.send(Ready(worker, engine.memory_guard, str(engine.device), source, seconds))
    serving.append(engine)
    jobs = ThreadPoolExecutor(max_workers=JOBS_AT_ONCE, thread_name_prefix="job")
    while True:
        try:
            job = connection.recv()
        except (EOFError, OSError):
            # The front has gone (stopped, or killed): an engine without it serves nobody.
            logging.shutdown()
            os._exit(0)
        if isinstance(job, Retire):
            log.info("engine process retiring: asked to make way for a fresh one")
            logging.shutdown()
            os._exit(0)
        jobs.submit(_run, engine, worker, job, pipe)


def _run(engine: Engine, worker: Worker, job: Job, pipe: _Pipe) -> None:
    pipe.send((job.ticket, Started(worker)))

    def progress(step: int, total: int) -> None:
        pipe.send((job.ticket, Progress(step, total)))

    try:
        result = engine.generate(job.request, progress, job.received_at, job.owner,
                                 on_gpu_done=lambda: pipe.send((job.ticket, GpuDone())))
    except (RequestError, GenerationError) as error:
        pipe.send((job.ticket, Refused(error)))
        return
    except Exception as error:  # the engine's own failure, already logged by it: the caller gets a plain error
        pipe.send((job.ticket, Refused(GenerationError(f"The engine failed: {first_line(error)}"))))
        return
    pipe.send((job.ticket, Finished(request_id=result.request_id, path=result.path, request=result.request,
                                    timings=result.timings, notices=result.notices,
                                    gpu_peak_bytes=result.gpu_peak_bytes, worker=worker,
                                    engine_state=engine_state(engine))))


def _heartbeats(serving: list[Engine], pipe: _Pipe) -> None:
    """A Heartbeat every HEARTBEAT_S from Load on: while loading, an empty one (a sign of life only)."""

    while True:
        if not serving:
            pipe.send(Heartbeat({}, None))
        else:
            engine, gpu_memory = serving[0], None
            try:
                memory = engine.gpu_memory()
                gpu_memory = None if memory is None else asdict(memory)
            except RuntimeError:  # a poisoned context: the engine's own handler ends this process
                pass
            pipe.send(Heartbeat(engine_state(engine), gpu_memory, tuple(engine.adapters())))
        time.sleep(HEARTBEAT_S)
