"""The broker's brain: registry, queues, dispatch, heartbeats and deadlines, with no I/O.

The socket loop feeds it decoded-on-demand frames and the current monotonic time; it answers by
filling two outboxes, ``frontend_out`` and ``backend_out``, lists of ``(routing_id, frames)``.
Each rule cites the section of PROTOCOL.md that states it. Tests drive it directly, with a fake
clock and no sockets.
"""
from __future__ import annotations

import collections
import heapq
import itertools
import logging
from typing import Collection, Sequence

from .. import _protocol as p
from .._descriptors import incompatibility, service_definitions
from .._status import StatusCode
from . import _builtin
from ._config import BrokerConfig
from ._deadlines import Deadlines
from ._state import NO_DEFINITION, Call, CallState, Definition, DescriptorSet, ServiceState, WorkerState

log = logging.getLogger("zrpc.broker")

RESERVED_PREFIX = "zrpc."

# The deadlines are compacted (answered calls dropped) once they hold this many times the calls
# held, plus the floor (so that a handful of calls never triggers it).
_DEADLINES_SLACK = 2
_DEADLINES_FLOOR = 1024

# Wire code -> (StatusCode, its counter): one lookup per answered call.
_CODES = {int(code): (code, f"code_{code.name}") for code in StatusCode}
# During a rollout (§7), how far behind a waiting head call dispatch looks for one a free worker
# can take: bounded, so a long queue of calls for a busy version costs each round little.
_LOOK_AHEAD = 64
# A client whose answers could not be queued has its new calls refused this long (seconds) after.
_NOT_READING_SECONDS = 1.0
# Commands only a worker sends: one of them at the frontend is a worker given the wrong endpoint.
_WORKER_ONLY = frozenset({p.READY, p.HEARTBEAT, p.REPLY, p.REPLY_BATCH})
_UNAVAILABLE = int(StatusCode.UNAVAILABLE)
# Bad-input reasons that are a size limit: answered RESOURCE_EXHAUSTED (§9), not INVALID_ARGUMENT.
_TOO_MUCH = frozenset({"too_large", "too_many_frames", "too_many_calls"})


# Clients told of a drain (notify_draining): those heard from within this many seconds, at most
# this many (about 150 bytes each), forgotten at most this many per tick.
_RECENT_CLIENT_SECONDS = 600.0
_MAX_RECENT_CLIENTS = 100_000
_FORGET_PER_TICK = 1000


# The hint of every answer that a service has no worker (NOT_FOUND, UNAVAILABLE, a deadline).
_START_A_WORKER = "start one with: zrpc worker run MODULE:CLASS"


