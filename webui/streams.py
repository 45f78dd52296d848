"""The pool of event streams Gradio holds open, shared so that no client can starve the others.

Gradio keeps a stream open for as long as its session lives, even with nothing to send: a page's heartbeat, a
page's queue/data, an API call's result (call/NAME/EVENT_ID) asked for again after its result came. Each holds a
connection, so the pool is capped (half of --max-connections). A cap alone let one client starve everyone: ~256
idle heartbeats under new session names filled it, and then every page's result and every OpenAI request got 503,
while the refused request was still generated.

So a stream is one of two sorts. It is *delivering* while its session or event has a result still to come: a join
let in and its completion not yet seen on the stream (or, for a heartbeat, its session has such a stream open, or
joined within the last JOIN_GRACE_S: cutting a heartbeat ends its session's jobs). Every other stream is *idle*.
- A new stream replaces an older one of the same session or event and sort (a page that reconnects).
- When the pool is full, a new stream takes the place of the oldest idle one, which is ended (its response
  finished cleanly): a page's heartbeat reconnects by itself, and an idle one has nothing to lose.
- A client address other than loopback holds at most `per_client` streams: past that, its own oldest idle one
  makes room. (Behind an SSH tunnel every client is loopback; there, sessions are the only unit.)
- Only when every stream in the pool is delivering is a new one refused (503), and then so is every join, before
  the queue sees it: a request that could not get its result never reaches the GPU. Delivering streams are bounded
  by the jobs let into the queue, far under the cap.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import OrderedDict
from dataclasses import dataclass, field

HEARTBEAT = "heartbeat"
RESULTS = "results"
JOIN_GRACE_S = 10.0  # from a join to its page opening queue/data: milliseconds, but a loaded machine is slow
OWNERS_KEPT = 12_000  # sessions and events with results to come, remembered (as webui.limits.SESSIONS_KEPT)


@dataclass(eq=False)
class Stream:
    sort: str  # HEARTBEAT or RESULTS
    owner: str  # the session's name, or the API call's event id
    client: str  # the client's address; every loopback address as one
    number: int  # opening order: the oldest has the lowest
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # set when the pool takes its place


class StreamPool:
    def __init__(self, limit: int, per_client: int, loopback: str):
        self.limit, self.per_client, self.loopback = limit, per_client, loopback
        self.open: list[Stream] = []
        self.evicted = self.refused = 0
        self._expected: OrderedDict[str, int] = OrderedDict()  # owner → results to come
        self._joined_at: dict[str, float] = {}
        self._numbers = itertools.count()

    # -- results to come ------------------------------------------------------------------------------------------
    def joined(self, owner: str) -> None:
        """A join for `owner` was let into the queue: one result to come."""
        self._expected[owner] = self._expected.get(owner, 0) + 1
        self._expected.move_to_end(owner)
        self._joined_at[owner] = time.monotonic()
        while len(self._expected) > OWNERS_KEPT:
            forgotten, _ = self._expected.popitem(last=False)
            self._joined_at.pop(forgotten, None)

    def delivered(self, owner: str, results: int = 1) -> None:
        """`results` of `owner`'s results went out on its stream."""
        left = self._expected.get(owner, 0) - results
        if left > 0:
            self._expected[owner] = left
        else:
            self._expected.pop(owner, None)

    def _delivering(self) -> set[Stream]:
        """The open streams that are delivering (see the module's docstring)."""
        results = {s for s in self.open if s.sort == RESULTS and self._expected.get(s.owner, 0) > 0}
        owners, now = {s.owner for s in results}, time.monotonic()
        return results | {s for s in self.open if s.sort == HEARTBEAT and (
            s.owner in owners or now - self._joined_at.get(s.owner, -JOIN_GRACE_S) < JOIN_GRACE_S)}

    # -- opening and closing --------------------------------------------------------------------------------------
    def can_take_a_join(self) -> bool:
        """Whether a result stream could open now: the pool has room, or an idle stream to end."""
        return len(self.open) < self.limit or len(self._delivering()) < len(self.open)

    def open_stream(self, sort: str, owner: str, client: str) -> Stream | None:
        """A place for a new stream, ending others to make it (see the module's docstring); None if there is none."""
        for older in [s for s in self.open if s.sort == sort and s.owner == owner]:
            self._end(older)
        if client != self.loopback and sum(s.client == client for s in self.open) >= self.per_client:
            if not self._end_oldest_idle(lambda s: s.client == client):
                self.refused += 1
                return None
        if len(self.open) >= self.limit and not self._end_oldest_idle(lambda _s: True):
            self.refused += 1
            return None
        stream = Stream(sort, owner, client, next(self._numbers))
        self.open.append(stream)
        return stream

    def close(self, stream: Stream) -> None:
        if stream in self.open:
            self.open.remove(stream)

    def _end_oldest_idle(self, among) -> bool:
        delivering = self._delivering()
        idle = [stream for stream in self.open if among(stream) and stream not in delivering]
        if not idle:
            return False
        self._end(min(idle, key=lambda stream: stream.number))
        return True

    def _end(self, stream: Stream) -> None:
        self.open.remove(stream)
        stream.ended.set()
        self.evicted += 1

    def counts(self) -> dict[str, int]:
        """For /readyz and the metrics: streams open, delivering, the cap, and how many were ended or refused."""
        return {"open": len(self.open), "delivering": len(self._delivering()), "limit": self.limit,
                "ended": self.evicted, "refused": self.refused}
