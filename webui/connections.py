"""Idle, half-open, trickling and unread sockets: a deadline for each request (its head and its body) and for each
stall in reading an answer, a cap on open connections, and enough file descriptors for that cap.

Written by hand because uvicorn has no deadline for a request (its keep-alive timeout starts only after a first
response, and nothing times a body), none for a client that stops reading, and counts connections only to answer
503 once a head is complete: ~1,100 sockets that never finished their headers used up the process's 1,024 file
descriptors and /readyz stopped answering; 50 that sent a body a byte every 5 s held every slot of a
--max-connections 50 server; 530 that asked for an 11 MB image and read none of it made /readyz answer 503.
uvicorn's h11 limit on a request head (h11_max_incomplete_event_size) applies only to a head that arrives in pieces:
one of 100 kB, or of 8,000 headers, sent at once was parsed whole (~22 ms of the event loop each), so heads are
measured here, in C (bytes.find and count), before h11 parses them. `guarded_protocol` gives the protocol class
that webui.server passes to uvicorn's Config.

The service's one reach into uvicorn's internals: the class extends uvicorn's H11Protocol, overriding its event
methods and reading its `cycle` (the request under way: `scope`, `more_body`), `conn` (h11's Connection:
`trailing_data`), `transport` and `loop`, as read from uvicorn 0.55.0 and h11 0.16.0 (config.lock warns at start
when another uvicorn is installed)."""

from __future__ import annotations

import contextlib
import errno
import logging
import resource
import socket
import struct
import time

from uvicorn.protocols.http.h11_impl import H11Protocol

from config.log_lines import REPEAT_LOG_INTERVAL_S, Occasional, OncePerInterval
from config.settings import SettingsError

log = logging.getLogger("zimage.connections")

FDS_PER_CONNECTION = 2  # the socket, and room for the files and pipes a request may open meanwhile
FDS_RESERVED = 256  # the model's files, the log, compile workers' pipes: what the process needs besides sockets
# The pieces of one chunked request body. h11 parses each piece in Python, about 6 µs: a 1 MiB body sent a byte a
# piece (5.7 MiB on the wire) held the event loop for 6 s, and eight at once made /healthz take 4.9 s. A client
# streaming a body sends pieces of kilobytes: 16,384 of them carry 16 MiB at one KiB each, past any body taken here.
MAX_BODY_PIECES = 16_384
# What a client must take of an answer backed up in the server's buffers within each send timeout to stay: about
# 2 KiB/s at the default 30 s. Counted from the transport's buffer, not from asyncio's resume_writing: uvloop
# resumes only once its buffer is all but empty, so a large answer written at once (an image as base64) resumes
# only at its end, however steadily the client reads.
MIN_BYTES_READ_PER_TIMEOUT = 64 * 1024
# A request head (request line and headers) longer than this, or with more headers, gets 431 and a closed
# connection. Browsers send 1-3 KiB and some 20 headers; nginx's default buffers take 8 KiB a line.
MAX_HEAD_BYTES = 16 * 1024
MAX_HEADERS = 100
HEAD_END = b"\r\n\r\n"
LINGER_S = 2.0  # a refused head's connection reads and drops what still comes, this long, before it closes


