"""The worker: serves Service instances to one or more brokers from one asyncio loop.

The loop owns the sockets; plain handlers run in a pool of ``concurrency`` threads, async
handlers as tasks on the loop, so the loop is always free to heartbeat (spec §11). Plain
handlers marked @zrpc.nonblocking run on the loop, at once: they promise to be quick, and the
worker moves one that breaks the promise to the pool.
"""
from __future__ import annotations

import asyncio
import collections
import contextvars
import dataclasses
import functools
import logging
import math
import os
import socket as socket_module
import threading
import time
from collections.abc import Callable, Iterable
from typing import Self

import zmq

from .. import _protocol as p
from .._descriptors import file_descriptor_set
from .._endpoints import endpoint_list
from .._errors import Error
from .._security import client_security
from .._logging import TRACE_ID
from .._polling import busy_poll_problem, yield_core
from .._service import Service
from .._status import StatusCode
from ._calls import (
    DRAINING,
    Admission,
    Answer,
    Call,
    HandlerTable,
    answer_of,
    error_pair,
    exception_pair,
    new_call,
    result_pair,
    run_sync,
    stopped_pair,
)
from ._link import FINAL_LINGER_MS, FROM_BROKER, BrokerLink
from ._metrics import HandlerStats
from ._pool import STALL as _POOL_STALL
from ._pool import HandlerPool
from ._share import CapacityShare

log = logging.getLogger("zrpc.worker")


class NotABrokerBackend(RuntimeError):
    """Every endpoint the worker was given answers as a broker's frontend (the clients' side):
    the worker can serve nobody there, so it stops with this error instead of running idle."""


# How long past its drain grace a stop may take: the last messages' linger, the handler threads'
# ends. stop() waits that long, and `zrpc worker run` too.
STOP_MARGIN = FINAL_LINGER_MS / 1000 + 5.0

# Messages taken from a socket in one go before the loop looks at anything else.
_BATCH = 256

# A @nonblocking handler that runs longer than this on the loop (wall time), twice within
# _STRIKE_WINDOW seconds, is moved to the pool for good. Twice: one slow run can be the process
# being descheduled; within a window: two such pauses a day apart say nothing about the handler.
INLINE_LIMIT = 0.02
_INLINE_STRIKES = 2
_STRIKE_WINDOW = 60.0

# The keep-alive task woke this much later than it meant to (and a heartbeat was missed): the
# loop did not run, and the worker says so (see _loop_blocked). Not less, as a busy host delays
# it too; but less when brokers would expire us sooner (_EXPIRY_SHARE of liveness x interval).
_LOOP_BLOCKED = 1.0
_EXPIRY_SHARE = 0.9

# The broker sends what is left of a deadline in whole milliseconds, rounded down (spec §5): a
# worker's deadline may come up to that much before the broker's, and a result finished in
# between still reaches the caller. Only one past both is answered as late (see _answer).
_DEADLINE_ROUNDING = 0.001


