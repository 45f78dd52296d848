"""The engine in a child process, kept by the service's process: the web side uses it as it would the in-process
Engine (pipeline.serving.ServingEngine), and when the engine process dies (a CUDA error, the OOM killer, kill -9)
only it restarts. The page, the admission line and the requests waiting in it stay; the job that was running gets
one retryable error.

How: the standard library's multiprocessing, started with "spawn" (a fresh interpreter: nothing of the front's
threads, locks or CUDA state is inherited, as a fork would), over a Pipe (a socket pair: no port, nothing another
user of the machine can reach). Modelled on gunicorn's arbiter (the keeper restarts what dies, with a cause in the
log, and gives up when workers die at boot) and Ray Serve's replica restarts (a request lost with its replica is
the caller's to retry); unlike both, a standby process with Python and the model libraries already imported waits
beside the running one, so a restart costs loading the weights (from the page cache) and a warm-up, not 8-15 s of
imports. uvicorn's multiprocess supervisor restarts whole servers; here the server is what must stay."""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

import psutil

from pipeline.engine_events import (
    ENGINE_STATE_KEYS,
    EngineSpec,
    Fatal,
    Finished,
    GpuDone,
    Heartbeat,
    Job,
    Load,
    Progress,
    Ready,
    Refused,
    Retire,
    StandingBy,
    Started,
    StartFailed,
    Worker,
)
from pipeline.engine_spawn import Spawned, spawn_engine_process
from pipeline.engine_types import (
    OUTPUT_DIR_UNUSABLE,
    AdapterInfo,
    GenerationError,
    GenerationResult,
    ServiceBusy,
    outcome_of,
)
from pipeline.memory import MemoryGuard
from pipeline.messages import StartupError
from pipeline.metrics import ServiceMetrics
from pipeline.engine_elsewhere import EngineElsewhere
from pipeline.serving import EngineStatus, GpuMemory
from pipeline.storage import remove_partial_files

log = logging.getLogger("zimage.engine_process")

# Engine processes that die before they are ready, one after another, before the front gives up and exits non-zero
# (supervisord then restarts the program, startretries times, and marks it FATAL): weights that cannot load, a GPU
# that is gone. Between them the keeper waits 1, 2, 4, ... s.
MAX_FAILED_STARTS = 4
MAX_BACKOFF_S = 30.0
SUPERVISOR_BEGIN, SUPERVISOR_END = "<!--XSUPERVISOR:BEGIN-->", "<!--XSUPERVISOR:END-->"  # supervisor.events
CLOSE_S = 3.0  # how long an engine process may take to exit once its pipe is closed
MIN_SILENCE_S = 10.0  # an engine process silent this long (or --hang-timeout, if longer) is frozen: killed


class EngineRestarting(ServiceBusy):
    """The engine process stopped while it held the request; nothing was saved, and the same request sent again
    runs on the new engine process."""


@dataclass
class _Child:
    """One engine process as the keeper knows it."""

    number: int
    process: multiprocessing.process.BaseProcess
    connection: object  # multiprocessing.connection.Connection
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    loaded_at: float | None = None  # time.monotonic() when Load was sent
    worker: Worker | None = None  # set once it is ready
    ended: bool = False
    killed: bool = False  # by the keeper, for its silence
    retired: str | None = None  # why the front asked it to make way (recycle)
    start_failure: StartFailed | None = None
    fatal: str | None = None
    last_heard: float | None = None  # time.monotonic() of its latest message since Load

    def send(self, message: object) -> bool:
        """False when the engine process is gone."""
        with self.send_lock:
            try:
                self.connection.send(message)
                return True
            except OSError:
                return False


class _NeverStarted(Exception):
    """The engine process ended before it began the job: the job never left the line, and is sent again."""


@dataclass(frozen=True)
class _Lost:
    """Engine process `engine`, which the request was sent to, ended: the request's last event from it."""

    reason: str
    engine: int


def _tell_supervisor(pid: int, how: str) -> None:
    """Under supervisord, a process-communication block on stdout: supervisord hands it to the crash reporter
    (deploy/supervisor/crash_reporter.py) as a PROCESS_COMMUNICATION_STDOUT event, and it writes the crash report
    it writes for the service's own exits. `how` in supervisord's words ("terminated by SIGKILL", "exit status 1")."""
    if os.environ.get("SUPERVISOR_ENABLED"):
        sys.__stdout__.write(f"{SUPERVISOR_BEGIN}engine-exited pid={pid} how={how}{SUPERVISOR_END}")
        sys.__stdout__.flush()