class BrokerEngine:
    """Registry, queues and dispatch policy of one broker, as a plain object."""

    def __init__(self, config: BrokerConfig, now: float):
        config.validate()
        self.config = config
        self.started_at = now
        self.services: dict[str, ServiceState] = {}
        self.workers: dict[bytes, WorkerState] = {}
        # The FileDescriptorSets live workers sent, each held once: READY bytes -> what they define.
        self._descriptor_sets: dict[bytes, DescriptorSet] = {}
        # client routing id -> {client request id -> call}: for CANCEL and per-client bounds.
        self.clients: dict[bytes, dict[int, Call]] = {}
        # client routing id -> when it last sent something, oldest first: who to tell that we
        # drain (notify_draining). A ROUTER cannot list its peers; these are the ones that matter.
        self.recent_clients: dict[bytes, float] = {}
        # Clients whose answers could not be queued (they do not read them) -> until when their
        # new calls are refused (see client_not_reading).
        self._not_reading: dict[bytes, float] = {}
        self._forget_readers_at = 0.0
        self.calls_held = 0  # queued + dispatched, bounded by max_in_flight
        # Shutting down (Broker.drain): new calls are refused, held ones still answered.
        self.draining = False
        self._dispatch_ids = itertools.count(1)
        self._dispatch_seq = itertools.count(1)
        self._unnamed_seq = itertools.count(1)  # names of workers whose READY gave none (see _unnamed)
        self._index_seq = itertools.count()  # the free indexes' tie-break: workers do not compare
        self._indexes = 0  # services with a free index: with none, nothing need be told of changes
        # Every held call's deadline (answered ones until dropped: see next_timer).
        self._deadlines = Deadlines()
        self.counters: collections.Counter[str] = collections.Counter()
        self.frontend_out: list[tuple[bytes, list[bytes]]] = []
        self.backend_out: list[tuple[bytes, list[bytes]]] = []
        # The REPLY and REQUEST message (frames) each peer gets at the end of the round: calls
        # are coalesced per peer (§4) as they are decided.
        self._replies: dict[bytes, list[bytes]] = {}
        self._requests: dict[bytes, list[bytes]] = {}
        # Clients that read batches get their small answers as REPLY_BATCH (§4c): encoded
        # headers and payloads, packed at flush.
        self._reply_batches: dict[bytes, tuple[list[bytes], list[bytes]]] = {}
        # Workers that read batches get their small calls as one REQUEST_BATCH (§4b): the
        # encoded headers and the payloads, packed at flush.
        self._batches: dict[bytes, tuple[list[bytes], list[bytes]]] = {}
        # Optional observer of answered calls (metrics): fn(service, method, code, call, now);
        # call is None for a call refused on arrival.
        self.on_call_done = None
        # Optional reader of per-service totals for ListServices (CallStats): .service_summary(name, now).
        self.stats = None
        self.bad_input_log = _RateLimitedWarnings(log)
        # CURVE mode: an AccessPolicy (zrpc._security) checked against each message's peer key;
        # None when the broker runs without keys. Replace it with set_policy().
        self.policy = None

    # ------------------------------------------------------------------ frontend (clients)

    def on_frontend(self, client: bytes, frames: Sequence[bytes], now: float, peer_key: str | None = None) -> None:
        """Handle one message from a client; ``peer_key`` is its CURVE key (z85) in secure mode."""
        if self.policy is not None and not self.policy.client_allowed(peer_key):
            return self._refuse_client(client, frames, peer_key)
        if len(frames) > self.config.max_frames:
            # §9: refuse the whole message, but answer each call in it so no caller waits.
            return self._refuse_calls(client, _request_ids_in(frames), "too_many_frames", self._frames_message(frames))
        self._count_bytes_in(frames)
        recent = self.recent_clients
        recent.pop(client, None)  # to the end: the dict stays in order of last message
        recent[client] = now
        try:
            command, body = p.split(frames, p.CLIENT_COMMANDS)
            if command == p.REQUEST or command == p.REQUEST_BATCH:
                if command == p.REQUEST:
                    calls, batched = p.pairs(body), False
                    headers_size = sum(map(len, body[0::2]))
                    if headers_size > p.MAX_REQUEST_HEADER_BYTES:  # §9: refused before any is decoded
                        return self._refuse_calls(client, [p.request_id_of(raw) for raw, _ in calls], "too_large",
                                                  f"the headers of one REQUEST come to {headers_size} bytes "
                                                  f"(limit {p.MAX_REQUEST_HEADER_BYTES})")
                else:  # §4c: a client that sends batches reads them too
                    calls, batched = p.batch_pairs(body), True
                    if len(calls) > self.config.max_frames // 2:  # §9: as a REQUEST over max_frames
                        return self._refuse_calls(client, [p.request_id_of(raw) for raw, _ in calls], "too_many_calls",
                                                  f"batch carries {len(calls)} calls (limit {self.config.max_frames // 2})")
                # §9: the size limit is per call: a client coalesces calls it knows nothing of.
                limit = self.config.max_message_bytes
                for raw_header, payload in calls:
                    if len(raw_header) + len(payload) > limit or len(raw_header) > p.MAX_HEADER_BYTES:
                        self._refuse_large_call(client, raw_header, payload, now)
                    else:
                        self._on_request(client, raw_header, payload, now, peer_key, batched)
            else:  # CANCEL: its ids are cheap to decode, and a client sends all it has at once
                self._on_client_cancel(client, p.decode_cancel(body), now)
        except p.ProtocolError as exc:
            message = exc.message
            if len(frames) > 1 and frames[1] in _WORKER_ONLY:
                message += " (a worker connected to the frontend? workers use the backend, `zrpc broker start --backend`)"
            self._reject_client(client, 0, exc.reason, message)

    def _on_request(self, client: bytes, raw_header: bytes, payload: bytes, now: float,
                    peer_key: str | None = None, batched: bool = False) -> None:
        try:
            header = p.decode_request_header(raw_header)
        except p.ProtocolError as exc:  # §9: under its id when that much reads (a tester's was 0)
            return self._reject_client(client, p.request_id_of(raw_header), exc.reason, exc.message)
        # Each read of a protobuf field costs an attribute lookup and a new object: read once.
        request_id, service_name, method = header.request_id, header.service, header.method
        reads_batches = batched or header.reads_batches
        timeout_ms = header.deadline_ms
        if request_id == 0:
            return self._reject_client(client, 0, "bad_header", "request_id must not be 0")
        if timeout_ms == 0:  # §5: clients always send a deadline
            return self._reject_client(client, request_id, "bad_header", "deadline_ms must be at least 1")
        outstanding = self.clients.get(client)
        if outstanding is not None and request_id in outstanding:
            return self._reject_client(client, request_id, "duplicate_request_id",
                                       f"request id {request_id} is already in flight")
        if self._not_reading and self._not_reading.get(client, 0.0) > now:
            self.counters["refused_not_reading"] += 1
            return self._fail_new(client, request_id, header, StatusCode.RESOURCE_EXHAUSTED,
                                  "the broker cannot queue more answers for this client: it does not read them",
                                  now, reads_batches, p.NOT_RUN)
        self.counters["requests"] += 1
        if self.policy is not None and (refusal := self.policy.call_refusal(peer_key, service_name)):
            self.counters["permission_denied"] += 1
            return self._fail_new(client, request_id, header, StatusCode.PERMISSION_DENIED, refusal, now,
                                  reads_batches)
        if service_name == _builtin.SERVICE:
            code, message, reply, details = _builtin.handle(self, method, payload, now, peer_key)
            self._reply(client, request_id, code, message, reply, reads_batches, details)
            return
        if self.draining:  # it never ran: any call may go again, to another broker (§11)
            self.counters["refused_draining"] += 1
            return self._fail_new(client, request_id, header, StatusCode.UNAVAILABLE,
                                  "broker is shutting down and takes no new calls (this one did not run)", now,
                                  reads_batches, p.DRAINING)
        if outstanding is not None and len(outstanding) >= self.config.max_outstanding_per_client:
            return self._fail_new(client, request_id, header, StatusCode.RESOURCE_EXHAUSTED,
                                  f"client has {len(outstanding)} calls outstanding "
                                  f"(limit {self.config.max_outstanding_per_client})", now, reads_batches, p.NOT_RUN)
        if self.calls_held >= self.config.max_in_flight:
            return self._fail_new(client, request_id, header, StatusCode.RESOURCE_EXHAUSTED,
                                  f"broker holds {self.calls_held} calls (limit {self.config.max_in_flight})", now, reads_batches,
                                  p.NOT_RUN)
        service = self.services.get(service_name)
        if service is None:
            if now - self.started_at >= self.config.unknown_service_grace:
                return self._fail_new(client, request_id, header, StatusCode.NOT_FOUND,
                                      _not_found_message(service_name), now, reads_batches, p.NOT_RUN)
            if (crowded := self._services_to_forget([service_name])) is None:
                return self._fail_new(client, request_id, header, StatusCode.RESOURCE_EXHAUSTED,
                                      f"broker knows {len(self.services)} services (limit {self.config.max_services})", now,
                                      reads_batches, p.NOT_RUN)
            self._forget_services(crowded, now)
            # §10: just after start, wait: workers re-register after a broker restart.
            service = self.services[service_name] = ServiceState(service_name, no_worker_since=now)
        elif service.offered and service.methods and method not in service.methods:
            return self._fail_new(client, request_id, header, StatusCode.UNIMPLEMENTED,
                                  f"service {service_name!r} has no method {method!r}; "
                                  f"it has: {', '.join(sorted(service.methods))}", now, reads_batches, p.NOT_RUN)
        queued = len(service.queue)
        tenant = client if peer_key is None else peer_key  # whose turn it waits for (§12)
        if queued >= self.config.queue_size and (
                len(service.definitions) > 1 or not self._has_free_worker(service)):
            if (pushed := service.queue.push_out(tenant)) is not None:
                # A full queue sheds the client that holds the most of it, not every other one.
                self.counters["queue_full_pushed_out"] += 1
                self.bad_input_log.warn("queue_full_pushed_out", "queue of service %s is full (%d calls): the newest "
                                        "calls of client %s, which holds the most, give way to other clients'",
                                        service_name, self.config.queue_size, _tenant_name(pushed.tenant), burst=1,
                                        key=f"queue_full_pushed_out:{service_name}", service=service_name)
                self._fail(pushed, StatusCode.RESOURCE_EXHAUSTED,
                           f"queue of service {service_name!r} is full ({self.config.queue_size} calls): this call, "
                           f"the newest of its client's (which holds the most of them), gave way to another client's",
                           now, _not_run_if_never_sent(pushed))  # one given back by a worker that died may have run
            else:
                return self._refuse_queue_full(client, request_id, header, service_name, now, reads_batches)
        call = Call(client, request_id, header, service_name, method, payload, timeout_ms,
                    now + timeout_ms / 1000.0, now, reads_batches=reads_batches, tenant=tenant)
        if outstanding is None:
            outstanding = self.clients[client] = {}
        outstanding[request_id] = call
        self.calls_held += 1
        self._deadlines.add(call)
        if not queued and len(service.definitions) <= 1 and (worker := self._best_worker(service)) is not None:
            self._send_to_worker(worker, call, service, now)  # none waits ahead of it: the queue is skipped
        else:
            service.queue.append(call)
            self._dispatch(service, now)

    def _refuse_queue_full(self, client: bytes, request_id: int, header, service_name: str, now: float,
                           reads_batches: bool) -> None:
        self.counters["queue_full"] += 1
        # One line when it fills (per 10 s), not one per call refused (a tester saw five in 1 ms).
        self.bad_input_log.warn("queue_full", "queue of service %s is full (%d calls): refusing calls",
                                service_name, self.config.queue_size, burst=1, key=f"queue_full:{service_name}",
                                service=service_name)
        self._fail_new(client, request_id, header, StatusCode.RESOURCE_EXHAUSTED,
                       f"queue of service {service_name!r} is full ({self.config.queue_size} calls) and no client "
                       f"holds two more of them than this one: it did not run; retry after a pause, or add "
                       f"workers (or raise the broker's queue_size)", now, reads_batches, p.NOT_RUN)

    def client_not_reading(self, client: bytes, now: float) -> None:
        """An answer to ``client`` could not be queued: its queue at the broker is full (it does
        not read). Its new calls are refused for _NOT_READING_SECONDS after the last such answer,
        so that it costs no more work, and no more memory than that queue: an adversarial
        tester's client that never read grew a broker to 3.4 GB in 12 s."""
        if not self._not_reading:
            self._forget_readers_at = now + _NOT_READING_SECONDS
        elif now >= self._forget_readers_at:  # bounded: entries of clients that read again go
            self._not_reading = {c: until for c, until in self._not_reading.items() if until > now}
            self._forget_readers_at = now + _NOT_READING_SECONDS
        if client not in self._not_reading:
            self.bad_input_log.warn("not_reading", "client %s does not read its answers (its queue is full): "
                                    "refusing its new calls", client.hex(), peer=client.hex())
        self._not_reading[client] = now + _NOT_READING_SECONDS

    def client_disconnected(self, client: bytes, now: float) -> None:
        """The client's connection closed (its process died, say: it sent no CANCEL). Its calls
        end: queued ones are never dispatched, dispatched ones are cancelled at their workers,
        and each is answered CANCELLED, which its client reads only if it is in fact still
        there on another connection under the same routing id (libzmq drops a reply to a
        routing id it no longer has, and counts it undeliverable)."""
        outstanding = self.clients.get(client)
        if not outstanding:
            return
        ended = 0
        for call in list(outstanding.values()):
            if call.state is CallState.DONE:
                continue  # answered meanwhile: during a rollout, taking one out dispatches (review)
            queued = call.state is CallState.QUEUED
            self._fail(call, StatusCode.CANCELLED, "the client's connection to the broker closed", now)
            self._withdraw(call, queued, now)
            ended += 1
        self.counters["client_disconnected"] += ended
        # Cancelled by their client, as its CANCEL would have: a closing client's CANCEL may be
        # read after its connection's close, and is then dropped unread.
        self.counters["cancelled"] += ended
        log.info("client %s disconnected: %d call(s) it left were cancelled", client.hex(), ended)

    def _on_client_cancel(self, client: bytes, cancel, now: float) -> None:
        """§8: drop queued calls silently; cancel dispatched ones at their worker. Calls their
        client gave up at their deadlines are counted DEADLINE_EXCEEDED, as it saw them."""
        outstanding = self.clients.get(client)
        if not outstanding:
            return
        code = StatusCode.DEADLINE_EXCEEDED if cancel.deadline else StatusCode.CANCELLED
        for request_id in cancel.request_ids:
            call = outstanding.get(request_id)
            if call is None:
                continue
            self.counters["deadline_exceeded" if cancel.deadline else "cancelled"] += 1
            queued = call.state is CallState.QUEUED
            self._finish(call, code, now)
            self._withdraw(call, queued, now, cancel.deadline)

    def _withdraw(self, call: Call, queued: bool, now: float, deadline: bool = False) -> None:
        """Take a call its client gave up on (just answered) out of where it was: its queue
        (``queued``: its state before the answer), or its worker, which is told CANCEL and
        keeps the slot until it replies (§8); ``deadline``: given up at its deadline."""
        if queued:
            self._answered_in_queue(call, now)
        elif call.worker is not None:
            self._abandon_at_worker(call, deadline)

    # ------------------------------------------------------------------ backend (workers)

    def on_backend(self, identity: bytes, frames: Sequence[bytes], now: float, peer_key: str | None = None) -> None:
        """Handle one message from a worker; ``peer_key`` is its CURVE key (z85) in secure mode."""
        worker = self.workers.get(identity)
        if self.policy is not None and not self.policy.worker_allowed(peer_key):
            return self._refuse_worker(identity, worker, peer_key, now)
        if worker is not None and worker.peer_key != peer_key:  # a connection cannot change keys
            return self._bad_worker_input(identity, worker, "key_mismatch", "message under another key")
        if len(frames) > self.config.max_frames:
            message = self._frames_message(frames)
            self._bad_worker_input(identity, worker, "too_many_frames", message)
            if worker is not None:  # §9: each reply in it whose id can be read ends its call
                return self._end_refused_replies(worker, _request_ids_in(frames, p.REPLY), message, now)
            return
        size = self._count_bytes_in(frames)
        try:
            command, body = p.split(frames, p.WORKER_COMMANDS)
        except p.ProtocolError as exc:
            if worker is None and len(frames) > 1 and frames[1] in (p.REQUEST, p.REQUEST_BATCH, p.CANCEL):
                # A client's command: a client was given the backend (the workers' endpoint).
                return self._bad_worker_input(identity, worker, exc.reason, f"{exc.message} (a client "
                                              f"connected to the backend? clients use the frontend)")
            return self._bad_worker_input(identity, worker, exc.reason, exc.message)
        if size > self.config.max_message_bytes and command != p.REPLY and command != p.REPLY_BATCH:
            return self._bad_worker_input(identity, worker, "too_large", self._bytes_message(size))
        if command == p.READY:
            return self._on_ready(identity, worker, body, now, peer_key)
        if worker is None:
            if command != p.DISCONNECT:  # §11: unknown worker -> DISCONNECT, it re-registers
                self.counters["unknown_worker"] += 1
                self.backend_out.append((identity, p.disconnect_message(p.UNKNOWN_WORKER)))
            return
        worker.last_seen = now
        worker.expires_at = now + self.config.heartbeat_liveness * worker.heartbeat
        if command == p.REPLY_BATCH or command == p.REPLY:
            try:
                if command == p.REPLY_BATCH:
                    replies = p.batch_pairs(body, self.config.max_frames // 2)
                else:
                    replies = p.pairs(body)
            except p.ProtocolError as exc:
                self._bad_worker_input(identity, worker, exc.reason, exc.message)
                # §9: each call of it whose id can be read still ends now, and frees its slot (a
                # tester's callers waited out their deadlines, and the slots stayed taken).
                code = StatusCode.RESOURCE_EXHAUSTED if exc.reason == "too_many_calls" else StatusCode.INTERNAL
                return self._end_refused_replies(worker, _request_ids_in(frames, p.REPLY), exc.message, now, code)
            limit = self.config.max_message_bytes
            for raw_header, payload in replies:
                if len(raw_header) + len(payload) > limit or len(raw_header) > p.MAX_HEADER_BYTES:
                    self._on_large_reply(worker, raw_header, payload, now)
                    continue
                try:
                    header = p.decode_reply_header(raw_header)
                except p.ProtocolError as exc:
                    self._bad_worker_input(identity, worker, exc.reason, exc.message)
                    self._end_unread_replies(worker, [p.request_id_of(raw_header)], exc.message, now,
                                             StatusCode.INTERNAL)
                    continue
                self._on_worker_reply(worker, header, payload, now)
            for name in worker.services:
                self._dispatch(self.services[name], now)
        elif command == p.DISCONNECT:
            notice = p.decode_disconnect_message(body)
            if notice.drain:  # §11: no more work for it; acknowledge so it knows none is coming
                if not worker.draining:
                    log.info("worker %s is draining (%d calls in flight)", worker.name, len(worker.in_flight))
                self._draining(worker, now)
                self._flush_requests_to(identity)  # what this round gave it leaves before the answer
                self.backend_out.append((identity, p.disconnect_message("drain acknowledged", drain=True)))
                return
            log.info("worker %s disconnected: %s", worker.name, notice.reason or "no reason given",
                     extra={"peer": worker.name, "reason": "disconnected"})
            self._remove_worker(worker, now, "disconnected")
        elif body:  # HEARTBEAT: being heard from is all it says, but for a capacity (§7b)
            self._on_capacity(worker, body, now)

    def _on_capacity(self, worker: WorkerState, body, now: float) -> None:
        """§7b: a worker serving several brokers offers us part of its capacity (at most its READY's)."""
        try:
            capacity = p.decode_heartbeat_capacity(body)
        except p.ProtocolError as exc:
            return self._bad_worker_input(worker.identity, worker, exc.reason, exc.message)
        if capacity is None:
            return
        capacity = min(capacity, worker.announced_capacity)
        grew = capacity > worker.capacity
        worker.capacity = capacity
        if self._indexes:
            self._changed(worker)
        if grew:
            for name in worker.services:
                self._dispatch(self.services[name], now)

    def _on_ready(self, identity: bytes, worker: WorkerState | None, body, now: float,
                  peer_key: str | None = None) -> None:
        if worker is not None:  # §7: the first registration stands
            return self._bad_worker_input(identity, worker, "duplicate_ready", "READY sent twice on one connection")
        try:
            ready = p.decode_ready(body)
        except p.ProtocolError as exc:
            return self._bad_worker_input(identity, None, exc.reason, exc.message)
        reserved = [s for s in ready.services if s.startswith(RESERVED_PREFIX)]
        if reserved:
            return self._bad_worker_input(identity, None, "reserved_service",
                                          f"service names starting {RESERVED_PREFIX!r} are reserved: "
                                          f"{', '.join(reserved)}", ready=ready)
        if self.policy is not None:
            forbidden = [name for name in ready.services if not self.policy.may_offer(peer_key, name)]
            if forbidden:
                return self._bad_worker_input(identity, None, "forbidden_service",
                                              f"key {self.policy.name(peer_key)!r} may not offer "
                                              f"{', '.join(forbidden)} (broker access rules)", ready=ready)
        if len(self.workers) >= self.config.max_workers:
            return self._bad_worker_input(identity, None, "too_many_workers",
                                          f"broker has {len(self.workers)} workers (limit {self.config.max_workers})",
                                          ready=ready)
        new_names = [s for s in dict.fromkeys(ready.services) if s not in self.services]  # each once
        # Room is looked for here, and made only once the READY is taken (below): a refused one
        # must not end the waits of names no worker offered (review).
        if (crowded := self._services_to_forget(new_names, ready.services, guessed_too=True)) is None:
            return self._bad_worker_input(identity, None, "too_many_services",
                                          f"broker knows {len(self.services)} services (limit "
                                          f"{self.config.max_services})", ready=ready)
        descriptors = self._descriptor_sets.get(ready.file_descriptor_set)
        if descriptors is None:
            try:
                definitions = service_definitions(ready.file_descriptor_set)
            except Exception as exc:  # noqa: BLE001 - DecodeError, or others on some inputs
                return self._bad_worker_input(identity, None, "bad_descriptors",
                                              f"READY's file_descriptor_set is not a FileDescriptorSet ({exc})",
                                              ready=ready)
            descriptors = DescriptorSet(ready.file_descriptor_set, definitions)
        for name in ready.services:  # §7: a changed field type would be read wrongly: refused
            problem = self._incompatible(self.services.get(name), descriptors)
            if problem is not None:
                return self._bad_worker_input(identity, None, "incompatible_definition",
                                              f"its definition of {name} cannot be read by the live workers': "
                                              f"{problem}; stop them first, or give this version another "
                                              f"service name", ready=ready)
        self._forget_services(crowded, now)
        descriptors = self._descriptor_sets.setdefault(ready.file_descriptor_set, descriptors)
        descriptors.users += 1
        heartbeat = ready.heartbeat_ms / 1000.0
        worker = WorkerState(
            identity=identity, name=ready.name or self._unnamed(), services=tuple(dict.fromkeys(ready.services)),
            capacity=ready.capacity, heartbeat=heartbeat,
            expires_at=now + self.config.heartbeat_liveness * heartbeat,
            # A first HEARTBEAT at the next tick: a worker that connected late in its silence
            # window would otherwise give up on us before our first one and connect again.
            next_heartbeat_at=now, joined_at=now, last_seen=now, peer_key=peer_key,
            batches=ready.batches, announced_capacity=ready.capacity, descriptors=descriptors,
        )
        self.workers[identity] = worker
        for name in worker.services:
            service = self.services.get(name)
            if service is None:
                service = self.services[name] = ServiceState(name)
            service.workers[identity] = worker
            service.no_worker_since = None
            if service.free_index is None and len(service.workers) >= self._INDEX_FROM:
                self._build_index(service)
            elif service.free_index is not None:
                self._index_push(service, self._index_entry(worker))
            self._adopt_definition(service, worker)
        self.counters["workers_joined"] += 1
        # The connection's routing id tells the lines of one worker's connections apart: one
        # stopped and resumed joins on a new connection before its old one expires, and names
        # (host:pid) are not unique anyway (two Worker objects in one process, containers).
        log.info("worker %s joined (connection %s): services=%s capacity=%d heartbeat=%.3fs",
                 worker.name, identity.hex(), ",".join(worker.services), worker.capacity, heartbeat,
                 extra={"peer": worker.name, "service": ",".join(worker.services)})
        for name in worker.services:
            self._dispatch(self.services[name], now)

    @staticmethod
    def _incompatible(service: ServiceState | None, descriptors: DescriptorSet) -> str | None:
        """Why a worker's definition of ``service`` cannot serve next to its live workers', or None."""
        if service is None or not service.workers:
            return None
        key = descriptors.services.get(service.name, NO_DEFINITION)[0]
        if not key or key in service.definitions:
            return None
        for live in service.definitions:  # a new definition: rare, so parsed here, each time
            if live and (problem := incompatibility(key, live)) is not None:
                return problem
        return None

    def _adopt_definition(self, service: ServiceState, worker: WorkerState) -> None:
        """§7: the newest worker's descriptors describe the service; a worker whose definition of
        it (the file that defines it) differs from the other live workers' is worth a warning (a
        rollout under way, or two services that share a name by mistake)."""
        key, methods = worker.descriptors.services.get(service.name, NO_DEFINITION)
        others = len(service.workers) - 1  # the worker is in service.workers already
        if not others:  # the first live worker: what the last one offered is history
            service.definitions = {}
        definition = service.definitions.get(key)
        if definition is None:
            if others:
                added, removed = sorted(methods - service.methods), sorted(service.methods - methods)
                log.warning("worker %s offers %s with another definition than its %d other live worker(s)%s: "
                            "each call goes to a worker that has its method until the rollout ends (or, "
                            "if this is no rollout, give different services different names)",
                            worker.name, service.name, others,
                            f" (methods added: {', '.join(added) or '-'}; gone: {', '.join(removed) or '-'})"
                            if added or removed else " (same methods, other messages)",
                            extra={"peer": worker.name, "service": service.name})
            definition = service.definitions[key] = Definition(methods, worker.descriptors.raw)
            service.methods = _all_methods(service)
        definition.users += 1
        definition.descriptor_set = worker.descriptors.raw
        service.offered = True
        service.file_descriptor_set = _describing(service, key)

    def _forget_definition(self, service: ServiceState, worker: WorkerState, now: float) -> None:
        """``worker`` left ``service``: a definition no live worker has any more goes, the newest
        remaining worker's descriptors describe the service, and calls queued for a method no
        live worker has are answered. With none left, the last stays (calls wait for a worker,
        clients can still describe it). O(1) unless a definition goes."""
        key = worker.descriptors.services.get(service.name, NO_DEFINITION)[0]
        definition = service.definitions[key]
        definition.users -= 1
        if definition.users or not service.workers:
            return
        del service.definitions[key]
        before, service.methods = service.methods, _all_methods(service)
        newest = max(service.workers.values(), key=lambda w: w.joined_at)
        service.file_descriptor_set = _describing(service, newest.descriptors.services.get(service.name, NO_DEFINITION)[0])
        if service.methods and service.methods != before:
            # One pass: a call for a method no live worker has would wait for nothing.
            methods = service.methods
            for call in service.queue.remove_if(lambda call: call.method not in methods):
                self._fail(call, StatusCode.UNIMPLEMENTED, _gone_method_message(service, call.method), now,
                           _not_run_if_never_sent(call))

    def _on_large_reply(self, worker: WorkerState, raw_header: bytes, payload: bytes, now: float) -> None:
        """§9: a reply over the size limits ends its call with RESOURCE_EXHAUSTED (not decoded)."""
        message = self._size_refusal("reply header", "reply", raw_header, payload)
        self._bad_worker_input(worker.identity, worker, "too_large", message)
        header = p.ReplyHeader(request_id=p.request_id_of(raw_header), code=StatusCode.RESOURCE_EXHAUSTED,
                               message=message)
        self._on_worker_reply(worker, header, b"", now)

    def _end_refused_replies(self, worker: WorkerState, dispatch_ids: list[int], message: str, now: float,
                             code: StatusCode = StatusCode.RESOURCE_EXHAUSTED) -> None:
        """§9: a REPLY refused whole still ends each of its calls (``code``: RESOURCE_EXHAUSTED
        for one too large, INTERNAL for one malformed) and frees the worker's slots: its calls
        would otherwise wait for their deadlines."""
        self._end_unread_replies(worker, dispatch_ids, message, now, code)
        for name in worker.services:
            self._dispatch(self.services[name], now)

    def _end_unread_replies(self, worker: WorkerState, dispatch_ids: list[int], message: str, now: float,
                            code: StatusCode) -> None:
        """End the calls of replies the broker could not take, as answered ``code``."""
        for dispatch_id in dispatch_ids:
            if dispatch_id in worker.in_flight:
                header = p.ReplyHeader(request_id=dispatch_id, code=code,
                                       message=f"the worker's reply was refused: {message}")
                self._on_worker_reply(worker, header, b"", now)

    def _services_to_forget(self, new: Sequence[str], keep: Sequence[str] = (),
                            guessed_too: bool = False) -> list[ServiceState] | None:
        """What to forget so that the ``new`` services fit under max_services (nothing when they
        fit as it is), or None when they cannot. Services left with no worker and no call go
        first, longest without one first (none of ``keep``, about to be offered): without this
        the table only grew, and services once offered (versioned names, say) locked new ones
        out for the broker's life (review). Forgotten ones are NOT_FOUND again (§10).

        ``guessed_too`` (a worker's READY): then names no worker ever offered, whose calls wait
        out the start-up grace, may go too, their calls answered NOT_FOUND, as the grace's end
        would: an adversarial tester's calls to 1,100 made-up names, just after a broker
        started, filled its table and kept the real workers out past the grace."""
        over = len(self.services) + len(new) - self.config.max_services
        if over <= 0:
            return []
        idle = sorted((service for service in self.services.values()
                       if not service.workers and not service.queue and not service.dispatched
                       and service.name not in keep),
                      key=lambda service: service.no_worker_since or 0.0)
        guessed = [] if not guessed_too else [service for service in self.services.values()
                                              if not service.offered and service.queue and service.name not in keep]
        if len(idle) + len(guessed) < over:
            return None
        return (idle + guessed)[:over]

    def _forget_services(self, services: Sequence[ServiceState], now: float) -> None:
        """Forget what _services_to_forget chose; calls still waiting for one are NOT_FOUND."""
        if not services:
            return
        for service in services:
            while service.queue:
                self._fail(service.queue.popleft(), StatusCode.NOT_FOUND, _not_found_message(service.name), now,
                           p.NOT_RUN)
            del self.services[service.name]
        log.info("forgot %d service(s) with no worker, to make room (max_services %d): %s",
                 len(services), self.config.max_services, ", ".join(service.name for service in services))

    def _unnamed(self) -> str:
        """A name for a worker whose READY gave none. Not its routing id: libzmq numbers the
        connections it names in sequence, and does not check that a peer's own id (which it may
        choose) is not one it will give a later connection: a peer that knows the sequence can
        take the next id, and libzmq aborts the broker when that connection comes (an
        adversarial tester's did). So routing ids appear in logs, never in what peers read."""
        return f"unnamed-{next(self._unnamed_seq)}"

    def _draining(self, worker: WorkerState, now: float) -> None:
        """``worker`` takes no more calls (§11): for a service it leaves without a live worker,
        unavailable_wait counts from now (§10), as if it had gone."""
        worker.draining = True
        if self._indexes:
            self._changed(worker)
        for name in worker.services:
            self.services[name].note_if_unserved(now)

    def _on_worker_reply(self, worker: WorkerState, header: p.ReplyHeader, payload: bytes, now: float) -> None:
        dispatch_id = header.request_id
        if dispatch_id not in worker.in_flight:
            return self._bad_worker_input(worker.identity, worker, "unknown_dispatch",
                                          f"reply for dispatch id {dispatch_id} this worker was not given")
        call = worker.in_flight.pop(dispatch_id)
        if self._indexes:
            self._changed(worker)
        if call is None:  # answered already (deadline, cancel): the late reply is dropped
            worker.held_by_answered -= 1
            self.counters["late_replies"] += 1
            return
        service = self.services[call.service]
        service.dispatched -= 1
        call.worker = None
        code = header.code
        if code == _UNAVAILABLE and p.refused_draining(header.details):
            self._draining(worker, now)  # it never ran the call: give it to another worker
            call.attempt -= 1
            call.state = CallState.QUEUED
            service.queue.appendleft(call)
            return
        header.request_id = call.client_request_id
        self._finish(call, code, now)
        self._send_reply(call.client, header.SerializeToString(), payload, call.reads_batches)

    # ------------------------------------------------------------------ time

    def tick(self, now: float) -> None:
        """Expire deadlines and workers, send heartbeats, settle waits (§10-§12)."""
        self._expire_deadlines(now)
        self._forget_quiet_clients(now)
        self.bad_input_log.flush()
        if self.draining:  # calls no worker can take would hold the drain until unavailable_wait
            self.refuse_queued(now, unserved_only=True)
        for worker in list(self.workers.values()):
            if now >= worker.expires_at:
                log.warning("worker %s (connection %s) expired: silent for %.3fs", worker.name,
                            worker.identity.hex(), now - worker.last_seen,
                            extra={"peer": worker.name, "reason": "expired"})
                self.counters["workers_expired"] += 1
                self._remove_worker(worker, now, "expired")
            elif now >= worker.next_heartbeat_at:
                self.backend_out.append((worker.identity, p.heartbeat_message()))
                worker.next_heartbeat_at = now + worker.heartbeat
        for service in list(self.services.values()):
            self._settle_waiting(service, now)

    def next_timer(self, now: float) -> float:
        """Seconds until the earliest deadline held; the loop polls no longer than this."""
        deadlines = self._deadlines
        earliest = deadlines.earliest()
        # Once per round: without it, one call held at a worker for 5 s under 16,000 calls/s
        # whose deadlines came later kept every answered call (and its payload) alive behind
        # it: RSS 35 -> 147 MB in 4 s. Compacting at 2x the calls held costs O(1) per call.
        if len(deadlines) > _DEADLINES_SLACK * self.calls_held + _DEADLINES_FLOOR:
            deadlines.compact()
        return max(0.0, earliest - now)

    def _forget_quiet_clients(self, now: float) -> None:
        """Drop clients silent for _RECENT_CLIENT_SECONDS, and the oldest past the cap (bounded work)."""
        recent = self.recent_clients
        cutoff = now - _RECENT_CLIENT_SECONDS
        for _ in range(_FORGET_PER_TICK):
            if not recent:
                return
            oldest = next(iter(recent))
            if recent[oldest] >= cutoff and len(recent) <= _MAX_RECENT_CLIENTS:
                return
            del recent[oldest]

    def notify_draining(self) -> int:
        """(§11) Tell each recent client that we drain: DISCONNECT{drain}. It then sends us
        nothing more, so no call of its can arrive after we stop reading. Returns how many."""
        notice = p.disconnect_message("broker is shutting down: send no more calls here", drain=True)
        for client in self.recent_clients:
            self.frontend_out.append((client, notice))
        return len(self.recent_clients)

    def _expire_deadlines(self, now: float) -> None:
        while (call := self._deadlines.pop_due(now)) is not None:
            if self._expire(call, now):
                self._answered_in_queue(call, now)

    def _answered_in_queue(self, call: Call, now: float) -> None:
        """``call`` was answered (cancelled, expired) where it waited: its queue counts it out,
        and during a rollout the calls it held up behind it may go now."""
        service = self.services[call.service]
        service.queue.discard(call)
        if len(service.definitions) > 1:
            self._dispatch(service, now)

    def _expire(self, call: Call, now: float) -> bool:
        """Answer a call whose deadline passed DEADLINE_EXCEEDED; True if it was queued (§12: it
        is never dispatched then; the caller takes it out of its queue)."""
        self.counters["deadline_exceeded"] += 1
        queued = call.state is CallState.QUEUED
        if not queued:
            self._abandon_at_worker(call, deadline=True)
        # The time left when the call came, not the caller's timeout: the client sends what
        # is left at send, rounded down (spec §5), so `--timeout 1` arrives as 999 ms.
        unserved = self._unserved(call.service, now) if queued else None
        self._fail(call, StatusCode.DEADLINE_EXCEEDED,
                   f"deadline exceeded {'while queued' if queued else 'at the worker'} "
                   f"({call.timeout_ms} ms were left when the broker took the call)"
                   + (f": {unserved}" if unserved else ""), now,
                   {p.UNSERVED_DETAIL: "1"} if unserved else None)
        return queued

    def _unserved(self, name: str, now: float) -> str | None:
        """Why a call of service ``name`` waits, when it is for want of a worker: a caller whose
        deadline is shorter than unavailable_wait is told that, not to wait longer (a tester's
        `zrpc call` saw only DEADLINE_EXCEEDED and "pass a larger --timeout")."""
        service = self.services.get(name)
        if service is None or service.has_live_worker():
            return None
        if not service.offered:
            return f"no worker has offered service {name!r} yet; {_START_A_WORKER}"
        since = service.no_worker_since if service.no_worker_since is not None else now
        return f"service {name!r} has had no live worker for {now - since:.1f}s; {_START_A_WORKER}"

    def _settle_waiting(self, service: ServiceState, now: float) -> None:
        """NOT_FOUND after the start-up grace; UNAVAILABLE after unavailable_wait (§10)."""
        if service.has_live_worker():  # draining ones take no calls (§10)
            return
        if not service.offered:
            if now - self.started_at < self.config.unknown_service_grace:
                return
            while service.queue:
                call = service.queue.popleft()
                self._fail(call, StatusCode.NOT_FOUND, _not_found_message(service.name), now, p.NOT_RUN)
            del self.services[service.name]
            return
        since = service.no_worker_since if service.no_worker_since is not None else now
        wait = self.config.unavailable_wait
        if since + wait > now:
            return
        for call in service.queue.take_enqueued_by(now - wait):
            self._fail(call, StatusCode.UNAVAILABLE,
                       f"no live worker for service {service.name!r} (waited {wait:g}s); {_START_A_WORKER}",
                       now, _not_run_if_never_sent(call))

    # ------------------------------------------------------------------ dispatch

    def _has_free_worker(self, service: ServiceState) -> bool:
        if service.free_index is not None:
            return self._indexed_best(service) is not None
        return any(w.free > 0 for w in service.workers.values())

    # The free-capacity index (ServiceState.free_index): kept for services with this many
    # workers or more, dropped below half of it. Review: a scan of every worker per call cost
    # 10 us a call with 1 worker, 32 with 100, 526 with 1,000 (engine, 5,000 single calls).
    _INDEX_FROM = 16

    def _changed(self, worker: WorkerState) -> None:
        """``worker``'s free capacity or last dispatch changed, or it left or drains: entries of
        it in the free indexes go stale, and a fresh one goes in where it can take a call."""
        worker.version += 1
        free = 0 if worker.identity not in self.workers else worker.free
        if free <= 0:
            return
        entry = None
        for name in worker.services:
            service = self.services[name]
            if service.free_index is None:
                continue
            if entry is None:
                entry = self._index_entry(worker)
            self._index_push(service, entry)

    def _index_entry(self, worker: WorkerState) -> tuple:
        """(-free, last_dispatch_seq, push number, version, worker): §12's order, then a tie-break
        (workers do not compare); valid while the worker's version is that one."""
        return -worker.free, worker.last_dispatch_seq, next(self._index_seq), worker.version, worker

    def _index_push(self, service: ServiceState, entry: tuple) -> None:
        heap = service.free_index
        if len(heap) > 4 * len(service.workers) + 64:  # stale entries: rebuild, O(workers)
            self._build_index(service)  # it holds the fresh entry's worker too
        else:
            heapq.heappush(heap, entry)

    def _build_index(self, service: ServiceState) -> None:
        if service.free_index is None:
            self._indexes += 1
        workers = self.workers
        heap = [self._index_entry(worker) for worker in service.workers.values()
                if worker.free > 0 and worker.identity in workers]
        heapq.heapify(heap)
        service.free_index = heap

    @staticmethod
    def _indexed_best(service: ServiceState) -> WorkerState | None:
        """The worker §12 picks, from the index: its stale entries are dropped on the way."""
        heap = service.free_index
        while heap:
            worker, version = heap[0][4], heap[0][3]
            if worker.version == version:
                return worker
            heapq.heappop(heap)
        return None

    def _dispatch(self, service: ServiceState, now: float) -> None:
        """§12: most free capacity first; ties to the least recently used worker.

        While the live workers offer different definitions (§7, a rollout), each call goes to a
        worker whose definition has its method: a call whose method only busy workers have
        waits, and a free worker takes the first of the calls behind it that it can (looking
        _LOOK_AHEAD deep); one whose method no live worker has is answered UNIMPLEMENTED."""
        queue, name = service.queue, service.name
        by_method = len(service.definitions) > 1
        while (call := queue.head()) is not None:
            if call.deadline <= now:  # §12: never dispatched once its deadline passed (a late round)
                self._expire(call, now)
                queue.discard(call)  # not popleft: its client got nothing, and keeps its turn
                continue
            if not by_method:
                best = self._best_worker(service)
                if best is None:
                    return
                self._send_to_worker(best, queue.popleft(), service, now)
                continue
            method = call.method
            offering = [worker for worker in service.workers.values() if _has_method(worker, name, method)]
            best = _most_free(offering)
            if best is not None:
                self._send_to_worker(best, queue.popleft(), service, now)
            elif not offering:
                self._fail(queue.popleft(), StatusCode.UNIMPLEMENTED, _gone_method_message(service, method), now,
                           _not_run_if_never_sent(call))
            elif not self._dispatch_behind_head(service, now):
                return

    def _best_worker(self, service: ServiceState) -> WorkerState | None:
        """§12 among workers that share one definition: the most free capacity, ties to the
        least recently used; None when every one is busy."""
        if service.free_index is not None:
            return self._indexed_best(service)
        return _most_free(service.workers.values())

    def _dispatch_behind_head(self, service: ServiceState, now: float) -> bool:
        """During a rollout the head call waits for a busy worker of its version: send the first
        call behind it that a free worker can take. True when one went."""
        free = [worker for worker in service.workers.values() if worker.free > 0]
        if not free:
            return False
        queue, name = service.queue, service.name
        for index, call in queue.behind_head(_LOOK_AHEAD):
            if call.deadline <= now:
                continue  # expired by this round's tick, never dispatched
            best = max((worker for worker in free if _has_method(worker, name, call.method)),
                       key=_dispatch_order, default=None)
            if best is not None:
                queue.take(index)
                self._send_to_worker(best, call, service, now)
                return True
        return False

    def _send_to_worker(self, worker: WorkerState, call: Call, service: ServiceState, now: float) -> None:
        dispatch_id = next(self._dispatch_ids)
        call.dispatch_id = dispatch_id
        call.worker = worker
        call.state = CallState.DISPATCHED
        call.dispatched_at = now
        call.attempt += 1
        worker.in_flight[dispatch_id] = call
        worker.last_dispatch_seq = next(self._dispatch_seq)
        if self._indexes:
            self._changed(worker)
        worker.next_heartbeat_at = now + worker.heartbeat
        service.dispatched += 1
        # The client's header, re-addressed to the worker (the client's own values are kept in
        # the call: client_request_id, timeout_ms).
        header = call.header
        header.request_id = dispatch_id
        header.deadline_ms = max(1, int((call.deadline - now) * 1000))
        header.attempt = call.attempt
        raw = header.SerializeToString()
        payload = call.payload
        if worker.batches and len(raw) + len(payload) < p.BATCH_CALL_BYTES:
            _add_to_batch(self._batches, worker.identity, raw, payload)
        else:
            _add_pair(self._requests, worker.identity, p.REQUEST, raw, payload)

    def _abandon_at_worker(self, call: Call, deadline: bool = False) -> None:
        """The call was answered without its worker: keep the slot, tell the worker (§8);
        ``deadline``: at its deadline (the worker answers DEADLINE_EXCEEDED, not CANCELLED)."""
        worker = call.worker
        if worker is None or call.dispatch_id not in worker.in_flight:
            return
        worker.in_flight[call.dispatch_id] = None
        worker.held_by_answered += 1
        self.services[call.service].dispatched -= 1
        call.worker = None
        self._flush_requests_to(worker.identity)  # a call dispatched this round: REQUEST first
        self.backend_out.append((worker.identity, p.cancel_message([call.dispatch_id], deadline)))

    def on_undeliverable(self, messages: Sequence[tuple[bytes, Sequence[bytes]]], now: float) -> None:
        """Messages to workers could not be sent: a worker's connection is gone (EHOSTUNREACH),
        or it has stopped reading (EAGAIN, its queue full). Either way that worker is of no more
        use, and the calls those messages carried never reached it: they go back to the front
        of their queues, idempotent or not, as not dispatched (§11). Its other calls may have
        run: they are handled as for an expired worker. Every message of a round to one worker
        is looked at before it is removed (a large call goes alone, a CANCEL splits a round's
        requests). A message to a peer that is not a registered worker needs nothing.
        """
        undelivered: dict[bytes, set[int]] = {}
        for identity, frames in messages:
            if identity in self.workers:
                undelivered.setdefault(identity, set()).update(_request_ids_in(frames))
        for identity, dispatch_ids in undelivered.items():
            worker = self.workers[identity]
            self.counters["requeued_undelivered"] += sum(
                1 for dispatch_id in dispatch_ids if worker.in_flight.get(dispatch_id) is not None)
            why = "is gone (a message to it could not be sent)"
            logged_why = f"(connection {identity.hex()}) {why}"
            if not any(call is not None for call in worker.in_flight.values()):  # else _remove_worker says it
                log.warning("worker %s %s: removed", worker.name, logged_why, extra={"peer": worker.name, "reason": "gone"})
            self._remove_worker(worker, now, why, never_sent=dispatch_ids, logged_why=logged_why)

    def _remove_worker(self, worker: WorkerState, now: float, why: str,
                       never_sent: Collection[int] = (), logged_why: str = "") -> None:
        """§11: re-queue what may run again, fail the rest at once. ``never_sent``: dispatch ids
        whose message could not be sent (see on_undeliverable): those go back, whatever they are.
        ``why`` goes to the callers that fail; ``logged_why``, when given, to the log instead
        (a routing id may be said there, never to a peer: see _unnamed)."""
        del self.workers[worker.identity]
        self._requests.pop(worker.identity, None)
        self._batches.pop(worker.identity, None)
        requeue: dict[str, list[Call]] = {}
        failed = 0
        for dispatch_id, call in worker.in_flight.items():
            if call is None:
                continue
            service = self.services[call.service]
            service.dispatched -= 1
            call.worker = None
            if dispatch_id in never_sent:
                call.attempt -= 1  # this dispatch never happened
            elif call.header.idempotent and call.attempt < 2 and call.deadline > now:
                self.counters["redispatched"] += 1
            else:
                self._fail(call, StatusCode.UNAVAILABLE,
                           f"worker {worker.name} {why} with the call in flight; it may or may not have run",
                           now)
                failed += 1
                continue
            call.state = CallState.QUEUED
            requeue.setdefault(call.service, []).append(call)
        worker.in_flight.clear()
        worker.held_by_answered = 0
        if failed or requeue:
            # What it cost: a tester's "worker expired" line left the callers' errors unexplained.
            queued = sum(map(len, requeue.values()))
            (log.warning if failed else log.info)(
                "worker %s %s with %d call(s) in flight: %d queued again for another worker, %d failed "
                "UNAVAILABLE (they may have run: not idempotent, sent twice already or past their deadline)",
                worker.name, logged_why or why, queued + failed, queued, failed,
                extra={"peer": worker.name, "reason": "worker_gone"})
        if self._indexes:
            self._changed(worker)  # gone from self.workers already: its entries all go stale
        # Out of every service before any dispatch: a dispatch for one service must not see it in
        # another's workers (review: a free index rebuilt meanwhile held it, and took calls).
        for name in worker.services:
            service = self.services[name]
            service.workers.pop(worker.identity, None)
            if service.free_index is not None and len(service.workers) < self._INDEX_FROM // 2:
                service.free_index = None
                self._indexes -= 1
            service.note_if_unserved(now)
        for name in worker.services:
            service = self.services[name]
            calls = requeue.get(name, [])
            service.queue.extendleft(reversed(calls))  # oldest first, ahead of newer calls
            self._forget_definition(service, worker, now)  # after: it answers calls no one can take
            self._dispatch(service, now)
        descriptors = worker.descriptors
        descriptors.users -= 1
        if not descriptors.users:
            self._descriptor_sets.pop(descriptors.raw, None)

    # ------------------------------------------------------------------ answers

    def _fail_new(self, client: bytes, request_id: int, header, code: StatusCode, message: str, now: float,
                  reads_batches: bool, details: dict[str, str] | None = None) -> None:
        """Answer a call that was never held."""
        self._count_unheld(header, code, now)
        self._reply(client, request_id, code, message, b"", reads_batches, details)

    def _count_unheld(self, header, code: StatusCode, now: float) -> None:
        """Count a call answered without being held, by its method (metrics, zrpc status)."""
        self.counters[f"code_{code.name}"] += 1
        if self.on_call_done is not None:
            self.on_call_done(header.service, header.method, code, None, now)

    def _fail(self, call: Call, code: StatusCode, message: str, now: float,
              details: dict[str, str] | None = None) -> None:
        self._finish(call, code, now)
        self._reply(call.client, call.client_request_id, code, message, b"", call.reads_batches, details)

    def refuse_queued(self, now: float, unserved_only: bool = False) -> int:
        """Draining: answer the calls still queued UNAVAILABLE with zrpc-retry: draining (they
        never ran: their clients may send them to another broker, §11); ``unserved_only``: only
        those of services no live worker offers. Returns how many."""
        refused = 0
        for service in self.services.values():
            if not service.queue or (unserved_only and service.has_live_worker()):
                continue
            while service.queue:
                call = service.queue.popleft()
                self._fail(call, StatusCode.UNAVAILABLE, "broker is shutting down before a worker took the call",
                           now, p.DRAINING)
                refused += 1
        self.counters["refused_draining"] += refused
        return refused

    def _finish(self, call: Call, code: int, now: float) -> None:
        """Forget a held call (exactly once); the caller sends its one answer."""
        call.state = CallState.DONE
        # Its deadline entry may outlive it (Deadlines drops answered calls lazily, up to about
        # 1,024 of them): without what it carried. An adversarial tester's one long call kept
        # the 1,024 answered behind it alive, payloads included: 4.7 GB with 4 MiB calls.
        call.payload = b""
        call.header = None
        outstanding = self.clients.get(call.client)
        if outstanding is not None:
            outstanding.pop(call.client_request_id, None)
            if not outstanding:
                del self.clients[call.client]
        self.calls_held -= 1
        code, counter = _CODES.get(code) or _CODES[StatusCode.UNKNOWN]
        self.counters[counter] += 1
        if self.on_call_done is not None:
            self.on_call_done(call.service, call.method, code, call, now)

    def _reply(self, client: bytes, request_id: int, code: StatusCode, message: str, payload: bytes,
               reads_batches: bool = False, details: dict[str, str] | None = None) -> None:
        self._send_reply(client, p.encode_reply_header(request_id, code, message, details), payload, reads_batches)

    def _send_reply(self, client: bytes, raw_header: bytes, payload: bytes, reads_batches: bool = False) -> None:
        """Queue one answer for the client's REPLY_BATCH of this round when it reads them and the
        answer is small (§4c), else for its REPLY."""
        if reads_batches and len(raw_header) + len(payload) < p.BATCH_CALL_BYTES:
            _add_to_batch(self._reply_batches, client, raw_header, payload)
        else:
            _add_pair(self._replies, client, p.REPLY, raw_header, payload)

    def flush(self) -> None:
        """Move the round's coalesced requests and replies into the outboxes (§4)."""
        if self._requests:
            self.backend_out.extend(self._requests.items())
            self._requests = {}
        if self._batches:
            for identity, batch in self._batches.items():
                self._send_batch(identity, batch)
            self._batches = {}
        if self._replies:
            self.frontend_out.extend(self._replies.items())
            self._replies = {}
        if self._reply_batches:
            for client, (headers, payloads) in self._reply_batches.items():
                for message in p.batch_messages(p.REPLY_BATCH, headers, payloads, p.MAX_CALLS_PER_MESSAGE):
                    self.frontend_out.append((client, message))
            self._reply_batches = {}

    def _flush_requests_to(self, identity: bytes) -> None:
        """Move one worker's coalesced requests into the outbox now (ahead of what follows)."""
        frames = self._requests.pop(identity, None)
        if frames is not None:
            self.backend_out.append((identity, frames))
        batch = self._batches.pop(identity, None)
        if batch is not None:
            self._send_batch(identity, batch)

    def _send_batch(self, identity: bytes, batch: tuple[list[bytes], list[bytes]]) -> None:
        for message in p.batch_messages(p.REQUEST_BATCH, *batch, self.config.max_frames // 2):
            self.backend_out.append((identity, message))

    # ------------------------------------------------------------------ security

    def set_policy(self, policy, now: float) -> None:
        """Adopt a new access policy (a reload): registered workers it no longer admits, or no
        longer lets offer their services, are removed and told DISCONNECT, as if expired (§11).
        Clients are checked per message, so a revoked client's next call is refused."""
        self.policy = policy
        if policy is None:
            return
        for worker in list(self.workers.values()):
            if not policy.worker_allowed(worker.peer_key):
                self._refuse_worker(worker.identity, worker, worker.peer_key, now)
            elif not all(policy.may_offer(worker.peer_key, name) for name in worker.services):
                self.counters["workers_revoked"] += 1
                log.warning("worker %s removed: its key may no longer offer %s", worker.name, ",".join(worker.services))
                self.backend_out.append((worker.identity, p.disconnect_message(
                    "refused: access rules no longer let this key offer its services")))
                self._remove_worker(worker, now, "lost its permission")

    def _refuse_client(self, client: bytes, frames: Sequence[bytes], peer_key: str | None) -> None:
        """A message under a key the frontend no longer admits: UNAUTHENTICATED to each call."""
        self.counters["refused_unauthenticated"] += 1
        self.bad_input_log.warn("unauthenticated", "refused message from client %s: key %s is not allowed",
                                client.hex(), peer_key)
        message = f"key {peer_key} is not allowed by this broker (revoked?)"
        if len(frames) >= 2 and frames[0] == p.TAG and frames[1] == p.CANCEL:
            return  # a CANCEL needs no answer
        for request_id in _request_ids_in(frames) or [0]:
            self._reply(client, request_id, StatusCode.UNAUTHENTICATED, message, b"")

    def _refuse_worker(self, identity: bytes, worker: WorkerState | None, peer_key: str | None, now: float) -> None:
        """A message under a key the backend no longer admits: expire it and say DISCONNECT."""
        self.counters["refused_unauthenticated"] += 1
        self.bad_input_log.warn("unauthenticated", "refused message from worker %s: key %s is not allowed",
                                worker.name if worker is not None else identity.hex(), peer_key)
        self.backend_out.append((identity, p.disconnect_message(f"refused: key {peer_key} is not allowed")))
        if worker is not None:
            self.counters["workers_revoked"] += 1
            self._remove_worker(worker, now, "was revoked")

    # ------------------------------------------------------------------ bad input

    def _count_bytes_in(self, frames: Sequence[bytes]) -> int:
        size = sum(map(len, frames))
        self.counters["bytes_in"] += size  # the metrics' bytes in
        return size

    def _frames_message(self, frames: Sequence[bytes]) -> str:
        return f"message has {len(frames)} frames (limit {self.config.max_frames})"

    def _bytes_message(self, size: int) -> str:
        return f"message is {size} bytes (limit {self.config.max_message_bytes})"

    def _refuse_large_call(self, client: bytes, raw_header: bytes, payload: bytes, now: float) -> None:
        """§9: a call over the size limits is answered alone, under its id when readable; and
        counted by its method when its header is within limits (a tester found calls refused
        so missing from requests_total, and from `zrpc status`)."""
        message = self._size_refusal("request header", "call", raw_header, payload)
        self._reject_client(client, p.request_id_of(raw_header), "too_large", message)
        if len(raw_header) <= p.MAX_HEADER_BYTES:
            try:
                header = p.decode_request_header(raw_header)
            except p.ProtocolError:
                return
            self._count_unheld(header, StatusCode.RESOURCE_EXHAUSTED, now)

    def _size_refusal(self, header_name: str, whole_name: str, raw_header: bytes, payload: bytes) -> str:
        """Which size limit (§9) a call or reply breaks: its header's, or its own."""
        if len(raw_header) > p.MAX_HEADER_BYTES:
            return f"{header_name} is {len(raw_header)} bytes (limit {p.MAX_HEADER_BYTES})"
        return (f"{whole_name} is {len(raw_header) + len(payload)} bytes (limit {self.config.max_message_bytes}: "
                f"the broker's max_message_bytes)")

    def _reject_client(self, client: bytes, request_id: int, reason: str, message: str) -> None:
        """§9: count, log (rate-limited) and answer a client's bad message."""
        self.counters[f"malformed_{reason}"] += 1
        self.bad_input_log.warn(reason, "bad message from client %s: %s", client.hex(), message, peer=client.hex())
        code = StatusCode.RESOURCE_EXHAUSTED if reason in _TOO_MUCH else StatusCode.INVALID_ARGUMENT
        self._reply(client, request_id, code, message, b"")

    def _refuse_calls(self, client: bytes, request_ids: list[int], reason: str, message: str) -> None:
        """§9: a client message refused whole: counted once, each call in it whose id can be read
        answered, so no caller waits for its deadline."""
        request_ids = [request_id for request_id in request_ids if request_id] or [0]
        self._reject_client(client, request_ids[0], reason, message)
        for request_id in request_ids[1:]:
            self._reply(client, request_id, StatusCode.RESOURCE_EXHAUSTED, message, b"")

    def _bad_worker_input(self, identity: bytes, worker: WorkerState | None, reason: str, message: str,
                          ready: p.Ready | None = None) -> None:
        """§9: count and log; an unregistered sender is told why with DISCONNECT. A READY refused
        is said as such, under the name it gave (a tester read "bad message from worker
        00f4b0dc53" for a worker refused at max_services)."""
        self.counters[f"malformed_{reason}"] += 1
        name = worker.name if worker is not None else identity.hex()
        if ready is not None:  # its name and services are the peer's words: quoted, and bounded
            name = f"{ready.name[:128]!r} (connection {identity.hex()})"
            offered = ", ".join(repr(s[:128]) for s in ready.services[:5])
            more = f" and {len(ready.services) - 5} more" if len(ready.services) > 5 else ""
            self.bad_input_log.warn(reason, "refused worker %s offering %s%s: %s", name, offered, more,
                                    message[:1024], peer=name)
        else:
            self.bad_input_log.warn(reason, "bad message from worker %s: %s", name, message, peer=name)
        if worker is None:
            self.backend_out.append((identity, p.disconnect_message(f"refused: {message}")))

    # ------------------------------------------------------------------ views

    def queue_depth(self) -> int:
        return sum(len(s.queue) for s in self.services.values())


def _add_to_batch(batches: dict, peer: bytes, raw_header: bytes, payload: bytes) -> None:
    """Add a call to the headers and payloads ``peer`` gets packed at flush (§4b, §4c)."""
    batch = batches.get(peer)
    if batch is None:
        batch = batches[peer] = ([], [])
    batch[0].append(raw_header)
    batch[1].append(payload)


def _add_pair(messages: dict, peer: bytes, command: bytes, raw_header: bytes, payload: bytes) -> None:
    """Add a call to the REQUEST or REPLY (``command``) ``peer`` gets at flush (§4)."""
    frames = messages.get(peer)
    if frames is None:
        frames = messages[peer] = [p.TAG, command]
    frames.append(raw_header)
    frames.append(payload)


def _request_ids_in(frames: Sequence[bytes], command: bytes = p.REQUEST) -> list[int]:
    """The ids of a REQUEST (or REPLY), or of its batch, refused whole, so each call can be
    ended (§9); none when they cannot be read."""
    if len(frames) < 3 or frames[0] != p.TAG:
        return []
    if frames[1] == command:
        raw_headers = frames[2::2]
    elif frames[1] == _BATCH_OF[command]:
        raw_headers = p.readable_batch_headers(frames[2:])
    else:
        return []
    return [request_id for raw in raw_headers if (request_id := p.request_id_of(raw))]


_BATCH_OF = {p.REQUEST: p.REQUEST_BATCH, p.REPLY: p.REPLY_BATCH}


def _describing(service: ServiceState, newest: bytes) -> bytes:
    """The descriptors that describe ``service`` (§13): the newest worker's definition (key
    ``newest``), unless it lacks methods another live one has: then one that has them all, so
    that a client that describes the service can call every method the broker accepts."""
    newest_definition = service.definitions[newest]
    if newest_definition.methods >= service.methods:
        return newest_definition.descriptor_set
    for definition in service.definitions.values():
        if definition.methods >= service.methods:
            return definition.descriptor_set
    return newest_definition.descriptor_set


def _tenant_name(tenant: bytes | str) -> str:
    """A CURVE key as it is written (z85), a connection's routing id in hex (logs only)."""
    return tenant if isinstance(tenant, str) else tenant.hex()


def _not_run_if_never_sent(call: Call) -> dict[str, str] | None:
    """`zrpc-retry: not-run` (§10) for a queued call no worker ever had; none for one requeued
    after its worker died (review: it may have run there)."""
    return p.NOT_RUN if call.attempt == 0 else None


def _most_free(workers) -> WorkerState | None:
    """§12: the worker with the most free capacity, ties to the least recently used; None when
    none is free. (_dispatch_order, written out: this runs for every call dispatched.)"""
    best = None
    for worker in workers:
        free = worker.free
        if free > 0 and (best is None or free > best.free or
                         (free == best.free and worker.last_dispatch_seq < best.last_dispatch_seq)):
            best = worker
    return best


def _dispatch_order(worker: WorkerState) -> tuple[int, int]:
    """§12 as a key: most free capacity first; ties to the least recently used worker."""
    return worker.free, -worker.last_dispatch_seq


def _has_method(worker: WorkerState, service: str, method: str) -> bool:
    """Does the worker's definition of ``service`` have ``method``? (No descriptors: taken to.)"""
    methods = worker.descriptors.services.get(service, NO_DEFINITION)[1]
    return not methods or method in methods


def _all_methods(service: ServiceState) -> frozenset[str]:
    """The methods any of the service's definitions has: what the broker accepts (§7)."""
    return frozenset().union(*(definition.methods for definition in service.definitions.values()))


def _gone_method_message(service: ServiceState, method: str) -> str:
    return (f"service {service.name!r} has no method {method!r} any more (its live workers have: "
            f"{', '.join(sorted(service.methods))})")


def _not_found_message(service: str) -> str:
    return f"no worker offers service {service!r}; {_START_A_WORKER} --broker <backend endpoint>"


class _RateLimitedWarnings:
    """At most ``burst`` warnings per reason per ``window`` seconds; the rest are counted."""

    def __init__(self, logger: logging.Logger, burst: int = 5, window: float = 10.0, clock=None):
        import time

        self._log = logger
        self._burst = burst
        self._window = window
        self._clock = clock or time.monotonic
        self._state: dict[str, list] = {}  # key -> [window start, emitted, suppressed, reason]
        self._next_flush = 0.0

    def warn(self, reason: str, fmt: str, *args, burst: int | None = None, key: str | None = None,
             **fields) -> None:
        """Log ``fmt % args`` with ``reason`` and ``fields`` (peer, service) as structured fields;
        ``burst``: this reason's own limit per window, counted per ``key`` (the reason by default)."""
        now = self._clock()
        key = reason if key is None else key
        state = self._state.get(key)
        if state is None or now - state[0] >= self._window:
            if state is not None:
                self._report(state)
            state = self._state[key] = [now, 0, 0, reason]
        if state[1] < (self._burst if burst is None else burst):
            state[1] += 1
            self._log.warning(fmt, *args, extra={"reason": reason, **fields})
        else:
            state[2] += 1

    def flush(self) -> None:
        """Report the windows that have ended (from the engine's tick, looking once a second): a
        count left for the next warning of its kind came late, with the wrong window, or never
        (a tester's 57,710 suppressed too_large warnings)."""
        now = self._clock()
        if now < self._next_flush or not self._state:
            return
        self._next_flush = now + 1.0
        ended = [key for key, state in self._state.items() if now - state[0] >= self._window]
        for key in ended:
            self._report(self._state.pop(key))

    def _report(self, state: list) -> None:
        if state[2]:
            self._log.warning("%d more %s messages suppressed in the last %.0fs", state[2], state[3], self._window,
                              extra={"reason": state[3], "suppressed": state[2]})