class Worker:
    """Serves ``services`` to the broker(s) at ``brokers``.

    ``run()`` blocks until ``stop()``; ``start()`` runs in a background thread; ``async serve()``
    runs on the caller's loop. ``stop(grace)`` drains: calls in flight may finish within
    ``grace`` seconds while new ones are handed back to the broker, then the worker says
    DISCONNECT and closes.

    ``curve_secret`` and ``broker_key`` turn on CURVE, as for :class:`zrpc.Client`; the broker
    must list our public key among its worker keys, or it never sees our READY.

    ``max_message_bytes``: a reply larger than this is answered RESOURCE_EXHAUSTED instead; set
    it as the broker's limit of the same name (64 MiB by default).

    ``busy_poll``: after a request from a broker, look for the next message every loop turn for
    this many seconds instead of sleeping until the socket signals (0: off). It saves the
    wake-up per call at light load and costs a core while calls keep coming (README "Busy
    polling"). The window is measured with ``clock``: one that stands still never closes it.
    """

    def __init__(self, services: Iterable[Service], brokers: str | Iterable[str] = "tcp://127.0.0.1:5556", *,
                 concurrency: int = 16, heartbeat_interval: float = 1.0, liveness: int = 3,
                 name: str | None = None, drain_grace: float = 10.0, context: zmq.Context | None = None,
                 clock: Callable[[], float] = time.monotonic, curve_secret=None, broker_key=None,
                 max_message_bytes: int = p.DEFAULT_MAX_MESSAGE_BYTES, busy_poll: float = 0.0):
        self.table = HandlerTable(services)
        self.brokers = [brokers] if isinstance(brokers, str) else list(brokers)
        if not self.brokers:
            raise ValueError("a worker needs at least one broker endpoint")
        # Checked here, not by libzmq in the worker's thread; each once: the same broker twice
        # would register the worker twice, with twice its capacity (the second tester).
        self.brokers = endpoint_list(self.brokers, "broker endpoint")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if not 0 < heartbeat_interval < math.inf:  # NaN fails too
            raise ValueError(f"heartbeat_interval must be a positive, finite number of seconds, not {heartbeat_interval!r}")
        if liveness < 1:
            raise ValueError("liveness must be at least 1")
        if max_message_bytes < 1:
            raise ValueError("max_message_bytes must be at least 1")
        if (problem := busy_poll_problem(busy_poll)) is not None:
            raise ValueError(problem)
        if not (isinstance(drain_grace, (int, float)) and 0 <= drain_grace < math.inf):  # NaN fails too
            raise ValueError(f"drain_grace must be a finite number of seconds, at least 0, not {drain_grace!r}")
        self.busy_poll = busy_poll
        self.max_message_bytes = max_message_bytes
        self.concurrency = concurrency
        self.heartbeat_interval = heartbeat_interval
        self.liveness = liveness
        self.drain_grace = drain_grace
        self.name = f"{socket_module.gethostname()}:{os.getpid()}" + (f":{name}" if name else "")
        self._context = context
        self._clock = clock
        # CURVE: (our key pair, the broker's public key), or None (see zrpc.Client for the forms).
        self._curve = client_security(curve_secret, broker_key)
        self._ready = p.ready_message(p.Ready(
            services=self.table.names,
            file_descriptor_set=file_descriptor_set(self.table.descriptors),
            capacity=concurrency,
            heartbeat_ms=max(1, round(heartbeat_interval * 1000)),
            name=self.name,
            batches=True,
        ))
        self._admission = Admission(concurrency)
        # (service, method) -> when each of its recent overruns on the loop ended.
        self._slow_inline: dict[tuple[str, str], list[float]] = {}
        self.stats = HandlerStats()  # read by /metrics (zrpc._worker._metrics.worker_registry)
        self._done: list = []  # (call, reply pair) finished by pool threads, for the loop
        self._done_lock = threading.Lock()
        self._done_wake_pending = False
        self._links: list[BrokerLink] = []
        self._share: CapacityShare | None = None  # with several brokers (spec §7b)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread_id: int | None = None
        self._pool: HandlerPool | None = None
        self._rebalance_timer: asyncio.TimerHandle | None = None
        # Async handlers that ended since the keep-alive task last ran: with those still running,
        # the suspects when it finds the loop was blocked (see _loop_blocked).
        self._async_ended: collections.Counter[tuple[str, str]] = collections.Counter()
        self._blocked_after = min(max(_LOOP_BLOCKED, heartbeat_interval), _EXPIRY_SHARE * liveness * heartbeat_interval)
        self._stop_event: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._stop_grace: float | None = None
        self._stop_requested = False
        self._draining = False
        self._drain_ends_at = math.inf  # when the drain under way gives up (see request_stop)
        self._drain_acked: asyncio.Event | None = None  # set while draining (spec §11)
        self._started = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._misdirected: NotABrokerBackend | None = None  # set when no link is a broker's backend
        # Set by an owner that prints ``error`` itself when the thread ends (`zrpc worker run`):
        # the log line would say it twice.
        self._owner_reports_errors = False

    @property
    def error(self) -> BaseException | None:
        """What stopped the worker on its own (a NotABrokerBackend, or an error of its loop)."""
        return self._error

    @property
    def draining(self) -> bool:
        """True from the moment ``stop()`` is taken into account: new calls go back to the broker."""
        return self._draining

    @property
    def running(self) -> int:
        """How many handlers are running now (at most ``concurrency``)."""
        return self._admission.running

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> None:
        """Serve until ``stop()`` (on a new event loop, in this thread)."""
        asyncio.run(self.serve())

    def start(self, timeout: float = 10.0) -> Self:
        """Serve in a background thread; returns once connected (raises if start-up failed)."""
        self._thread = threading.Thread(target=self._run_in_thread, name="zrpc-worker", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise RuntimeError(f"worker did not start within {timeout}s")
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def _run_in_thread(self) -> None:
        try:
            self.run()
        except BaseException as exc:  # reported by start(), or logged when it comes later
            if isinstance(exc, NotABrokerBackend):
                if not self._owner_reports_errors:
                    log.error("worker stopped: %s", exc)
            elif self._started.is_set():
                log.exception("worker stopped by an error")
            self._error = exc
            self._started.set()

    def stop(self, grace: float | None = None, timeout: float | None = None) -> None:
        """Drain and stop; waits for that unless called from the worker's own thread (or a signal
        handler interrupting it), where it only asks."""
        self.request_stop(grace)
        if self._loop_thread_id == threading.get_ident() or not self._started.is_set():
            return
        limit = (self._stop_grace + STOP_MARGIN) if timeout is None else timeout
        if not self._stopped.wait(limit):
            raise RuntimeError(f"worker did not stop within {limit:.1f}s")
        if self._thread is not None:
            self._thread.join(limit)

    def request_stop(self, grace: float | None = None) -> None:
        """Ask the worker to drain within ``grace`` seconds and stop; returns at once. Asked again
        while it drains, the drain ends by the sooner of the two ends (``0``: now): a second
        Ctrl-C to `zrpc worker run` stops a worker whose handler hangs."""
        grace = self.drain_grace if grace is None else grace
        again = self._stop_requested
        self._stop_grace = grace if not again or self._stop_grace is None else min(grace, self._stop_grace)
        self._stop_requested = True
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._stop_event.set)
                if again:
                    loop.call_soon_threadsafe(self._hurry_drain, grace)
            except RuntimeError:  # the loop closed meanwhile: it is stopped already
                pass

    def _hurry_drain(self, grace: float) -> None:
        """(on the loop) End a drain under way within ``grace`` seconds from now."""
        if self._draining:
            self._drain_ends_at = min(self._drain_ends_at, self._clock() + grace)
            self._drain_hurried.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the worker has stopped (by ``stop()`` or an error); False on timeout."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # ------------------------------------------------------------------ the loop

    async def serve(self) -> None:
        """Serve on the running loop until ``stop()``."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread_id = threading.get_ident()
        self._stop_event = asyncio.Event()
        self._idle = asyncio.Event()
        self._stopped.clear()
        own_context = self._context is None
        context = zmq.Context() if own_context else zmq.Context.shadow(self._context.underlying)
        self._pool = HandlerPool(self.concurrency, self._run_sync, self._deliver, self._clock)
        tasks: list[asyncio.Task] = []
        try:
            for endpoint in self.brokers:
                link = BrokerLink(context, self._loop, None, endpoint, self._ready, self.heartbeat_interval,
                                  self.liveness, self._clock, curve=self._curve,
                                  max_message_bytes=self.max_message_bytes)
                link.on_readable = functools.partial(self._receive, link)
                link.on_self_connection = functools.partial(self._drop_self_connection, link)
                self._links.append(link)
            if len(self._links) > 1:  # spec §7b: one capacity, shared by the brokers
                self._share = CapacityShare(self.concurrency, self._held, self._links, self._loop)
                for link in self._links:
                    link.on_ready = self._share.changed
            for link in self._links:
                link.open()
            log.info("worker %s ready: services=%s capacity=%d brokers=%s%s", self.name, ",".join(self.table.names),
                     self.concurrency, ",".join(self.brokers),
                     f" busy_poll={self.busy_poll:g}s" if self.busy_poll else "")
            tasks = [asyncio.create_task(self._keep_alive())]
            self._started.set()
            if self._stop_requested:
                self._stop_event.set()
            await self._stop_event.wait()
            await self._drain(self._stop_grace if self._stop_grace is not None else self.drain_grace)
            if self._misdirected is not None:
                raise self._misdirected
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for link in self._links:
                # A broker that does not have us registered has nothing to get: messages queued
                # for an endpoint nobody listens on would hold the context's end.
                link.close(FINAL_LINGER_MS if link.registered else 0)
            self._links = []
            if self._rebalance_timer is not None:
                self._rebalance_timer.cancel()
                self._rebalance_timer = None
            if self._share is not None:
                self._share.close()
            busy = self._admission.running > 0
            self._pool.close(wait=not busy, timeout=STOP_MARGIN)
            if own_context:
                context.term()
            self._loop_thread_id = None
            if self._misdirected is not None:  # known before wait() returns
                self._error = self._misdirected
            self._stopped.set()
            if self._misdirected is None:  # else its error says it stopped, and why
                log.info("worker %s stopped", self.name)

    async def _drain(self, grace: float) -> None:
        """(spec §11) Stop taking work, finish calls in flight within ``grace``, then DISCONNECT.

        Each broker is first told DISCONNECT{drain}; its answer proves that every request it
        will ever send us has arrived (one connection keeps order), so none is lost in transit.
        """
        self._draining = True
        self._drain_acked = asyncio.Event()
        self._drain_hurried = asyncio.Event()  # request_stop() again: _drain_ends_at moved closer
        if self._misdirected is None:  # no broker had us: nothing to drain, nothing to say
            log.info("worker %s draining: %d call(s) running, grace %.3gs", self.name, self._admission.running,
                     grace)
        for link in self._links:
            link.drain_acked = False
            link.send(p.disconnect_message("worker draining", drain=True))
        for call in self._admission.withdraw_all():  # never started: another worker can run them
            call.link.in_flight.pop(call.request_id, None)
            self._reply(call, error_pair(call.request_id, Error(StatusCode.UNAVAILABLE, "worker is draining", DRAINING)))
        self._drain_ends_at = planned_end = self._clock() + grace
        if self._admission.running:
            self._idle.clear()
            while self._admission.running and (left := self._drain_ends_at - self._clock()) > 0:
                await self._first_of(self._idle, left)
            if self._admission.running:
                hurried = self._drain_ends_at < planned_end
                when = "when asked to stop now" if hurried else f"after the {grace:.3g}s grace"
                log.warning("worker %s: %d call(s) still running %s; leaving them to the broker",
                            self.name, self._admission.running, when)
        while True:
            now = self._clock()
            # A broker silent for liveness x interval is gone (spec §11): it cannot acknowledge,
            # and waiting out the rest of the grace for it would only delay the stop.
            # Nor a client endpoint mistaken for one: it never registered us, and never will answer.
            # Nor a broker that does not have us registered (it never answered, refused our READY,
            # said it stopped, or is a frontend): it holds none of our calls.
            waiting = [link for link in self._links if not link.drain_acked and not link.silent(now)
                       and link.registered]
            if not waiting:
                break
            left = self._drain_ends_at - now
            if left <= 0:
                log.warning("worker %s: no drain acknowledgement from %s within the grace", self.name,
                            ",".join(link.endpoint for link in waiting))
                break
            self._drain_acked.clear()
            silent_in = min(link.last_heard + link.silence_limit for link in waiting) - now
            await self._first_of(self._drain_acked, max(0.001, min(left, silent_in)))
        gone = [link.endpoint for link in self._links if not link.drain_acked and link.registered]
        if gone and self._clock() < self._drain_ends_at:
            log.warning("worker %s: broker %s went silent; not waiting for its drain acknowledgement",
                        self.name, ",".join(gone))
        for link in self._links:
            link.flush_replies()
            # The broker re-dispatches or fails what is left; our late replies would be refused.
            for call in link.forget_registration():
                call.context.cancel()
            link.send(p.disconnect_message("worker stopping"))

    async def _first_of(self, event: asyncio.Event, timeout: float) -> None:
        """Wait until ``event`` is set, the drain is hurried, or ``timeout`` seconds have passed."""
        self._drain_hurried.clear()
        waits = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(self._drain_hurried.wait())]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    async def _keep_alive(self) -> None:
        """Heartbeat each broker, reconnect to a silent one, resend a delayed READY (spec §11)."""
        clock = self._clock
        while True:
            now = clock()
            timers = [self.heartbeat_interval]
            for link in self._links:
                if link.looks_like_frontend:  # closed for good (see _drop_frontend)
                    continue
                if link.socket is None:  # closed after it connected to itself (_drop_self_connection)
                    if self._draining:  # leaving: a new READY would register us again (review)
                        continue
                    link.open()
                if link.silent(now):
                    if self._draining:  # we are leaving: _drain stops waiting for this broker
                        continue
                    if link.silent_since is None and not link.refused_here:
                        # Said once: while the broker stays down this repeats every silence limit.
                        link.silent_since = link.last_heard
                        if link.broker_stopped:
                            log.info("broker %s is not back yet; reconnecting until one answers", link.endpoint)
                        elif link.heard_ever:
                            log.warning("broker %s silent for %.1fs; reconnecting until it answers", link.endpoint,
                                        now - link.last_heard)
                        else:  # a worker may start first: not "silent", not yet there
                            log.warning("no answer from a broker at %s yet (is one running there, and is this "
                                        "its backend?); connecting until one answers", link.endpoint)
                    elif not link.refused_here:
                        log.debug("broker %s still silent after %.1fs; reconnecting", link.endpoint,
                                  now - link.silent_since)
                    else:  # said once already, as an error (see BrokerLink._read_handshakes)
                        log.debug("broker %s still refuses our handshake (%s); reconnecting", link.endpoint,
                                  link.refused)
                    self._reconnect(link)
                else:
                    if link.ready_due is not None and now >= link.ready_due:
                        link.send_ready()
                    if link.heartbeat_due(now):
                        link.heartbeat(now)
                timers.append(link.next_timer(now))
            wait = min(timers)
            await asyncio.sleep(wait)
            late = clock() - now - wait
            if late >= self._blocked_after:
                self._loop_blocked(late)
            if self._async_ended:
                self._async_ended.clear()

    def _loop_blocked(self, late: float) -> None:
        """Say that the loop did not run for ``late`` seconds, and which async handlers ran then:
        a tester's `async def` handler calling time.sleep() got the worker expired by its broker
        ("silent") with nothing in the worker's log."""
        ran = self._async_ended + collections.Counter(
            (call.method.service, call.method.name) for link in self._links
            for call in link.in_flight.values() if call.started and call.method.is_async)
        # Not blamed on them alone: a stopped process (SIGSTOP, a paused VM) or a starved CPU
        # looks the same from here (a tester's SIGSTOP was blamed on an awaiting handler).
        suspects = ", ".join(f"{service}/{method} ({count})" for (service, method), count in sorted(ran.items()))
        log.warning("worker %s: its event loop did not run for %.2fs, so no heartbeat left (a broker expires a "
                    "worker silent for its heartbeat_liveness heartbeats, 3 by default). Either the process was "
                    "stopped or starved of CPU, or a handler blocked the loop; async handlers that ran then: %s. "
                    "An async handler must await, not block: use a plain def (it runs in the handler pool) or "
                    "await asyncio.to_thread(...)", self.name, late, suspects or "none")

    def _receive(self, link: BrokerLink) -> None:
        """Read what the broker sent until none is left (the FD only signals a change)."""
        for index in range(_BATCH):
            if link.socket is None:
                return
            # The first read follows the FD's signal and usually finds a message; after it,
            # ZMQ_EVENTS says whether another waits, cheaper than a recv raising zmq.Again.
            frames = link.recv() if index == 0 or link.readable() else None
            if frames is None:
                # The answers of inline (@nonblocking) handlers leave now, not a loop turn later.
                link.flush_replies()
                if link.poll_until > self._clock():
                    # Busy polling: look again next loop turn, after letting a process that
                    # waits for this core (the broker, a client) have it.
                    yield_core()
                    link.schedule_read()
                return
            link.last_heard = self._clock()
            if link.silent_since is not None:
                if link.heard_ever:  # a first answer is said by the "registered" line
                    log.info("broker %s answers again after %.1fs of silence", link.endpoint,
                             link.last_heard - link.silent_since)
                link.silent_since = None
            link.heard_ever = True
            try:
                command, body = p.split(frames, FROM_BROKER)
            except p.ProtocolError as exc:
                if len(frames) > 1 and frames[0] == p.TAG and frames[1] == p.REPLY:
                    # A broker's frontend answers our READY as a client's bad request.
                    self._drop_frontend(link)
                    return
                log.warning("bad message from broker %s (%s): %s", link.endpoint, exc.reason, exc.message)
                continue
            if command == p.REQUEST or command == p.REQUEST_BATCH:
                # Calls open the busy-poll window; heartbeats must not, or an idle worker
                # whose window spans its heartbeat interval would never sleep.
                link.poll_until = link.last_heard + self.busy_poll
                self._on_request(link, command, body)
            elif command == p.CANCEL:
                self._on_cancel(link, body)
            elif command == p.DISCONNECT:
                self._on_disconnect(link, body)
                continue
            # Anything but DISCONNECT says the broker knows us (it heartbeats and sends calls to
            # registered workers only, and one connection keeps order): a READY still due was
            # for a DISCONNECT that answered a message from before our last READY (heartbeats
            # queued while a broker restarted), and would register us twice.
            link.ready_due = None
            if not link.registered:  # "ready" only says we started: this says a broker has us
                link.registered = True
                link.broker_stopped = False
                link.refusal, link.refusals = None, 0
                log.info("registered with broker %s", link.endpoint)
        link.schedule_read()  # a full batch: let other work run, then read on

    def _drop_frontend(self, link: BrokerLink) -> None:
        """Stop talking to a broker's frontend: it will never send a call, and each heartbeat of
        ours made its broker warn (a tester's worker ran on, idle, logging one ERROR). With no
        other broker left, the worker stops with NotABrokerBackend."""
        link.looks_like_frontend = True
        self._orphan(link)  # none in flight, unless a broker sent calls before this answer
        link.close()
        problem = (f"{link.endpoint} answers like a broker's frontend (the endpoint for clients): workers "
                   f"connect to its backend (`zrpc broker start --backend`, port 5556 by default)")
        serving = [other.endpoint for other in self._links if not other.looks_like_frontend]
        if serving:
            log.error("%s; not connecting there again, serving %s", problem, ",".join(serving))
            return
        self._misdirected = NotABrokerBackend(problem)
        self._stop_grace = 0.0  # no broker has us registered: nothing to drain
        self._stop_event.set()

    # ------------------------------------------------------------------ commands

    def _on_request(self, link: BrokerLink, command: bytes, body) -> None:
        """A REQUEST (pairs, §4) or REQUEST_BATCH (§4b): each call as if it had arrived alone."""
        try:
            if command == p.REQUEST_BATCH:
                pairs = p.batch_pairs(body)
                link.batches = True  # this broker reads REPLY_BATCH too
            else:
                pairs = p.pairs(body)
        except p.ProtocolError as exc:
            log.warning("bad %s from broker %s: %s", p.COMMAND_NAMES[command], link.endpoint, exc.message)
            return
        answers = []
        now = self._clock()
        for raw_header, payload in pairs:
            try:
                header = p.decode_request_header(raw_header)
            except p.ProtocolError as exc:
                request_id = p.request_id_of(raw_header)
                if request_id:
                    answers.append(error_pair(request_id, Error(StatusCode.INVALID_ARGUMENT, exc.message)))
                continue
            if self._draining:
                answers.append(error_pair(header.request_id, Error(StatusCode.UNAVAILABLE, "worker is draining", DRAINING)))
                continue
            method = self.table.methods.get((header.service, header.method))
            if method is None:
                answers.append(error_pair(header.request_id, Error(
                    StatusCode.UNIMPLEMENTED, f"this worker does not serve {header.service}/{header.method}")))
                continue
            try:
                call = new_call(header, payload, method, link, link.epoch, now)
            except Error as error:
                answers.append(error_pair(header.request_id, error))
                continue
            if method.nonblocking:  # runs now, on the loop: it never waits for a slot, and is
                self._run_inline(call)  # answered before a CANCEL for it could be read
                continue
            link.in_flight[call.request_id] = call
            if self._admission.admit(call):
                self._start(call)
        for answer in answers:
            link.reply(answer)
        if self._share is not None:
            self._share.changed()

    def _on_cancel(self, link: BrokerLink, body) -> None:
        try:
            cancel = p.decode_cancel(body)
        except p.ProtocolError as exc:
            log.warning("bad CANCEL from broker %s: %s", link.endpoint, exc.message)
            return
        now = self._clock()
        for request_id in cancel.request_ids:
            call = link.in_flight.get(request_id)
            if call is None:
                continue
            if cancel.deadline:  # the broker's deadline passed (ours is rounded down from it)
                if call.context.deadline is None or call.context.deadline > now:
                    call.context.deadline = now
            call.context.cancel()
            if not call.started and self._admission.withdraw(call):
                # (spec §8) answered anyway: the broker keeps the slot until we reply
                del link.in_flight[request_id]
                self._reply(call, stopped_pair(call, now))
                if self._share is not None:
                    self._share.changed()

    def _on_disconnect(self, link: BrokerLink, body) -> None:
        """(spec §7, §11) The broker does not know us (any more): our calls there are gone.

        While draining, DISCONNECT{drain} is the broker's acknowledgement instead.
        """
        notice = p.decode_disconnect_message(body)
        if notice.drain:
            if self._draining:
                link.drain_acked = True
                self._drain_acked.set()
            return
        reason = notice.reason or "no reason given"
        self._orphan(link)
        if self._draining:
            log.info("broker %s sent DISCONNECT (%s) while draining", link.endpoint, reason)
            self._drain_acked.set()  # it has forgotten us: the drain need not wait for it
            return
        if reason == p.BROKER_STOPPING:
            link.broker_stopped = True  # its silence from now on is no surprise
            log.info("broker %s stopped; registering again when a broker is back there", link.endpoint)
            # A fresh socket: its READY waits in its queue for the next broker on this endpoint.
            # On the old one it could go down with the closing connection, and the heartbeats
            # queued after it would each be answered "unknown worker" by the next broker.
            link.close()
            link.open()
            return
        if reason == p.UNKNOWN_WORKER and not link.registered:
            # Again, before the broker has our READY: one per message of ours it got first.
            log.debug("broker %s sent DISCONNECT (%s) again; registering", link.endpoint, reason)
        elif reason.startswith("refused: "):  # our READY, refused: said once per reason, retried less and less
            link.refusals += 1
            if reason != link.refusal:
                link.refusal = reason
                log.error("broker %s %s; trying again in %gs, then less often (every %gs at most)", link.endpoint,
                          reason, link.ready_backoff(), link.ready_backoff_max)
            else:
                log.debug("broker %s %s again; next try in %gs", link.endpoint, reason, link.ready_backoff())
        else:
            log.info("broker %s sent DISCONNECT (%s); registering again", link.endpoint, reason)
        link.schedule_ready(self._clock())

    def _drop_self_connection(self, link: BrokerLink) -> None:
        """The link's socket connected to itself (see connected_to_itself): close it now, which
        frees the port for the broker; _keep_alive opens a new one at its next turn, within a
        heartbeat interval (libzmq itself pauses 100 ms between reconnections)."""
        self._orphan(link)
        link.close()

    def _reconnect(self, link: BrokerLink) -> None:
        """A new socket to the broker, after its silence. The old one closes with linger 0: what
        it still queues (a READY, heartbeats) must not reach a broker that comes up now, or it
        would register us twice."""
        self._orphan(link)
        link.close()
        link.open()

    def _orphan(self, link: BrokerLink) -> None:
        """The broker forgot this link's calls: stop them and never answer them."""
        orphans = link.forget_registration()
        for call in orphans:
            call.context.cancel()
            if not call.started:
                self._admission.withdraw(call)
        if orphans:
            log.warning("broker %s forgot %d call(s) in flight; they were cancelled", link.endpoint, len(orphans))
            if self._share is not None:
                self._share.changed()

    # ------------------------------------------------------------------ running handlers

    def _start(self, call: Call) -> None:
        call.started = True
        call.started_at = self._clock()
        method = call.method
        if method.is_async:
            context = contextvars.copy_context()  # the task's log lines carry the trace id
            context.run(TRACE_ID.set, call.context.trace_id)
            task = self._loop.create_task(method.handler(call.request, call.context), context=context)
            call.context._task = task
            task.add_done_callback(functools.partial(self._async_done, call))
            remaining = call.context.time_remaining()
            if remaining is not None:
                call.timer = self._loop.call_later(remaining, task.cancel)
        else:
            self._pool.submit(call)
            if self._rebalance_timer is None:
                self._rebalance_timer = self._loop.call_later(_POOL_STALL, self._rebalance)

    def _rebalance(self) -> None:
        """While plain calls wait for a pool thread, wake more threads for the ones that stall."""
        due = self._pool.rebalance()
        self._rebalance_timer = None if due is None else self._loop.call_later(due, self._rebalance)

    def _run_sync(self, call: Call) -> Answer:
        """Run a plain handler (in a pool thread, or on the loop when @nonblocking), unless its call
        was stopped while it waited."""
        if call.context.cancelled:
            return stopped_pair(call, self._clock())
        return run_sync(call)

    def _deliver(self, done: list) -> None:
        """(in a pool thread) Hand finished calls to the loop: one wake-up per batch."""
        with self._done_lock:
            self._done.extend(done)
            if self._done_wake_pending:
                return
            self._done_wake_pending = True
        try:
            self._loop.call_soon_threadsafe(self._finish_done)
        except RuntimeError:  # the loop is closed: the worker stopped without these calls
            pass

    def _finish_done(self) -> None:
        with self._done_lock:
            done, self._done = self._done, []
            self._done_wake_pending = False
        for call, answer in done:
            self._finish(call, answer)

    def _async_done(self, call: Call, task: asyncio.Task) -> None:
        self._async_ended[call.method.service, call.method.name] += 1
        if task.cancelled():
            answer = stopped_pair(call, self._clock())
        elif task.exception() is not None:
            answer = answer_of(exception_pair, call, task.exception())
        else:
            answer = answer_of(result_pair, call, task.result())
        self._finish(call, answer)

    def _run_inline(self, call: Call) -> None:
        """Run a @nonblocking handler here, on the loop, and answer it; move it to the pool if slow."""
        call.started = True
        started = call.started_at = self._clock()
        answer = self._run_sync(call)
        now = self._clock()
        self._answer(call, answer, now)  # it never entered link.in_flight (see _on_request)
        if (took := now - started) > INLINE_LIMIT:
            self._slow_on_loop(call.method, took)

    def _slow_on_loop(self, method, took: float) -> None:
        key = (method.service, method.name)
        now = self._clock()
        strikes = [t for t in self._slow_inline.get(key, ()) if now - t < _STRIKE_WINDOW] + [now]
        self._slow_inline[key] = strikes
        if len(strikes) < _INLINE_STRIKES or not self.table.methods[key].nonblocking:
            return
        self.table.methods[key] = dataclasses.replace(method, nonblocking=False)
        log.warning("%s/%s is marked @nonblocking but took %.0f ms on the worker's loop (limit %.0f ms, "
                    "twice within %.0f s): it runs in the handler pool from now on", method.service, method.name,
                    took * 1000, INLINE_LIMIT * 1000, _STRIKE_WINDOW)

    def _answer(self, call: Call, answer: Answer, now: float) -> None:
        """Send a handler's answer and count it in the handler metrics.

        A handler that finishes after its call's deadline, or after a CANCEL, is too late: the
        broker answered the caller DEADLINE_EXCEEDED (or the caller gave up) and would drop its
        result. The call is answered and counted as what its caller saw, not as the handler's
        outcome (OK, say): the worker's metrics agree with the broker's and the client's.
        """
        context = call.context  # (context.cancelled would read the clock again: 327 ns, this 60)
        if ((context._cancelled or (context.deadline is not None and now >= context.deadline + _DEADLINE_ROUNDING))
                and answer[2] != StatusCode.DEADLINE_EXCEEDED and answer[2] != StatusCode.CANCELLED):
            answer = stopped_pair(call, now)
        self._reply(call, answer)
        self.stats.observe(call.context.service, call.context.method, answer[2], now - call.started_at)

    def _finish(self, call: Call, answer: Answer) -> None:
        """A pooled or async call is done: answer it and start what waited for its slot."""
        if call.timer is not None:
            call.timer.cancel()
        link = call.link
        if link.in_flight.get(call.request_id) is call:
            del link.in_flight[call.request_id]
        self._answer(call, answer, self._clock())
        self._admission.release()
        while (waiting := self._admission.take()) is not None:
            if not waiting.context.cancelled:
                self._start(waiting)
                continue
            self._admission.release()  # its deadline passed while it waited here
            waiting.link.in_flight.pop(waiting.request_id, None)
            self._reply(waiting, stopped_pair(waiting, self._clock()))
        if self._admission.running == 0:
            self._idle.set()
        if self._share is not None:
            self._share.changed()

    def _held(self) -> int:
        """Calls that take a slot: running, orphans included, or waiting for one (spec §7b)."""
        return self._admission.running + len(self._admission.waiting)

    def _reply(self, call: Call, answer: Answer) -> None:
        if call.epoch == call.link.epoch:
            call.link.reply(answer)
