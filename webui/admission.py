"""The one line every image request waits in: the page's events, API calls and the OpenAI route alike.

First come, first served; at most `capacity` wait (more are turned away as busy, before any work); `parallel` at a
time have the GPU (one per engine: one, or one per replica). A turn ends when the job's GPU work does, not when
its answer is sent: the next job denoises while the last one's PNG is saved and sent. Each waiting job is told its
place as the line moves, and an estimate from the recent jobs' GPU times.

Written here, not left to Gradio's queue: Gradio's queue holds a slot until the answer has gone out, knows nothing
of the OpenAI route (which joined it through an HTTP request to its own server), and shows a place in line only in
a box the page clips. asyncio, on the server's event loop: a job that waits holds no thread.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from pipeline.engine_types import ServiceBusy
from pipeline.metrics import ServiceMetrics

PLACE_REFRESH_S = 1.0  # how often a waiting job is told its place, if the line has not moved
RECENT_JOBS = 8  # GPU times the estimate averages


class Turn:
    """A job's hold on the GPU, from its turn until `end` (called once its GPU work is done, from any thread)."""

    def __init__(self, line: AdmissionLine):
        self._line, self._loop, self._ended = line, asyncio.get_running_loop(), False
        self._started = time.monotonic()

    def end(self) -> None:
        """The GPU work is done: the next job may start. Safe from any thread, and more than once."""
        self._loop.call_soon_threadsafe(self._end)

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self._line._turn_ended(time.monotonic() - self._started)


class AdmissionLine:
    def __init__(self, capacity: int, parallel: int, metrics: ServiceMetrics):
        self.capacity, self.parallel, self._metrics = capacity, parallel, metrics
        self._waiting: collections.deque[asyncio.Future] = collections.deque()
        self.running = 0
        self._gpu_seconds: collections.deque[float] = collections.deque(maxlen=RECENT_JOBS)
        self._moved = asyncio.Event()
        self._accepting = True

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def stop_accepting(self) -> None:
        """From now on a new job is turned away; those in line keep their places (the engine refuses them)."""
        self._accepting = False

    def seconds_per_job(self) -> float | None:
        """The recent jobs' mean GPU time, or None before the first."""
        return sum(self._gpu_seconds) / len(self._gpu_seconds) if self._gpu_seconds else None

    def place(self, future: asyncio.Future) -> tuple[int, float | None]:
        """How many jobs are ahead of a waiting one (running, then waiting before it), and about how many seconds
        until its turn."""
        ahead = self.running + self._waiting.index(future)
        per_job = self.seconds_per_job()
        return ahead, None if per_job is None else (ahead - self.parallel + 1) * per_job / self.parallel

    @asynccontextmanager
    async def turn(self, on_wait: Callable[[int, float | None], None] | None = None) -> AsyncIterator[Turn]:
        """Wait for the GPU in line; `on_wait(ahead, seconds)` is told the place while waiting. Raises ServiceBusy
        (counted as busy) when the line is full or the service is stopping. End the turn with Turn.end once the GPU
        work is done; it ends at the latest when the block does."""
        if not self._accepting:
            self._refuse("The service is shutting down; try again in a minute.")
        if self.running >= self.parallel or self._waiting:
            if len(self._waiting) >= self.capacity:
                self._refuse(f"The server is busy: the queue is full ({self.capacity} waiting). Try again in a "
                             f"moment.")
            await self._wait(on_wait)
        else:
            self.running += 1
        turn = Turn(self)
        try:
            yield turn
        finally:
            turn._end()

    async def _wait(self, on_wait) -> None:
        future = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        try:
            while not future.done():
                if on_wait is not None:
                    on_wait(*self.place(future))
                self._moved.clear()
                moved = asyncio.ensure_future(self._moved.wait())
                try:
                    await asyncio.wait((future, moved), timeout=PLACE_REFRESH_S, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    moved.cancel()
        except BaseException:
            # Gone before its turn (the client left): out of the line; given its turn meanwhile: passed on.
            if future.done():
                self._turn_ended(None)
            else:
                self._waiting.remove(future)
                self._moved.set()
            raise

    def _turn_ended(self, gpu_seconds: float | None) -> None:
        if gpu_seconds is not None:
            self._gpu_seconds.append(gpu_seconds)
        if self._waiting:
            self._waiting.popleft().set_result(None)  # the turn passes on: `running` stays as it is
        else:
            self.running -= 1
        self._moved.set()

    def _refuse(self, message: str) -> None:
        self._metrics.request_finished("busy")
        raise ServiceBusy(message)