def check_port_free(host: str, port: int) -> None:
    """Bind (host, port) as the server will, and let go: a port taken by a second copy of the service fails in a
    second, not after minutes of loading weights. Another process could take the port between this check and the
    server's own bind, but that bind follows within seconds, and if it loses supervisord restarts the service; the
    check is for the common case, not that race."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As uvicorn binds: a port whose last connections linger in TIME_WAIT after a restart is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise SettingsError(f"port {port} on {host} is in use: is another copy of the service running? "
                                    f"(ss -ltnp 'sport = :{port}' names the process) Or choose another --port."
                                    ) from None
            raise SettingsError(f"cannot listen on port {port} of {host}: {error.strerror}.") from None


def raise_fd_limit(max_connections: int) -> int:
    """Raise the soft limit on open files as far as the hard one allows (supervisord and shells often leave 1,024),
    and return how many connections fit in it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections * FDS_PER_CONNECTION + FDS_RESERVED
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    fitting = max(1, (soft - FDS_RESERVED) // FDS_PER_CONNECTION)
    if fitting < max_connections:
        log.warning("open-file limit %d (hard %d) leaves room for %d connections, not max_connections=%d; raise "
                    "the hard limit (minfds in supervisord.conf, ulimit -Hn) to allow more", soft, hard, fitting,
                    max_connections)
        return fitting
    log.info("open-file limit %d (hard %d); connections capped at %d", soft, hard, max_connections)
    return max_connections


def _head_oversized(received: bytes) -> bool:
    """Whether the request head at the start of `received` (all of it, or as much as has come) passes MAX_HEAD_BYTES
    or MAX_HEADERS."""
    end = received.find(HEAD_END, 0, MAX_HEAD_BYTES + len(HEAD_END))
    if end < 0:
        return len(received) > MAX_HEAD_BYTES or received.count(b"\n", 0, MAX_HEAD_BYTES) > MAX_HEADERS
    return received.count(b"\n", 0, end) > MAX_HEADERS


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus: a request, head and body, must arrive whole within `request_timeout_s` of the
    connection (or of the previous response, on a kept-alive one); a client that stops reading its answer for
    `send_timeout_s` while the server has more to send is cut off; and past `max_connections` the oldest other
    connection still waiting for its request head, or else for its body, or else the one that has read least of
    its answer for longest, is closed to make room. A health probe sends its request at once and reads its answer,
    so it gets through; sockets that never do, trickle, or stop reading are the ones dropped. (The bodies this
    service takes are at most 1 MiB: webui.limits.)"""

    request_timeout_s = 10.0
    send_timeout_s = 30.0
    max_connections = 512
    _evictions = Occasional(log)
    _timeouts = Occasional(log)
    _unread = Occasional(log)
    _cut_up = Occasional(log)
    _too_large = Occasional(log)

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._task = None  # the app's task for this connection's current request
        self._counted_cycle = None  # the request whose chunked body's line ends are being counted
        self._chunked = False
        self._line_ends = 0
        self._waiting_since = time.monotonic()
        self._request_deadline = None
        self._unread_since = None  # since when the client has taken too little of an answer backed up in the buffer
        self._send_deadline = None
        self._buffered_at_deadline_start = 0
        self._lost = False
        self._refused = False
        self._await_request(after=self.cycle)
        if len(self.connections) > self.max_connections:
            self._evict_oldest_waiting()

    def _await_request(self, after) -> None:
        """Time the request that follows the cycle `after`, unless it has already arrived (pipelined)."""
        self._cycle_before_request = after
        self._waiting_since = time.monotonic()
        if not self._request_arrived():
            self._request_deadline = self.loop.call_later(self.request_timeout_s, self._request_timed_out)

    def _head_arrived(self) -> bool:
        return self.cycle is not self._cycle_before_request

    def _request_arrived(self) -> bool:
        """The whole request, head and body, that this connection was waiting for."""
        return self._head_arrived() and not self.cycle.more_body

    def _stop_waiting(self) -> None:
        if self._request_deadline is not None:
            self._request_deadline.cancel()
            self._request_deadline = None

    def handle_events(self) -> None:
        tasks_before = set(self.tasks) if self._request_deadline is not None else None
        super().handle_events()
        if tasks_before is not None and (started := self.tasks - tasks_before):
            self._task = next(iter(started))

    def data_received(self, data: bytes) -> None:
        if self._refused:  # the rest of a head refused: read and dropped until the connection closes
            return
        # h11 holds what has come of a head until its end arrives: measure that and the new data together.
        if not self._head_arrived() and _head_oversized(self.conn.trailing_data[0] + data):
            self._refuse_head()
            return
        super().data_received(data)
        if self._request_deadline is not None and self._request_arrived():
            self._stop_waiting()
        if self._head_arrived() and self._chunked_body_cut_up(data):
            self._cut_up("closed a connection whose chunked request body came in more than %d pieces",
                         MAX_BODY_PIECES)
            self._stop_waiting()
            self.transport.close()

    def _refuse_head(self) -> None:
        """431, then the connection closed. Closed only LINGER_S after the answer and a FIN: a client still sending
        the rest of its head would otherwise get a reset that can drop the answer before it is read."""
        self._too_large("refused a request head over %d bytes or %d headers", MAX_HEAD_BYTES, MAX_HEADERS)
        self._stop_waiting()
        self._refused = True
        body = (f"Request head over {MAX_HEAD_BYTES} bytes or {MAX_HEADERS} headers.").encode()
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain\r\n"
                             b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()

    def _chunked_body_cut_up(self, data: bytes) -> bool:
        """Whether the current request's chunked body has passed MAX_BODY_PIECES, counted by its line ends (two a
        piece; a count in C, where parsing the pieces to count them would cost what it guards against)."""
        if self.cycle is not self._counted_cycle:
            self._counted_cycle = self.cycle
            self._line_ends = 0
            headers = self.cycle.scope["headers"]
            self._chunked = any(name == b"transfer-encoding" for name, _ in headers)
        if not self._chunked:
            return False
        self._line_ends += data.count(b"\r\n")
        return self._line_ends > 2 * MAX_BODY_PIECES

    def on_response_complete(self) -> None:
        finished = self.cycle
        # A request sent behind this one (pipelined) waits whole in h11's buffer, and is parsed next.
        if (pipelined := self.conn.trailing_data[0]) and _head_oversized(pipelined):
            self._refuse_head()
            return
        super().on_response_complete()  # starts the next request, if the client had already sent it (pipelining)
        if not self.transport.is_closing() and self._request_deadline is None:
            self._await_request(after=finished)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_deadline is None:
            self._unread_since = time.monotonic()
            self._start_send_deadline()

    def _start_send_deadline(self) -> None:
        self._buffered_at_deadline_start = self.transport.get_write_buffer_size()
        self._send_deadline = self.loop.call_later(self.send_timeout_s, self._send_timed_out)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._stop_sending_clock()

    def _stop_sending_clock(self) -> None:
        self._unread_since = None
        if self._send_deadline is not None:
            self._send_deadline.cancel()
            self._send_deadline = None

    def connection_lost(self, exc) -> None:
        self._lost = True
        self._stop_waiting()
        self._stop_sending_clock()
        super().connection_lost(exc)

    def _request_timed_out(self) -> None:
        self._request_deadline = None
        if self._request_arrived() or self.transport.is_closing():
            return
        self._timeouts("closed a connection that sent no complete request (head and body) in %.0f s",
                       self.request_timeout_s)
        self.transport.close()

    def _send_timed_out(self) -> None:
        self._send_deadline = None
        taken = self._buffered_at_deadline_start - self.transport.get_write_buffer_size()
        if taken >= MIN_BYTES_READ_PER_TIMEOUT:  # reading, slowly: the next stretch is timed afresh
            self._unread_since = time.monotonic()
            self._start_send_deadline()
            return
        self._unread("cut off a connection that stopped reading its answer for %.0f s", self.send_timeout_s)
        self._cut_off()

    def _cut_off(self) -> None:
        """Close now, and drop what is buffered: close() would wait for a client that does not read to take it, and
        the kernel would keep megabytes of unsent answer for minutes; a reset frees both at once."""
        if self._lost:  # its socket may be closed, and its descriptor another connection's by now
            return
        self._stop_waiting()
        self._stop_sending_clock()
        sock = self.transport.get_extra_info("socket")
        with contextlib.suppress(OSError):  # a socket the transport has already let go of
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def _evict_oldest_waiting(self) -> None:
        others = [c for c in self.connections if isinstance(c, GuardedH11Protocol) and c is not self]
        # Not one still taking its last answer: it waits for its next request only once that is read.
        waiting = [c for c in others if c._request_deadline is not None and not c._request_arrived()
                   and not c.transport.is_closing() and not c.transport.get_write_buffer_size()]
        # A closing one too: close() waits for the client to read what is buffered.
        unread = [c for c in others if c._unread_since is not None]
        if waiting:
            # Those still sending their head first: a client that has sent its head is sending its body, at once
            # unless it trickles, and is dropped only when no connection is further behind.
            oldest = min(waiting, key=lambda connection: (connection._head_arrived(), connection._waiting_since))
            self._evictions("%d connections open (max_connections=%d): closed the oldest still sending its request",
                            len(self.connections), self.max_connections)
            oldest._stop_waiting()
            oldest.transport.close()
        elif unread:
            oldest = min(unread, key=lambda connection: connection._unread_since)
            self._evictions("%d connections open (max_connections=%d): cut off the one that has read least of its "
                            "answer for longest", len(self.connections), self.max_connections)
            oldest._cut_off()
        else:
            return  # every other connection is busy with a request: uvicorn's own limit answers this one 503
        # Out of the count now, not at its connection_lost: on uvloop (installed with the scale extra) the new
        # connection's request is read first, and uvicorn would answer it 503 for a cap the eviction just freed.
        # Its request's task (one still waiting for its body) likewise: uvicorn counts tasks too, and that one
        # ends only a few turns of the loop later, when it sees the disconnect.
        self.connections.discard(oldest)
        self.tasks.discard(oldest._task)


def guarded_protocol(*, max_connections: int, request_timeout_s: float,
                     send_timeout_s: float) -> type[GuardedH11Protocol]:
    """The protocol class for uvicorn's Config (`http=`): every connection has a request deadline and a deadline for
    each stall in reading its answers, and counts against the cap. Give the Config `limit_concurrency` of
    max_connections + 1 with it: past the cap uvicorn itself answers 503 to complete requests."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {
        "max_connections": max_connections, "request_timeout_s": request_timeout_s,
        "send_timeout_s": send_timeout_s})