class ProcessEngine(EngineElsewhere):
    parallel_jobs = 1  # the GPU runs one job at a time, in whichever engine process is running

    def __init__(self, spec: EngineSpec, *, metrics: ServiceMetrics | None = None,
                 max_failed_starts: int = MAX_FAILED_STARTS, first: Spawned | None = None) -> None:
        """`first`: the first engine process, started before this (app.py starts it before its own imports)."""
        super().__init__(spec.options.output_dir)
        self._spec = spec
        self.limits = spec.options.limits
        self.memory_guard: MemoryGuard | None = None  # the engine process's, once one is ready
        self.source = ""  # where its weights came from, once one is ready
        self.queue_timeout_s = spec.options.queue_timeout_s
        # Heartbeats come every second, from a thread of their own; a few missed under load are no hang.
        self._silence_limit_s = max(spec.options.hang_timeout_s, MIN_SILENCE_S)
        self._max_failed_starts = max_failed_starts
        self._first = first
        self._changed = threading.Condition()  # guards everything below; notified at every change of the children
        self._active: _Child | None = None
        self._standby: _Child | None = None
        self._numbers = itertools.count(1)
        self._tickets = itertools.count(1)
        self._jobs: dict[int, queue.SimpleQueue] = {}
        self._running: dict[int, str] = {}  # ticket → what in_flight shows of it
        self._taken: set[int] = set()  # tickets an engine process has begun (Started)
        self._heartbeat: Heartbeat | None = None
        self._device = "unknown"  # the engine process's, once one is ready
        self._load_seconds = 0.0  # the last engine process's, from Load to ready: the estimate of a restart
        self._closing = False
        self._start_failure: StartFailed | None = None
        self.restarts = 0
        self.served = 0
        self._metrics = metrics or ServiceMetrics()
        self._metrics.counter_read("zimage_engine_restarts", "Engine processes started again after one ended",
                                   lambda: self.restarts)
        self._keeper = threading.Thread(target=self._keep, name="engine-keeper", daemon=True)

    # -- starting and keeping the engine process ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the first engine process and wait until it is ready and has told its state; StartupError (with the
        exit code app.py's start would give) if it cannot start."""
        self._keeper.start()
        with self._changed:
            self._changed.wait_for(lambda: (self._ready() and self._heartbeat is not None)
                                   or self._start_failure is not None)
            if self._start_failure is not None:
                error = StartupError(self._start_failure.message)
                error.exit_code = self._start_failure.exit_code
                raise error

    def _ready(self) -> bool:
        active = self._active
        return active is not None and active.worker is not None and not active.ended and not active.retired

    def _spawn(self, spawned: Spawned | None = None) -> _Child:
        """A standby engine process (from the keeper's thread: the engine process dies with the thread that
        started it), or `spawned`, one started before."""
        spawned = spawned or spawn_engine_process()
        child = _Child(next(self._numbers), spawned.process, spawned.connection)
        threading.Thread(target=self._listen, args=(child,), name=f"engine-{child.number}-pipe", daemon=True).start()
        return child

    def _load(self, child: _Child) -> None:
        child.loaded_at = time.monotonic()
        child.send(Load(self._spec, child.number))
        log.info("engine process starting number=%d pid=%d", child.number, child.process.pid)

    def _keep(self) -> None:
        """The keeper: start the engine process, and when it ends, say why, fail what it held, and start the next
        one (the standby), backing off while they keep dying before they are ready."""
        failed_starts = 0
        with self._changed:
            self._active = self._spawn(self._first)
            self._load(self._active)
        while True:
            with self._changed:
                child = self._active
                self._changed.wait_for(lambda: child.ended or self._closing or self._heard_too_long_ago(child)
                                       or (child.worker is not None and self._standby_missing()), timeout=1.0)
                if self._closing:
                    return
                if child.worker is not None and self._standby_missing() and not child.ended:
                    failed_starts = 0
                    if self._standby is not None:
                        log.warning("standby engine process exited pid=%d exit_code=%s; starting another",
                                    self._standby.process.pid, self._standby.process.exitcode)
                    self._standby = self._spawn()  # imports now, while the GPU serves
                    continue
                if not child.ended:
                    if self._heard_too_long_ago(child):
                        log.error("engine process unresponsive number=%d pid=%d silent_s=%.0f: killing it",
                                  child.number, child.process.pid, time.monotonic() - child.last_heard)
                        child.process.kill()
                        child.killed, child.last_heard = True, None  # its end comes next
                    continue
            self._ended(child)
            if child.start_failure is not None and self.restarts == 0 and child.worker is None:
                with self._changed:
                    self._start_failure = child.start_failure
                    self._changed.notify_all()
                return
            failed_starts = failed_starts + 1 if child.worker is None else 0
            if failed_starts >= self._max_failed_starts:
                self._give_up(failed_starts)
                return
            backoff = min(MAX_BACKOFF_S, 2.0 ** (failed_starts - 1)) if failed_starts else 0.0
            with self._changed:
                if self._changed.wait_for(lambda: self._closing, timeout=backoff):
                    return
                if removed := remove_partial_files(self.output_dir):
                    log.warning("removed %d partial image file(s) the engine process left", removed)
                self.restarts += 1
                self._active, self._standby = (self._spawn() if self._standby_missing() else self._standby), None
                self._load(self._active)
                self._changed.notify_all()

    def _standby_missing(self) -> bool:
        return self._standby is None or self._standby.ended

    def _heard_too_long_ago(self, child: _Child) -> bool:
        """A frozen engine process (SIGSTOP, a hung driver call in every thread) sends no heartbeat; it dies by its
        own hang watch otherwise, but a frozen one cannot. Timed from its first heartbeat: before that it is still
        importing (a standby's imports are done before it is loaded; the first engine's are not)."""
        return child.last_heard is not None and time.monotonic() - child.last_heard > self._silence_limit_s

    def _ended(self, child: _Child) -> None:
        """One log line with the cause, and every request the engine process held fails, retryably."""
        child.process.join(timeout=5)
        code = child.process.exitcode
        if code is not None and code < 0:
            cause = f"signal={signal.Signals(-code).name}"
        else:
            cause = f"exit_code={code}"
        if child.fatal:
            cause += f" error={child.fatal!r}"
        elif child.start_failure:
            cause += f" error={child.start_failure.message!r}"
        with self._changed:
            held = f"{child.worker.id}/" if child.worker else None
            sent = [ticket for ticket, where in self._running.items() if held and where.startswith(held)]
            for ticket in sent:
                self._jobs[ticket].put(_Lost(cause, child.number))
            lost = [ticket for ticket in sent if ticket in self._taken]  # the others wait for the next one
            self._heartbeat = None
            self._changed.notify_all()
        if child.retired and code == 0:
            log.info("engine process recycled number=%d pid=%d reason=%r", child.number, child.process.pid,
                     child.retired)
            return
        log.warning("engine process exited number=%d pid=%d %s %s requests_lost=%d requests_waiting=%d",
                    child.number, child.process.pid, cause,
                    "after it was ready" if child.worker else "before it was ready", len(lost),
                    len(sent) - len(lost))
        _tell_supervisor(child.process.pid, f"terminated by {signal.Signals(-code).name}" if code and code < 0
                         else f"exit status {code}")

    def _give_up(self, failed_starts: int) -> None:
        """Engine processes keep dying at start: the front exits non-zero, so supervisord's startretries and FATAL
        state tell the story."""
        log.error("engine process failed to start %d times in a row; the service exits (exit=1)", failed_starts)
        for handler in logging.getLogger().handlers:
            handler.flush()
        if self._standby is not None:
            self._standby.process.kill()
        os._exit(1)

    def _listen(self, child: _Child) -> None:
        """Everything the engine process sends, until its pipe closes (it ended)."""
        while True:
            try:
                message = child.connection.recv()
            except (EOFError, OSError):
                break
            with self._changed:
                if child.loaded_at is not None and not child.killed:
                    child.last_heard = time.monotonic()
                if isinstance(message, tuple):
                    ticket, event = message
                    if ticket in self._jobs:
                        self._jobs[ticket].put(event)
                        if isinstance(event, Started):
                            self._taken.add(ticket)
                elif isinstance(message, Heartbeat):
                    if child is self._active and message.state:  # not a loading engine's sign of life
                        self._heartbeat = message
                        self._changed.notify_all()
                elif isinstance(message, Ready):
                    child.worker = message.worker
                    self.memory_guard, self.source = message.memory_guard, message.source
                    self._device = message.device
                    self._load_seconds = message.seconds
                    log.info("engine process ready number=%d pid=%d seconds=%.1f restarts=%d", child.number,
                             message.worker.pid, message.seconds, self.restarts)
                    self._changed.notify_all()
                elif isinstance(message, StandingBy):
                    if child is self._standby:
                        log.info("standby engine process ready number=%d pid=%d imports_s=%.1f", child.number,
                                 child.process.pid, message.seconds)
                elif isinstance(message, StartFailed):
                    child.start_failure = message
                elif isinstance(message, Fatal):
                    child.fatal = message.reason
        with self._changed:
            child.ended = True
            self._changed.notify_all()

    def recycle(self, reason: str) -> bool:
        """Replace the engine process by the standby, to give the GPU's memory back (the watermark): only while no
        request is out to it (one sent meanwhile waits for the next). False if it could not be now."""
        with self._changed:
            if not self._ready() or self._running:
                return False
            child = self._active
            child.retired = reason
        log.info("engine process recycling number=%d pid=%d reason=%r", child.number, child.process.pid, reason)
        child.send(Retire())
        return True

    def close(self) -> None:
        """Stop keeping engine processes, and end them and whatever they started (compile workers): once an engine
        process has gone, its children are no longer the service's to find. An engine process ignores SIGTERM (see
        pipeline.engine_worker): its pipe closing ends it, and SIGKILL what outstays that."""
        with self._changed:
            children = [child for child in (self._active, self._standby) if child is not None]
            # Found before the keeper is told to stop: its thread's end kills the engine processes it started
            # (PR_SET_PDEATHSIG), and their children, orphaned, would be found no more.
            processes = []
            for child in children:
                with contextlib.suppress(psutil.NoSuchProcess):
                    engine_process = psutil.Process(child.process.pid)
                    processes += [engine_process, *engine_process.children(recursive=True)]
            self._closing = True
            self._changed.notify_all()
        for child in children:
            child.connection.close()
        _, alive = psutil.wait_procs(processes, timeout=CLOSE_S)
        for process in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(alive, timeout=CLOSE_S)

    # -- what webui and app.py read ------------------------------------------------------------------------------------

    @property
    def worker(self) -> Worker | None:
        """The engine process that serves now; None while none is ready."""
        with self._changed:
            return self._active.worker if self._ready() else None

    @property
    def ready(self) -> bool:
        with self._changed:
            return self._ready()

    @property
    def healthy(self) -> bool:
        """The front holds no GPU to poison: an engine process's fatal error ends that process only."""
        return True

    @property
    def in_flight(self) -> str | None:
        with self._changed:
            return " ".join(where for where in self._running.values() if where != "waiting") or None

    @property
    def running_jobs(self) -> int:
        with self._changed:
            return sum(where != "waiting" for where in self._running.values())

    def restarting(self) -> str | None:
        """"about N s" while an engine process is starting in place of one that ended; None otherwise."""
        with self._changed:
            child = self._active
            if child is None or child.worker is not None or self.restarts == 0 or child.loaded_at is None:
                return None
            return f"about {max(1, round(self._load_seconds - (time.monotonic() - child.loaded_at)))} s"

    def status(self) -> EngineStatus:
        in_flight = self.in_flight
        with self._changed:
            state = self._heartbeat.state if self._heartbeat else dict.fromkeys(ENGINE_STATE_KEYS, "unknown")
            ready = self._ready()
        return EngineStatus(ready=ready, healthy=True, busy=in_flight is not None, in_flight=in_flight,
                            served=self.served, attention=state["attention"], compiled=state["compiled"],
                            serving=state["serving"], text_encoder=state["text_encoder"],
                            device=self._device, restarting=self.restarting(), engine_process=True)

    def state(self) -> dict[str, object]:
        """The status, for the front's crash snapshots; the prompts are the engine process's, in its own."""
        return asdict(self.status()) | {"recent_prompts": [], "engine_restarts": self.restarts}

    def adapters(self) -> list[AdapterInfo]:
        """As the engine process's latest heartbeat told them (it looks at the folder for each)."""
        with self._changed:
            return list(self._heartbeat.adapters) if self._heartbeat else []

    def gpu_memory(self) -> GpuMemory | None:
        with self._changed:
            memory = self._heartbeat.gpu_memory if self._heartbeat else None
        return GpuMemory(**memory) if memory else None

    def wait_idle(self, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: not self._running, timeout=timeout)

    # -- one request ---------------------------------------------------------------------------------------------------

    def generate(self, request, progress=None, received_at: float | None = None, owner: str | None = None,
                 on_gpu_done=None) -> GenerationResult:
        """As Engine.generate, in the engine process. While an engine process restarts, the request waits for it
        (up to --queue-timeout from its arrival, as it would for the GPU); if the engine process ends while it holds
        the request: EngineRestarting."""
        if self._draining:
            self._metrics.request_finished("busy")
            raise ServiceBusy("The service is shutting down; try again in a minute.")
        if self.output_dir_problem() is not None:  # checked here: the engine process would log it a second time
            log.info("request outcome=refused reason=output-dir-unusable")
            self._metrics.request_finished("busy")
            raise ServiceBusy(OUTPUT_DIR_UNUSABLE)
        arrived = received_at if received_at is not None else time.monotonic()
        ticket = next(self._tickets)
        events: queue.SimpleQueue = queue.SimpleQueue()
        outcome, stage_ms, adapters = "error", None, []
        with self._changed:
            self._jobs[ticket] = events
            self._running[ticket] = "waiting"
        try:
            while True:
                with self._changed:
                    if not self._changed.wait_for(self._ready,
                                                  timeout=arrived + self.queue_timeout_s - time.monotonic()):
                        waited = time.monotonic() - arrived
                        log.info("request outcome=timeout reason=engine-restarting queued_s=%.1f limit_s=%s", waited,
                                 self.queue_timeout_s)
                        raise ServiceBusy(f"The server is busy: your request waited {waited:.0f} s for the engine "
                                          f"to restart (the limit is {self.queue_timeout_s:.0f} s). Try again in a "
                                          f"moment.")
                    child = self._active
                    self._running[ticket] = f"{child.worker.id}/#{ticket}"
                if not child.send(Job(ticket, request, received_at, owner)):
                    events.put(_Lost("its pipe closed", child.number))
                try:
                    result = self._answer(events, progress, on_gpu_done, child.number)
                    break
                except _NeverStarted:
                    # Sent as the engine process died, before it took the job: the job was still waiting, and
                    # waits on for the next one, as the line's other jobs do.
                    with self._changed:
                        self._running[ticket] = "waiting"
                        self._changed.wait_for(lambda: child.ended,  # the keeper then starts the next one
                                               timeout=max(0.0, arrived + self.queue_timeout_s - time.monotonic()))
                    log.info("request ticket=%d never started on engine process %d; sent again once the next one "
                             "is ready", ticket, child.number)
            outcome, stage_ms = "ok", result.timings.by_stage()
            adapters = [choice.name for choice in result.request.loras]
            return result
        except BaseException as error:
            outcome = outcome_of(error)
            raise
        finally:
            with self._changed:
                del self._jobs[ticket], self._running[ticket]
                self._taken.discard(ticket)
                self._changed.notify_all()
            self._metrics.request_finished(outcome, stage_ms, adapters)

    def _answer(self, events: queue.SimpleQueue, progress, on_gpu_done, engine: int) -> GenerationResult:
        """Engine process `engine`'s answer; EngineRestarting if it died holding the job, _NeverStarted if it died
        before it began it (everything an engine process sends reaches the front before its pipe's end does)."""
        started = False
        while True:
            event = events.get()
            if isinstance(event, Progress):
                if progress is not None:
                    progress(event.step, event.total)
            elif isinstance(event, GpuDone):
                if on_gpu_done is not None:
                    on_gpu_done()
            elif isinstance(event, Refused):
                raise event.error
            elif isinstance(event, Started):
                started = True
            elif isinstance(event, _Lost):
                if event.engine != engine:  # an engine process this job was sent to before, and never began it
                    continue
                if not started:
                    raise _NeverStarted
                raise EngineRestarting(f"The engine process stopped while making your image ({event.reason}); "
                                       f"nothing was saved. Try again: a new engine process is starting.")
            elif isinstance(event, Finished):
                return self._received(event)
            else:
                raise GenerationError(f"The engine process sent {type(event).__name__} for a request.")

    def _received(self, finished: Finished) -> GenerationResult:
        self.saved(finished.path)
        with self._changed:
            self.served += 1
        return GenerationResult(request_id=finished.request_id, image=None, path=finished.path,
                                request=finished.request, timings=finished.timings, notices=finished.notices,
                                gpu_peak_bytes=finished.gpu_peak_bytes)
