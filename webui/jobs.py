"""The image jobs that the page's events and the OpenAI route run: each waits its turn in the admission line, then
runs on the engine in a worker thread, its turn ending as soon as its GPU work does."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from dataclasses import replace

import anyio

from pipeline.engine_types import GenerationResult
from pipeline.requests import GenerationRequest, batch
from webui.admission import AdmissionLine

Told = Callable[[int, float | None], None]  # (jobs ahead, about how many seconds until the turn)


def place_in_line(ahead: int, seconds: float | None) -> str:
    """What a waiting job is told: "2 ahead of you · about 3 s"."""
    text = f"{ahead} ahead of you"
    return text if seconds is None else f"{text} · about {max(1, round(seconds))} s"


async def run_in_line(line: AdmissionLine, engine, generations: list[GenerationRequest], *,
                      received_at: float | None, owner: str | None,
                      progress: Callable[[int, int], None] | None = None,
                      told: Told | None = None) -> list[GenerationResult]:
    """`generations` in one turn on the GPU, in order. `progress(step, total)` runs on the event loop, whatever
    thread the engine calls it from; `told` is told the place while the job waits."""
    loop = asyncio.get_running_loop()

    def on_loop(step: int, total: int) -> None:
        loop.call_soon_threadsafe(progress, step, total)

    results = []
    async with line.turn(told) as turn:
        for number, generation in enumerate(generations, 1):
            # The turn ends once the last one's GPU work is done: its PNG is saved while the next job runs.
            generate = functools.partial(engine.generate, generation, on_loop if progress else None, received_at,
                                         owner, turn.end if number == len(generations) else None)
            results.append(await anyio.to_thread.run_sync(generate))
    return results


async def make_images(line: AdmissionLine, engine, prompt: object, size: object, n: object, seed: object,
                      steps: object, shift: object, loras: object = None, *, received_at: float | None,
                      owner: str | None, **options: object) -> list[dict]:
    """`n` images of `size` ("WIDTHxHEIGHT"; None for an edit: the picture's) in one turn on the GPU, as
    pipeline.requests.batch reads them. `options`: the other fields of GenerationRequest (an edit's picture, mask
    and strength; the output format and compression). Each image: the saved file's path ("file"), its seed, its
    request id, its stage timings in milliseconds and any notices (a prompt cut to the token budget). RequestError
    names a bad field."""
    generations = [replace(generation, **options) for generation in batch(prompt, size, n, seed, steps, shift, loras)]
    results = await run_in_line(line, engine, generations, received_at=received_at, owner=owner)
    return [{"file": str(result.path), "seed": result.request.seed, "id": result.request_id,
             "loras": [{"name": choice.name, "scale": choice.scale} for choice in result.request.loras],
             "timings_ms": {stage: round(ms, 1) for stage, ms in result.timings.by_stage().items()},
             "notices": list(result.notices)} for result in results]