class OccasionalRepeats(logging.Filter):
    """Lines a flood repeats thousands of times a second: asyncio's error, with a traceback, for every failed
    accept() once the process is out of file descriptors, and uvicorn's warning for every request it refuses past
    the connection cap, cannot parse, or cannot upgrade (any Upgrade header but websocket's), and for every answer
    a route broke off (Gradio's result streams do, for a session or event they no longer know) or never began
    (Gradio's CORS middleware fails on an Origin without a Host, which HTTP/1.0 allows). Let one of each through
    per interval, with the count of the others."""

    MARKERS = ("socket.accept() out of system resource", "Exceeded concurrency limit.",
               "Invalid HTTP request received.", "Unsupported upgrade request.",
               "ASGI callable returned without completing response.",
               "ASGI callable returned without starting response.")

    def __init__(self, interval_s: float = REPEAT_LOG_INTERVAL_S):
        super().__init__()
        self._due = OncePerInterval(interval_s)
        self.dropped = dict.fromkeys(self.MARKERS, 0)

    def filter(self, record: logging.LogRecord) -> bool:
        marker = next((marker for marker in self.MARKERS if marker in record.getMessage()), None)
        if marker is None:
            return True
        if not self._due.due(marker):
            self.dropped[marker] += 1
            return False
        record.msg, record.args = f"{marker} ({self.dropped[marker]} more since the last such line)", ()
        record.exc_info = record.exc_text = None
        self.dropped[marker] = 0
        return True
