"""The admission line on its own event loop: first come first served, bounded, places told as it moves, the GPU
passed on when a job's GPU work ends, and nothing lost when a waiting client leaves."""

from __future__ import annotations

import asyncio
import threading

import pytest

from pipeline.engine_types import ServiceBusy
from pipeline.metrics import ServiceMetrics
from tests.helpers import parse_samples
from webui.admission import AdmissionLine
from webui.jobs import place_in_line


def _busy_count(metrics: ServiceMetrics) -> float:
    return parse_samples(metrics.text().decode())[("zimage_requests_total", (("outcome", "busy"),))]


def test_jobs_take_their_turns_in_the_order_they_came_and_a_full_line_turns_the_next_away():
    order, places = [], {}
    metrics = ServiceMetrics()

    async def main():
        line = AdmissionLine(capacity=2, parallel=1, metrics=metrics)
        release = asyncio.Event()

        async def job(name: str):
            async with line.turn(lambda ahead, _s: places.setdefault(name, ahead)):
                order.append(name)
                if name == "first":
                    await release.wait()

        first = asyncio.create_task(job("first"))
        await asyncio.sleep(0)
        waiting = [asyncio.create_task(job(name)) for name in ("second", "third")]
        await asyncio.sleep(0)
        assert line.waiting == 2
        with pytest.raises(ServiceBusy, match="the queue is full \\(2 waiting\\)"):
            async with line.turn():
                pass
        release.set()
        await asyncio.gather(first, *waiting)
        assert line.waiting == 0 and line.running == 0

    asyncio.run(main())
    assert order == ["first", "second", "third"]
    assert places == {"second": 1, "third": 2}
    assert _busy_count(metrics) == 1


def test_the_next_job_starts_when_the_gpu_work_ends_not_when_the_answer_is_sent():
    """Turn.end from the engine's thread passes the GPU on while the first job still holds its block (its PNG)."""
    events = []

    async def main():
        line = AdmissionLine(capacity=4, parallel=1, metrics=ServiceMetrics())
        saved = asyncio.Event()

        async def first():
            async with line.turn() as turn:
                events.append("first on the GPU")
                worker = threading.Thread(target=turn.end)  # as the engine's thread calls it
                worker.start()
                worker.join()
                await saved.wait()  # still saving its PNG and sending its answer
                events.append("first answered")

        async def second():
            async with line.turn():
                events.append("second on the GPU")
                saved.set()

        await asyncio.gather(first(), second())

    asyncio.run(main())
    assert events == ["first on the GPU", "second on the GPU", "first answered"]


def test_a_client_that_leaves_while_waiting_gives_up_its_place_and_one_given_its_turn_passes_it_on():
    async def main():
        line = AdmissionLine(capacity=4, parallel=1, metrics=ServiceMetrics())
        release = asyncio.Event()

        async def holder():
            async with line.turn():
                await release.wait()

        async def waiter():
            async with line.turn():
                pass

        running = asyncio.create_task(holder())
        await asyncio.sleep(0)
        leaving, staying = asyncio.create_task(waiter()), asyncio.create_task(waiter())
        await asyncio.sleep(0)
        leaving.cancel()
        await asyncio.sleep(0)
        assert line.waiting == 1
        release.set()
        await asyncio.wait_for(asyncio.gather(running, staying), 5)
        assert line.running == 0 and line.waiting == 0

    asyncio.run(main())


def test_a_stopping_line_turns_new_jobs_away():
    async def main():
        line = AdmissionLine(capacity=4, parallel=1, metrics=ServiceMetrics())
        line.stop_accepting()
        with pytest.raises(ServiceBusy, match="shutting down"):
            async with line.turn():
                pass

    asyncio.run(main())


@pytest.mark.parametrize("ahead, seconds, text", [(2, None, "2 ahead of you"), (2, 3.4, "2 ahead of you · about 3 s"),
                                                  (1, 0.2, "1 ahead of you · about 1 s")])
def test_a_waiting_job_is_told_its_place_and_an_estimate(ahead, seconds, text):
    assert place_in_line(ahead, seconds) == text
