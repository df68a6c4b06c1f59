"""One worker-to-broker connection: its DEALER, its registration and its timers (spec §7, §11)."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import zmq

from .. import _frames
from .. import _protocol as p
from .. import _security
from .._client._monitor import (HANDSHAKE_EVENTS, HandshakeCloses, connected_to_itself, parse_event, refusal_reason,
                                self_connection_warning)

log = logging.getLogger("zrpc.worker")

# (spec §2, §3) What a broker may send a worker.
FROM_BROKER = frozenset({p.REQUEST, p.REQUEST_BATCH, p.HEARTBEAT, p.CANCEL, p.DISCONNECT})

# Replies gathered in one loop turn leave as one REPLY or REPLY_BATCH (spec §4, §4b); a message
# carries at most this many, which every broker's frame limit lets through.
MAX_PAIRS_PER_REPLY = p.MAX_CALLS_PER_MESSAGE

# Lingering on the last close lets DISCONNECT and the last replies leave; bounded so a vanished
# broker cannot hold up the context's termination for longer than this.
FINAL_LINGER_MS = 1000


# The longest a refused worker waits between READYs (see BrokerLink.ready_backoff).
READY_BACKOFF_MAX = 30.0


class BrokerLink:
    """The DEALER to one broker endpoint, with when we last sent and last heard.

    The socket is a plain (blocking-API) zmq socket used only with NOBLOCK from the loop thread;
    the loop watches its ZMQ_FD and calls ``on_readable``, which must read until EAGAIN. That
    FD is edge-triggered and a send may consume its signal, so after each send we look at
    ZMQ_EVENTS and schedule a read ourselves when a message is waiting (as pyzmq's ZMQStream
    does). This costs a fraction of zmq.asyncio's futures per message.

    ``epoch`` counts registrations: a call belongs to the registration it arrived under, and
    once the broker has forgotten that registration (DISCONNECT, or a new socket after silence)
    the call's reply would be refused, so it is not sent.
    """

    def __init__(self, context: zmq.Context, loop: asyncio.AbstractEventLoop, on_readable: Callable[[], None],
                 endpoint: str, ready: list[bytes], heartbeat_interval: float, liveness: int,
                 clock: Callable[[], float], curve: tuple | None = None,
                 max_message_bytes: int = p.DEFAULT_MAX_MESSAGE_BYTES):
        self.context = context
        self.max_message_bytes = max_message_bytes  # a larger reply is refused (see result_pair)
        self.curve = curve  # (our KeyPair, the broker's public key) for CURVE
        self.loop = loop
        self.on_readable = on_readable
        self.endpoint = endpoint
        self.ready = ready
        self.heartbeat_interval = heartbeat_interval
        self.silence_limit = liveness * heartbeat_interval
        self.clock = clock
        self.socket: zmq.Socket | None = None
        self.epoch = 0
        self.in_flight: dict = {}  # dispatch id -> Call, for the current epoch only
        self.last_sent = self.last_heard = self.registered_at = clock()
        self.silent_since: float | None = None  # when we last heard it, while it stays silent
        self.heard_ever = False  # has a broker at this endpoint ever sent us anything?
        self.broker_stopped = False  # it said it stopped (DISCONNECT, broker stopping), and none answered since
        self.refusal: str | None = None  # why the broker refused our last READY, until it takes one
        self.refusals = 0  # READYs refused in a row: each waits longer for the next (see ready_backoff)
        self.poll_until = 0.0  # busy_poll: read every loop turn until then (set by calls only)
        self.ready_due: float | None = None  # a READY to send at this time (after a refusal)
        self.registered = False  # the broker has shown it took our last READY (see _receive)
        self.dropped = 0  # messages not sent because the socket's queue was full
        self.drain_acked = False  # the broker answered our DISCONNECT{drain} (spec §11)
        # The broker that heard our last READY reads REPLY_BATCH: it has sent us a REQUEST_BATCH
        # since (spec §4b).
        self.batches = False
        # What we last told the broker it may hold here (spec §7b); None: our READY's capacity.
        self.offered: int | None = None
        self.on_ready: Callable[[], None] | None = None  # called after each READY (CapacityShare)
        # Called when the socket connected to itself (see connected_to_itself): start afresh.
        self.on_self_connection: Callable[[], None] | None = None
        self._read_scheduled = False
        self._replies: list[tuple] = []  # answers (header, payload[, status code]) to send this loop turn
        # CURVE: handshake outcomes, so a refused key is said plainly instead of looking like a
        # silent broker (ZeroMQ retries a refused handshake forever, quietly).
        self._monitor: zmq.Socket | None = None
        self._closes = HandshakeCloses()  # without CURVE (see _read_handshakes)
        self.refused: str | None = None  # why the broker refused our last handshake (said once)
        self.refused_here = False  # ... on this socket: its silence is that refusal, not a dead broker
        self.looks_like_frontend = False  # REPLYs came back: this is a broker's client endpoint

    def open(self) -> None:
        """A fresh DEALER connected to the broker, announcing READY at once (spec §7)."""
        socket = self.context.socket(zmq.DEALER)
        socket.linger = 0
        socket.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        if self.curve is not None:
            _security.apply_client_curve(socket, *self.curve)
        _security.allow_ipv6_for(socket, [self.endpoint])
        monitor = None
        try:
            # Before connecting: the first handshake is watched too (a plain worker at a broker
            # that requires CURVE is refused at once, and says so).
            monitor = socket.get_monitor_socket(HANDSHAKE_EVENTS | zmq.EVENT_CONNECTED)
            socket.connect(self.endpoint)
        except zmq.ZMQError:
            if monitor is not None:
                monitor.close(0)
            socket.close(0)
            raise
        self.socket = socket
        self.refused_here = False
        if monitor is not None:
            self._monitor = monitor
            self.loop.add_reader(self._monitor.FD, self._read_handshakes)
            self.loop.call_soon(self._read_handshakes)  # edge-triggered, as the socket's FD
        self.loop.add_reader(socket.FD, self.on_readable)
        self.schedule_read()  # the FD is edge-triggered: look once anyway
        self.epoch += 1
        self.last_heard = self.clock()
        self.send_ready()

    def close(self, linger_ms: int = 0) -> None:
        if self._monitor is not None:
            self.loop.remove_reader(self._monitor.FD)
            self.socket.disable_monitor()
            self._monitor.close(0)
            self._monitor = None
        if self.socket is not None:
            self.loop.remove_reader(self.socket.FD)
            self.socket.close(linger_ms)
            self.socket = None

    def _read_handshakes(self) -> None:
        """Log a refused handshake once per refusal (the first, and again after an acceptance)."""
        while self._monitor is not None:
            try:
                frames = self._monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            event, value, _ = parse_event(frames)
            if event == zmq.EVENT_CONNECTED:
                if connected_to_itself(value) and self.on_self_connection is not None:
                    log.warning("%s", self_connection_warning(self.endpoint))
                    self.on_self_connection()  # a new socket: its monitor's events are its own
                    return
                continue
            if self.curve is None and (hint := self._closes.hint(event, self.endpoint)) is not None:
                log.warning("%s", hint)
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                if self.refused is not None:
                    log.info("broker %s accepted our key now", self.endpoint)
                self.refused, self.refused_here = None, False
                continue
            reason = refusal_reason(event, value, self.curve is not None)
            if reason is not None:
                self.refused_here = True
            if reason is not None and reason != self.refused:
                self.refused = reason
                # Only a refused key is the broker's to fix; a wrong broker key or mode is ours.
                fix = ("until it accepts our key (its worker keys, then SIGHUP or a restart) this worker "
                       "serves nothing there" if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH
                       else "this worker serves nothing there until that is fixed")
                log.error("broker %s refused our handshake: %s; %s; retrying", self.endpoint, reason, fix)

    def schedule_read(self) -> None:
        """Read on the next loop turn (once, however often this is asked before then)."""
        if not self._read_scheduled:
            self._read_scheduled = True
            self.loop.call_soon(self._scheduled_read)

    def _scheduled_read(self) -> None:
        self._read_scheduled = False
        if self.socket is not None:
            self.on_readable()

    def recv(self) -> list[bytes] | None:
        """The next message, or None when none is waiting."""
        return _frames.receive(self.socket)

    def readable(self) -> bool:
        """A message waits (ZMQ_EVENTS; asking takes the FD's signal, as a recv does)."""
        return _frames.readable(self.socket)

    def send(self, frames: list) -> bool:
        """Queue a message without ever waiting; False when it was dropped (queue full, closed)."""
        socket = self.socket
        if socket is None:
            return False
        try:
            _frames.send(socket, frames)
        except zmq.ZMQError as error:  # EAGAIN: the queue to a broker that is not reading is full
            self.dropped += 1
            log.debug("message to %s dropped: %s", self.endpoint, error)
            return False
        finally:
            if _frames.readable(socket):
                self.schedule_read()
        self.last_sent = self.clock()
        return True

    def reply(self, answer: tuple) -> None:
        """Queue a reply (header, payload[, status code]); all queued in one loop turn leave together."""
        if not self._replies:
            self.loop.call_soon(self.flush_replies)
        self._replies.append(answer)

    def flush_replies(self) -> None:
        replies, self._replies = self._replies, []
        if self.batches and replies:
            replies = self._send_batches(replies)
        for start in range(0, len(replies), MAX_PAIRS_PER_REPLY):
            # An answer may carry its status code third (for the metrics): only the pair is sent.
            self.send(p.reply_message(answer[:2] for answer in replies[start:start + MAX_PAIRS_PER_REPLY]))

    def _send_batches(self, replies: list) -> list:
        """Send the small answers as REPLY_BATCHes; return the others, for pairs (§4b)."""
        headers, payloads, large = [], [], []
        limit = p.BATCH_CALL_BYTES
        for answer in replies:
            header, payload = answer[0], answer[1]
            if len(header) + len(payload) < limit:
                headers.append(header)
                payloads.append(payload)
            else:
                large.append(answer)
        if headers:
            for message in p.batch_messages(p.REPLY_BATCH, headers, payloads, MAX_PAIRS_PER_REPLY):
                self.send(message)
        return large

    def send_ready(self) -> None:
        # Each registration starts in pairs: the broker that hears it may be another (an older
        # one, restarted on this endpoint) even on this socket, which ZeroMQ reconnects itself.
        self.batches = False
        self.ready_due = None
        self.registered = False
        self.registered_at = self.clock()
        self.offered = None
        self.send(self.ready)
        if self.on_ready is not None:  # the calls other brokers hold may already take our slots
            self.on_ready()

    def heartbeat(self, now: float) -> None:
        """Send HEARTBEAT; counted as sent even if dropped, so a full queue cannot spin the loop."""
        self.send(p.heartbeat_message())
        self.last_sent = now

    def forget_registration(self) -> list:
        """The broker no longer knows our calls: start a new epoch; return the orphaned calls."""
        orphans = list(self.in_flight.values())
        self.in_flight = {}
        self.registered = False  # it has none of our calls now: a stop does not wait for it
        self._replies = []
        self.epoch += 1
        return orphans

    def schedule_ready(self, now: float) -> None:
        """READY again after a DISCONNECT: at once, or when ``ready_backoff`` has passed since
        the last one (a READY just sent may be what the broker refused)."""
        due = self.registered_at + self.ready_backoff()
        if now >= due:
            self.send_ready()
        else:
            self.ready_due = due

    def ready_backoff(self) -> float:
        """How long after a READY another may go: one heartbeat interval, doubled per refusal in a
        row up to READY_BACKOFF_MAX. A broker's rules change only by an operator's reload, and a
        tester's refused worker made its broker log the refusal every second, for ever."""
        if not self.refusals:
            return self.heartbeat_interval
        return min(self.heartbeat_interval * 2.0 ** min(self.refusals, 16), self.ready_backoff_max)

    @property
    def ready_backoff_max(self) -> float:
        return max(READY_BACKOFF_MAX, self.heartbeat_interval)

    # ------------------------------------------------------------------ timers

    def waiting_out_refusal(self) -> bool:
        """A refused READY's wait runs (see ready_backoff). The broker holds no registration of
        ours, has nothing to tell us, and refuses all we send but a READY: a worker whose key
        was revoked had each heartbeat refused and logged, and each refusal lengthened its
        wait. Heartbeats and the silence limit wait for the next READY."""
        return self.ready_due is not None and self.refusals > 0

    def silent(self, now: float) -> bool:
        """The broker has said nothing for liveness x interval since our last READY: it is gone
        (spec §11)."""
        if self.waiting_out_refusal():
            return False
        return now - max(self.last_heard, self.registered_at) >= self.silence_limit

    def heartbeat_due(self, now: float) -> bool:
        """We have sent nothing for an interval (spec §11)."""
        return now - self.last_sent >= self.heartbeat_interval and not self.waiting_out_refusal()

    def next_timer(self, now: float) -> float:
        """Seconds until something is due: a heartbeat, the liveness limit or a delayed READY."""
        if self.waiting_out_refusal():
            return max(0.0, self.ready_due - now)
        due = min(self.last_sent + self.heartbeat_interval,
                  max(self.last_heard, self.registered_at) + self.silence_limit)
        if self.ready_due is not None:
            due = min(due, self.ready_due)
        return max(0.0, due - now)
