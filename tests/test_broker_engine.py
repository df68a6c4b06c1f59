"""The broker's rules, driven directly: no sockets, a fake clock (the engine takes ``now``)."""
from __future__ import annotations

import logging

import pytest
from google.protobuf import descriptor_pb2

from zrpc import _protocol as p
from zrpc import broker_service_pb2 as bpb
from zrpc._broker import BrokerConfig, BrokerEngine
from zrpc._broker._state import CallState
from zrpc._status import StatusCode

SERVICE = "zrpc.Broker"
# A descriptor set declaring service svc.S with one method M, as a worker would send it.
SVC_FDS = descriptor_pb2.FileDescriptorSet(file=[descriptor_pb2.FileDescriptorProto(
    name="svc.proto", package="svc",
    message_type=[descriptor_pb2.DescriptorProto(name="Req")],
    service=[descriptor_pb2.ServiceDescriptorProto(name="S", method=[
        descriptor_pb2.MethodDescriptorProto(name="M", input_type=".svc.Req", output_type=".svc.Req")])],
)]).SerializeToString()


def _svc_fds(*methods: str, fields=()) -> bytes:
    """Service svc.S with these methods (and Req with these FieldDescriptorProtos): another
    version of the one in SVC_FDS."""
    return descriptor_pb2.FileDescriptorSet(file=[descriptor_pb2.FileDescriptorProto(
        name="svc.proto", package="svc",
        message_type=[descriptor_pb2.DescriptorProto(name="Req", field=list(fields))],
        service=[descriptor_pb2.ServiceDescriptorProto(name="S", method=[
            descriptor_pb2.MethodDescriptorProto(name=m, input_type=".svc.Req", output_type=".svc.Req")
            for m in methods])],
    )]).SerializeToString()


class Harness:
    """An engine plus helpers that speak the wire format and read its outboxes."""

    def __init__(self, **config):
        config.setdefault("unknown_service_grace", 0.0)
        config.setdefault("unavailable_wait", 5.0)
        self.now = 1000.0
        self.engine = BrokerEngine(BrokerConfig(**config), self.now)
        self._ids = 0

    # -- time
    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.engine.tick(self.now)
        self.engine.flush()

    # -- workers
    def ready(self, worker: bytes, services=("svc.S",), capacity=1, heartbeat_ms=1000, name=None,
              batches=False, fds=b"") -> None:
        msg = p.Ready(services=list(services), capacity=capacity, heartbeat_ms=heartbeat_ms,
                      name=name or worker.decode(), batches=batches, file_descriptor_set=fds)
        self.backend(worker, p.ready_message(msg))

    def backend(self, worker: bytes, frames) -> None:
        self.engine.on_backend(worker, frames, self.now)
        self.engine.flush()

    def reply_from(self, worker: bytes, dispatch_id: int, payload=b"ok", code=0, details=None) -> None:
        header = p.encode_reply_header(dispatch_id, code, "", details)
        self.backend(worker, p.reply_message([(header, payload)]))

    # -- clients
    def call(self, client: bytes, service="svc.S", method="M", deadline_ms=10_000, idempotent=False,
             payload=b"req", request_id=None, reads_batches=False, peer_key=None) -> int:
        if request_id is None:
            self._ids += 1
            request_id = self._ids
        header = p.RequestHeader(request_id=request_id, service=service, method=method,
                                 deadline_ms=deadline_ms, idempotent=idempotent,
                                 reads_batches=reads_batches).SerializeToString()
        self.engine.on_frontend(client, p.request_message([(header, payload)]), self.now, peer_key)
        self.engine.flush()
        return request_id

    def call_batch(self, client: bytes, payloads, service="svc.S", method="M", deadline_ms=10_000) -> list[int]:
        """Calls sent as one REQUEST_BATCH (spec §4c); their request ids."""
        ids = list(range(self._ids + 1, self._ids + 1 + len(payloads)))
        self._ids += len(payloads)
        headers = [p.RequestHeader(request_id=i, service=service, method=method,
                                   deadline_ms=deadline_ms).SerializeToString() for i in ids]
        self.engine.on_frontend(client, p.batch_message(p.REQUEST_BATCH, headers, list(payloads)), self.now)
        self.engine.flush()
        return ids

    # -- outboxes
    def take_requests(self) -> list[tuple[bytes, p.RequestHeader, bytes]]:
        """Requests sent to workers since last asked: (worker, header, payload), in order."""
        found, keep = [], []
        for identity, frames in self.engine.backend_out:
            if frames[1] == p.REQUEST:
                for raw, payload in p.pairs(frames[2:]):
                    found.append((identity, p.RequestHeader.FromString(raw), payload))
            elif frames[1] == p.REQUEST_BATCH:
                for raw, payload in p.batch_pairs(frames[2:]):
                    found.append((identity, p.RequestHeader.FromString(raw), payload))
            else:
                keep.append((identity, frames))
        self.engine.backend_out = keep
        return found

    def take_control(self, command: bytes) -> list[tuple[bytes, list[bytes]]]:
        found = [(i, f) for i, f in self.engine.backend_out if f[1] == command]
        self.engine.backend_out = [(i, f) for i, f in self.engine.backend_out if f[1] != command]
        return found

    def take_replies(self, commands: list | None = None) -> list[tuple[bytes, p.ReplyHeader, bytes]]:
        """Answers sent to clients since last asked: (client, header, payload), in order; the
        command of each message carrying them is appended to ``commands`` when given."""
        found = []
        for identity, frames in self.engine.frontend_out:
            assert frames[0] == p.TAG and frames[1] in (p.REPLY, p.REPLY_BATCH)
            if commands is not None:
                commands.append(frames[1])
            split = p.pairs if frames[1] == p.REPLY else p.batch_pairs
            for raw, payload in split(frames[2:]):
                found.append((identity, p.ReplyHeader.FromString(raw), payload))
        self.engine.frontend_out = []
        return found

    def assert_baseline(self) -> None:
        engine = self.engine
        assert engine.clients == {}
        assert engine.calls_held == 0
        assert engine.queue_depth() == 0
        assert all(s.dispatched == 0 for s in engine.services.values())
        # The count ListServices reads is the table's (a worker's slots held by answered calls).
        for worker in engine.workers.values():
            assert worker.held_by_answered == sum(1 for call in worker.in_flight.values() if call is None)


def test_request_goes_to_worker_and_reply_back_to_caller_under_its_own_id():
    h = Harness()
    h.ready(b"w1")
    rid = h.call(b"c1", payload=b"hello", request_id=42)
    [(worker, header, payload)] = h.take_requests()
    assert (worker, header.service, header.method, payload) == (b"w1", "svc.S", "M", b"hello")
    assert header.request_id != rid and header.attempt == 1
    assert 9_000 < header.deadline_ms <= 10_000
    h.reply_from(b"w1", header.request_id, payload=b"world")
    [(client, reply, payload)] = h.take_replies()
    assert (client, reply.request_id, reply.code, payload) == (b"c1", rid, StatusCode.OK, b"world")
    h.assert_baseline()


def test_dispatch_prefers_most_free_capacity_and_rotates_ties():
    h = Harness()
    h.ready(b"small", capacity=1)
    h.ready(b"big", capacity=3)
    for _ in range(4):
        h.call(b"c")
    targets = [w for w, _, _ in h.take_requests()]
    # big has 3 free, then 2 (still more than small's 1), then a tie: small was used less recently
    assert targets == [b"big", b"big", b"small", b"big"]


def test_ties_rotate_across_equally_free_workers():
    h = Harness()
    for name in (b"a", b"b", b"c"):
        h.ready(name, capacity=10)
    order = []
    for _ in range(6):
        h.call(b"c")
        [(worker, header, _)] = h.take_requests()
        order.append(worker)
        h.reply_from(worker, header.request_id)
    assert order == [b"a", b"b", b"c", b"a", b"b", b"c"]


def test_calls_queue_when_workers_are_full_and_dispatch_as_slots_free():
    h = Harness()
    h.ready(b"w", capacity=2)
    ids = [h.call(b"c") for _ in range(5)]
    sent = h.take_requests()
    assert len(sent) == 2 and h.engine.queue_depth() == 3
    h.reply_from(b"w", sent[0][1].request_id)
    [nxt] = h.take_requests()
    assert nxt[2] == b"req"
    assert [r.request_id for _, r, _ in h.take_replies()] == [ids[0]]


def test_a_heartbeat_offering_capacity_bounds_what_a_worker_is_sent():
    # §7b: a worker serving several brokers says what this one may hold there now.
    h = Harness()
    h.ready(b"w", capacity=4)
    h.backend(b"w", p.capacity_message(1))  # the other brokers hold 3 of its 4 slots
    for _ in range(3):
        h.call(b"c")
    assert len(h.take_requests()) == 1 and h.engine.queue_depth() == 2
    h.backend(b"w", p.capacity_message(2))  # one freed elsewhere: one more comes at once
    assert len(h.take_requests()) == 1 and h.engine.queue_depth() == 1
    h.backend(b"w", p.capacity_message(0))  # less than it holds: nothing more, nothing taken back
    assert h.take_requests() == [] and len(h.engine.workers[b"w"].in_flight) == 2
    h.backend(b"w", p.capacity_message(1000))  # never more than its READY announced
    assert h.engine.workers[b"w"].capacity == 4
    assert len(h.take_requests()) == 1 and h.engine.queue_depth() == 0
    h.backend(b"w", p.heartbeat_message())  # a plain heartbeat changes nothing
    assert h.engine.workers[b"w"].capacity == 4


def test_a_heartbeat_with_a_bad_capacity_is_counted_and_changes_nothing():
    h = Harness()
    h.ready(b"w", capacity=3)
    h.backend(b"w", [p.TAG, p.HEARTBEAT, b"\xff\xff"])
    h.backend(b"w", [p.TAG, p.HEARTBEAT, p.Heartbeat(capacity=1).SerializeToString(), b"extra"])
    assert h.engine.counters["malformed_bad_header"] == 1
    assert h.engine.counters["malformed_bad_frame_count"] == 1
    assert h.engine.workers[b"w"].capacity == 3  # still registered, at its READY's capacity


def test_a_service_definition_follows_its_live_workers(caplog):
    # The tester's rolling upgrade: v1 stopped, v2 (one more method) started on the same broker.
    h = Harness()
    v1, v2 = _svc_fds("M"), _svc_fds("M", "N")
    h.ready(b"old", fds=v1)
    h.backend(b"old", p.disconnect_message("stopping"))
    h.ready(b"new", fds=v2)
    service = h.engine.services["svc.S"]
    assert service.methods == {"M", "N"} and service.file_descriptor_set == v2
    h.call(b"c", method="N")
    [(worker, header, _)] = h.take_requests()
    assert worker == b"new" and header.method == "N"
    # Back to v1 alone (a rollback): N is refused by the broker again.
    h.backend(b"new", p.disconnect_message("stopping"))
    h.take_replies()  # the N call it held: UNAVAILABLE, it may have run
    h.ready(b"back", fds=v1)
    assert service.methods == {"M"} and service.file_descriptor_set == v1
    h.call(b"c", method="N")
    [(_, refused, _)] = h.take_replies()
    assert refused.code == StatusCode.UNIMPLEMENTED and "has no method 'N'" in refused.message
    assert "another definition" not in caplog.text  # one version live at a time: no warning


def test_while_workers_differ_each_call_goes_to_one_that_has_its_method(caplog):
    h = Harness()
    h.ready(b"v1", fds=_svc_fds("M"), capacity=5)
    h.ready(b"v2", fds=_svc_fds("M", "N"), capacity=1)
    assert "offers svc.S with another definition than its 1 other live worker(s) (methods added: N; gone: -)" in caplog.text
    # N only at v2 (though v1 has more room); M by free capacity, as always.
    h.call(b"c", method="N")
    assert [(w, r.method) for w, r, _ in h.take_requests()] == [(b"v2", "N")]
    h.call(b"c", method="N")  # v2 is full: it waits; an M behind it goes to v1
    h.call(b"c", method="M")
    assert [(w, r.method) for w, r, _ in h.take_requests()] == [(b"v1", "M")]
    # v2 leaves with an N call queued: no live worker has N now, so it fails.
    h.backend(b"v2", p.disconnect_message("stopping"))
    replies = {r.request_id: r for _, r, _ in h.take_replies()}
    assert any(r.code == StatusCode.UNIMPLEMENTED and "no method 'N' any more" in r.message for r in replies.values())
    assert h.engine.queue_depth() == 0 and h.engine.services["svc.S"].methods == {"M"}


def test_during_a_rollout_the_service_is_described_with_every_method_the_broker_accepts():
    # The second tester: a v1 worker registering last (a broker restart, one more v1) made the
    # description v1's, and `zrpc call` (which reads it) refused v2's Put that the broker took.
    h = Harness()
    v1, v2 = _svc_fds("M"), _svc_fds("M", "N")
    h.ready(b"new", fds=v2)
    h.ready(b"old", fds=v1)
    service = h.engine.services["svc.S"]
    assert service.methods == {"M", "N"} and service.file_descriptor_set == v2
    h.ready(b"old2", fds=v1)
    h.backend(b"new", p.disconnect_message("stopping"))  # v2 gone: v1 describes it again
    assert service.methods == {"M"} and service.file_descriptor_set == v1


def test_during_a_rollout_a_free_worker_takes_a_call_from_behind_a_waiting_one():
    # The second tester: a quick Get waited 1 s behind a Put that only a busy v2 could take,
    # while a v1 worker sat free.
    h = Harness()
    h.ready(b"v1", fds=_svc_fds("M"))
    h.ready(b"v2", fds=_svc_fds("M", "N"))
    h.call(b"c", method="N")
    assert [w for w, _, _ in h.take_requests()] == [b"v2"]  # v2 is full now
    h.call(b"c", method="N")  # waits for v2
    h.call(b"c", method="M")  # v1 takes it from behind the waiting N
    assert [(w, r.method) for w, r, _ in h.take_requests()] == [(b"v1", "M")]
    assert [c.method for c in h.engine.services["svc.S"].queue] == ["N"]


def test_a_rollout_never_holds_the_queue_for_a_method_no_live_worker_has(caplog):
    # In review: v2 died holding an idempotent N call; requeued at the head, no live worker had
    # N, and the M calls behind it waited by two idle workers.
    h = Harness()
    h.ready(b"a", fds=_svc_fds("M"))
    h.ready(b"b", fds=_svc_fds("M", "O"))
    h.ready(b"v2", fds=_svc_fds("M", "N"))
    n_call = h.call(b"c", method="N", idempotent=True)
    assert [w for w, _, _ in h.take_requests()] == [b"v2"]
    h.backend(b"v2", p.disconnect_message("crash"))
    [(_, refused, _)] = h.take_replies()
    assert refused.request_id == n_call and refused.code == StatusCode.UNIMPLEMENTED
    assert "no method 'N' any more" in refused.message
    h.call(b"c", method="M")
    h.call(b"c", method="M")
    assert sorted(w for w, _, _ in h.take_requests()) == [b"a", b"b"]


def test_during_a_rollout_the_queue_is_bounded_though_workers_are_free():
    h = Harness(queue_size=2)
    h.ready(b"a", fds=_svc_fds("M"))
    h.ready(b"v2", fds=_svc_fds("M", "N"))
    h.call(b"c", method="N")
    h.take_requests()
    for _ in range(3):  # N only at v2, which is full: they queue, and the M behind them too
        h.call(b"c", method="N")
    codes = [r.code for _, r, _ in h.take_replies()]
    assert codes == [StatusCode.RESOURCE_EXHAUSTED] and h.engine.queue_depth() == 2


def test_workers_serving_other_services_too_define_a_service_alike(caplog):
    # In review: a worker of Echo and one of Echo and Greeter sent different descriptor sets,
    # and Echo got two "definitions" (a warning per join, method-aware dispatch for good).
    other = descriptor_pb2.FileDescriptorProto(name="other.proto", package="other",
                                               service=[descriptor_pb2.ServiceDescriptorProto(name="T")])
    both = descriptor_pb2.FileDescriptorSet.FromString(SVC_FDS)
    both.file.append(other)
    h = Harness()
    h.ready(b"one", fds=SVC_FDS)
    h.ready(b"two", services=("svc.S", "other.T"), fds=both.SerializeToString())
    assert len(h.engine.services["svc.S"].definitions) == 1
    assert "another definition" not in caplog.text


def test_a_ready_whose_descriptors_do_not_decode_is_refused():
    h = Harness()
    h.ready(b"w", fds=b"\xff\xff\xff")
    [(peer, frames)] = h.take_control(p.DISCONNECT)
    assert peer == b"w" and "not a FileDescriptorSet" in p.decode_disconnect(frames[2:])
    assert not h.engine.workers and h.engine.counters["malformed_bad_descriptors"] == 1


def test_a_worker_whose_messages_cannot_be_read_by_the_live_workers_is_refused():
    # The second tester: v3 changed Item.count from int32 to string and was served next to v1
    # and v2; calls returned wrong data with exit 0.
    def count(type_):
        return descriptor_pb2.FieldDescriptorProto(name="count", number=1, type=type_,
                                                   label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)

    T = descriptor_pb2.FieldDescriptorProto
    h = Harness()
    h.ready(b"v1", fds=_svc_fds("M", fields=[count(T.TYPE_INT32)]))
    h.ready(b"v2", fds=_svc_fds("M", "N", fields=[count(T.TYPE_INT64)]))  # int32 -> int64 reads alike
    h.ready(b"v3", fds=_svc_fds("M", fields=[count(T.TYPE_STRING)]))
    [(peer, frames)] = h.take_control(p.DISCONNECT)
    assert peer == b"v3" and p.decode_disconnect(frames[2:]) == (
        "refused: its definition of svc.S cannot be read by the live workers': field 1 of svc.Req is "
        "string count, where the live workers' is int32 count; stop them first, or give this version "
        "another service name")
    assert sorted(h.engine.workers) == [b"v1", b"v2"]
    # Once the older versions are gone, the new one registers.
    h.backend(b"v1", p.disconnect_message("stopping"))
    h.backend(b"v2", p.disconnect_message("stopping"))
    h.ready(b"v3", fds=_svc_fds("M", fields=[count(T.TYPE_STRING)]))
    assert list(h.engine.workers) == [b"v3"]


def test_a_deadline_passed_waiting_for_a_worker_says_the_service_has_none():
    """A caller whose deadline comes before unavailable_wait learns why its call waited (a
    tester's `zrpc call` said only "pass a larger --timeout")."""
    h = Harness(unknown_service_grace=10.0)
    h.ready(b"w", capacity=1)
    h.backend(b"w", p.disconnect_message("stopping"))
    h.advance(1.0)
    gone = h.call(b"c", deadline_ms=500)
    never = h.call(b"c", service="new.S", deadline_ms=500)  # in the start-up grace: may yet come
    h.advance(0.6)
    replies = {reply.request_id: reply for _, reply, _ in h.take_replies()}
    assert replies[gone].code == StatusCode.DEADLINE_EXCEEDED
    assert replies[gone].message == ("deadline exceeded while queued (500 ms were left when the broker took the "
                                     "call): service 'svc.S' has had no live worker for 1.6s; start one with: "
                                     "zrpc worker run MODULE:CLASS")
    assert replies[never].message.endswith("): no worker has offered service 'new.S' yet; start one with: "
                                           "zrpc worker run MODULE:CLASS")
    assert all(reply.details[p.UNSERVED_DETAIL] == "1" for reply in replies.values())
    # A call that waited behind busy workers says nothing of the kind.
    h.ready(b"w2", capacity=1)
    h.call(b"c", deadline_ms=10_000)
    busy = h.call(b"c", deadline_ms=500)
    h.advance(0.6)
    [(_, reply, _)] = h.take_replies()
    assert reply.request_id == busy and reply.message.endswith("took the call)")
    assert p.UNSERVED_DETAIL not in reply.details


def test_full_queue_answers_resource_exhausted_at_once():
    h = Harness(queue_size=2)
    h.ready(b"w", capacity=1)
    ids = [h.call(b"c") for _ in range(4)]  # 1 dispatched, 2 queued, 1 refused
    [(_, reply, _)] = h.take_replies()
    assert reply.request_id == ids[3] and reply.code == StatusCode.RESOURCE_EXHAUSTED
    assert "queue" in reply.message and h.engine.counters["queue_full"] == 1


def test_clients_take_turns_in_a_queue_one_call_each():
    """A client that queued ten calls does not hold another's two behind all ten (§12)."""
    h = Harness()
    h.ready(b"w", capacity=1)
    for _ in range(10):
        h.call(b"a")  # one goes to w, nine wait
    for _ in range(2):
        h.call(b"b")
    for _ in range(12):
        [(_, header, _)] = h.take_requests()
        h.reply_from(b"w", header.request_id)
    answered = [client for client, _, _ in h.take_replies()]
    assert answered == [b"a", b"a", b"b", b"a", b"b"] + [b"a"] * 7


def test_a_full_queue_sheds_the_newest_call_of_the_client_holding_most_of_it():
    """One client filling a service's queue does not lock every other client out of it: a
    newcomer's call takes the place of the newest of the biggest holder's, answered
    RESOURCE_EXHAUSTED unrun, until the two hold about as many."""
    h = Harness(queue_size=4)
    h.ready(b"w", capacity=1)
    greedy = [h.call(b"a") for _ in range(5)]  # 1 at w, 4 waiting: the queue is full
    assert h.take_replies() == []
    polite = [h.call(b"b")]
    [(client, reply, _)] = h.take_replies()
    assert (client, reply.request_id, reply.code) == (b"a", greedy[-1], StatusCode.RESOURCE_EXHAUSTED)
    assert "gave way to another client's" in reply.message and dict(reply.details) == p.NOT_RUN
    refused = h.call(b"a")  # a still holds the most: its own call is refused, nobody's pushed
    [(client, reply, _)] = h.take_replies()
    assert (client, reply.request_id) == (b"a", refused) and "is full (4 calls) and no client holds" in reply.message
    assert reply.message.endswith("retry after a pause, or add workers (or raise the broker's queue_size)")
    polite.append(h.call(b"b"))  # a 3, b 1: a's newest gives way again
    assert [(c, r.request_id) for c, r, _ in h.take_replies()] == [(b"a", greedy[-2])]
    refused = h.call(b"b")  # a 2, b 2: now b's own is refused
    assert [(c, r.request_id) for c, r, _ in h.take_replies()] == [(b"b", refused)]
    assert (h.engine.counters["queue_full_pushed_out"], h.engine.counters["queue_full"]) == (2, 2)
    for _ in range(5):  # what stayed runs: a's first three and both of b's, in turns
        [(_, header, _)] = h.take_requests()
        h.reply_from(b"w", header.request_id)
    answered = [(c, r.request_id) for c, r, _ in h.take_replies()]
    assert answered == [(b"a", greedy[0]), (b"a", greedy[1]), (b"b", polite[0]), (b"a", greedy[2]),
                        (b"b", polite[1])]
    assert h.engine.calls_held == 0


def test_with_keys_a_client_is_its_key_however_many_connections_it_opens():
    """Under CURVE a client is its key: a key's calls over eight connections take one turn and
    one share of a full queue, as one connection's would (a swarm of connections from one key
    took a turn each, and pushed out other clients' calls)."""
    h = Harness(queue_size=20)
    h.ready(b"w", capacity=1)
    swarm = [b"alice%d" % n for n in range(8)]
    for n in range(16):
        h.call(swarm[n % 8], peer_key="ALICE")  # one to w, 15 waiting
    h.call(b"bob", peer_key="BOB")
    for _ in range(3):
        [(_, header, _)] = h.take_requests()
        h.reply_from(b"w", header.request_id)
    answered = [client for client, _, _ in h.take_replies()]
    assert answered[2] == b"bob"  # after alice's running call and her one turn, not after eight
    for n in range(7):  # 13 + 7 alice calls fill the queue; one more of hers is refused, not pushing
        h.call(swarm[n], peer_key="ALICE")
    refused = h.call(b"alice-new-connection", peer_key="ALICE")
    [(client, reply, _)] = h.take_replies()
    assert (client, reply.request_id) == (b"alice-new-connection", refused) and "gave way" not in reply.message
    carol = h.call(b"carol", peer_key="CAROL")  # pushes out alice's newest
    [(client, reply, _)] = h.take_replies()
    assert client == b"alice6" and "gave way" in reply.message
    assert any(call.client_request_id == carol for call in h.engine.services["svc.S"].queue)


def test_a_pushed_out_call_that_ran_at_a_worker_that_died_is_not_said_to_be_unrun():
    """Review: idempotent calls re-queued after their worker died may have run there; pushed
    out of a full queue, one was still answered zrpc-retry: not-run."""
    h = Harness(queue_size=2)
    h.ready(b"w1", capacity=2)
    h.call(b"a", idempotent=True)
    h.call(b"a", idempotent=True)
    h.take_requests()
    h.backend(b"w1", p.disconnect_message("crash"))  # both waiting again, once sent
    h.call(b"b")
    [(client, reply, _)] = h.take_replies()
    assert (client, reply.code) == (b"a", StatusCode.RESOURCE_EXHAUSTED) and "gave way" in reply.message
    assert p.RETRY_DETAIL not in reply.details


def test_a_client_that_disconnects_during_a_rollout_has_each_call_answered_once():
    """Review: client_disconnected walked a copy of the client's calls; taking a queued one out
    during a rollout dispatches, which expired another of them first. That one was answered
    twice (DEADLINE_EXCEEDED, then CANCELLED) and calls_held fell below zero."""
    h = Harness()
    h.ready(b"w1", fds=_svc_fds("M"))
    h.ready(b"w2", fds=_svc_fds("M", "N"))
    h.call(b"x")
    h.call(b"x")
    busy = h.take_requests()  # both workers busy
    h.call(b"c", deadline_ms=10_000)
    h.call(b"c", deadline_ms=100)
    h.now += 0.2  # the second one's deadline passes before a tick looks
    h.engine.client_disconnected(b"c", h.now)
    h.engine.flush()
    answers = [r.request_id for client, r, _ in h.take_replies() if client == b"c"]
    assert len(answers) == len(set(answers)) == 2
    assert h.engine.calls_held == 2 and h.engine.counters["client_disconnected"] == 1
    for worker, header, _ in busy:
        h.reply_from(worker, header.request_id)
    assert h.engine.calls_held == 0 and not h.engine.clients


def test_a_call_that_expired_at_its_turn_does_not_use_up_its_clients_turn():
    h = Harness()
    h.ready(b"w", capacity=1)
    h.call(b"x")  # w is busy
    h.call(b"a", deadline_ms=100)
    second = h.call(b"a")
    h.call(b"b")
    [(_, header, _)] = h.take_requests()
    h.now += 0.2  # a's first call's deadline passes before a tick looks
    h.reply_from(b"w", header.request_id)  # the next turn is a's: its first call expired
    [(_, sent, _)] = h.take_requests()
    assert sent.request_id != header.request_id
    replies = {r.request_id: r.code for _, r, _ in h.take_replies()}
    assert StatusCode.DEADLINE_EXCEEDED in replies.values()
    h.reply_from(b"w", sent.request_id)
    assert [r.request_id for _, r, _ in h.take_replies()] == [second]


def test_a_call_given_back_goes_first_among_its_clients_and_turns_go_on():
    h = Harness()
    h.ready(b"old", capacity=1)
    first = h.call(b"a")
    later = [h.call(b"a"), h.call(b"b"), h.call(b"a")]
    [(_, header, _)] = h.take_requests()
    h.reply_from(b"old", header.request_id, code=StatusCode.UNAVAILABLE, details={"zrpc-retry": "draining"})
    h.ready(b"new", capacity=1)
    for _ in range(4):
        [(worker, header, _)] = h.take_requests()
        assert worker == b"new"
        h.reply_from(b"new", header.request_id)
    assert [r.request_id for _, r, _ in h.take_replies()] == [first, later[1], later[0], later[2]]


def test_calls_wait_out_unavailable_wait_by_their_age_whatever_their_turn():
    """§10's wait counts for each call from its arrival (or from when the last worker left):
    one whose client's turn comes after a younger call's is answered when its own wait ends."""
    h = Harness(unavailable_wait=1.0)
    h.ready(b"w", capacity=1, heartbeat_ms=60_000)
    h.call(b"x", deadline_ms=600_000)  # keeps w busy
    first = h.call(b"a", deadline_ms=60_000)
    h.backend(b"w", p.disconnect_message("draining", drain=True))  # no live worker from now
    h.now += 0.2
    older = h.call(b"b", deadline_ms=60_000)
    h.now += 0.3
    younger = h.call(b"a", deadline_ms=60_000)  # a's turn: ahead of b's older call
    h.take_requests()
    h.advance(0.55)
    assert [(r.request_id, r.code) for _, r, _ in h.take_replies()] == [(first, StatusCode.UNAVAILABLE)]
    h.advance(0.2)  # older has waited 1.05 s, younger 0.75 s
    assert [(r.request_id, r.code) for _, r, _ in h.take_replies()] == [(older, StatusCode.UNAVAILABLE)]
    h.advance(0.3)
    assert [(r.request_id, r.code) for _, r, _ in h.take_replies()] == [(younger, StatusCode.UNAVAILABLE)]


def test_answered_calls_behind_a_long_one_keep_no_payload_alive():
    """An adversarial tester: one long call's deadline at the front of the deadlines kept up to
    about 1,024 answered calls alive behind it, payloads included (4.7 GB with 4 MiB calls).
    An answered call now lets go of its payload and header, whatever still refers to it."""
    h = Harness()
    h.ready(b"w", capacity=2)
    h.call(b"holder", deadline_ms=150_000)  # holds a slot and the front of the deadlines
    h.take_requests()
    cancelled = [h.call(b"c", deadline_ms=200_000, payload=b"x" * 100_000) for _ in range(5)]
    h.engine.on_frontend(b"c", p.cancel_message(cancelled), h.now)  # 1 at w, 4 queued
    [(_, running, _)] = h.take_requests()
    h.reply_from(b"w", running.request_id, code=StatusCode.CANCELLED)  # w gives the slot back
    for _ in range(20):  # answered OK, one after another, at the second slot
        h.call(b"d", deadline_ms=200_000, payload=b"y" * 100_000)
        [(_, header, _)] = h.take_requests()
        h.reply_from(b"w", header.request_id)
    entries = [entry[-1] for entry in (*h.engine._deadlines._fifo, *h.engine._deadlines._heap)]
    answered = [call for call in entries if call.state is CallState.DONE]
    assert len(answered) == 25  # still referred to: it is what they hold that matters
    assert sum(len(call.payload) for call in answered) == 0
    assert all(call.header is None for call in answered)


def test_deadline_in_queue_answers_deadline_exceeded_and_is_never_dispatched():
    h = Harness()
    h.ready(b"w", capacity=1)
    first = h.call(b"c", deadline_ms=10_000)
    short = h.call(b"c", deadline_ms=50)
    [(_, header, _)] = h.take_requests()
    h.advance(0.06)
    [(_, reply, _)] = h.take_replies()
    assert (reply.request_id, reply.code) == (short, StatusCode.DEADLINE_EXCEEDED)
    assert reply.message == "deadline exceeded while queued (50 ms were left when the broker took the call)"
    h.reply_from(b"w", header.request_id)
    assert h.take_requests() == []  # the expired call never reaches the worker
    assert [r.request_id for _, r, _ in h.take_replies()] == [first]
    h.assert_baseline()


def test_deadline_at_worker_answers_caller_cancels_worker_and_keeps_the_slot():
    h = Harness()
    h.ready(b"w", capacity=1)
    rid = h.call(b"c", deadline_ms=100)
    h.call(b"c", deadline_ms=10_000)
    [(_, header, _)] = h.take_requests()
    h.advance(0.2)
    [(_, reply, _)] = h.take_replies()
    assert (reply.request_id, reply.code) == (rid, StatusCode.DEADLINE_EXCEEDED)
    assert reply.message == "deadline exceeded at the worker (100 ms were left when the broker took the call)"
    [(worker, frames)] = h.take_control(p.CANCEL)
    assert worker == b"w" and list(p.decode_cancel(frames[2:]).request_ids) == [header.request_id]
    assert h.take_requests() == []  # the hung worker gets nothing more while full
    h.reply_from(b"w", header.request_id, payload=b"late")
    assert h.engine.counters["late_replies"] == 1
    assert h.take_replies() == []  # the late reply is dropped
    assert len(h.take_requests()) == 1  # the freed slot takes the queued call


def test_dead_worker_requests_are_redispatched_once_if_idempotent_else_unavailable(caplog):
    h = Harness()
    h.ready(b"w1", capacity=2, heartbeat_ms=100)
    idem = h.call(b"c", idempotent=True, payload=b"idem")
    other = h.call(b"c", idempotent=False, payload=b"other")
    assert len(h.take_requests()) == 2
    h.ready(b"w2", capacity=2, heartbeat_ms=100_000)
    with caplog.at_level(logging.INFO, logger="zrpc.broker"):
        h.advance(0.31)  # w1 silent for more than 3 x 100 ms
    # The log says what the loss cost, as the callers' errors do (a tester had only "expired").
    [cost] = [r for r in caplog.records if "call(s) in flight" in r.message]
    assert cost.levelname == "WARNING" and cost.message.startswith("worker w1 expired with 2 call(s) in flight: "
                                                                   "1 queued again for another worker, 1 failed")
    [(_, reply, _)] = h.take_replies()
    assert (reply.request_id, reply.code) == (other, StatusCode.UNAVAILABLE)
    assert "w1 expired" in reply.message
    [(worker, header, payload)] = h.take_requests()
    assert (worker, payload, header.attempt) == (b"w2", b"idem", 2)
    h.reply_from(b"w2", header.request_id)
    assert [(r.request_id, r.code) for _, r, _ in h.take_replies()] == [(idem, StatusCode.OK)]
    assert h.engine.counters["redispatched"] == 1
    h.assert_baseline()


def test_idempotent_call_is_not_dispatched_a_third_time():
    h = Harness()
    h.ready(b"w1", capacity=1)
    rid = h.call(b"c", idempotent=True)
    h.take_requests()
    h.backend(b"w1", p.disconnect_message("bye"))
    h.ready(b"w2", capacity=1)
    [(_, header, _)] = h.take_requests()
    assert header.attempt == 2
    h.backend(b"w2", p.disconnect_message("bye"))
    [(_, reply, _)] = h.take_replies()
    assert (reply.request_id, reply.code) == (rid, StatusCode.UNAVAILABLE)


def test_idempotent_call_without_time_left_is_not_redispatched():
    h = Harness()
    h.ready(b"w1", capacity=1, heartbeat_ms=100)
    h.ready(b"w2", capacity=1, heartbeat_ms=100_000)
    rid = h.call(b"c", idempotent=True, deadline_ms=300)
    h.take_requests()
    h.now += 0.35  # expiry and deadline fall in the same tick: the deadline wins
    h.engine.tick(h.now)
    h.engine.flush()
    [(_, reply, _)] = h.take_replies()
    assert reply.request_id == rid and reply.code == StatusCode.DEADLINE_EXCEEDED
    assert h.take_requests() == []


def test_unknown_service_is_not_found_after_grace_and_waits_during_it():
    h = Harness(unknown_service_grace=2.0)
    early = h.call(b"c", service="later.S")
    assert h.take_replies() == []
    h.ready(b"w", services=("later.S",))
    [(_, header, _)] = h.take_requests()  # the waiting call is served once a worker offers it
    h.reply_from(b"w", header.request_id)
    assert [r.code for _, r, _ in h.take_replies()] == [StatusCode.OK]
    waiting = h.call(b"c", service="never.S")
    h.advance(2.1)
    [(_, reply, _)] = h.take_replies()
    assert (reply.request_id, reply.code) == (waiting, StatusCode.NOT_FOUND)
    assert "zrpc worker run" in reply.message
    assert "never.S" not in h.engine.services  # the placeholder is gone: tables stay bounded
    h.call(b"c", service="never.S")
    assert [r.code for _, r, _ in h.take_replies()] == [StatusCode.NOT_FOUND]
    assert early


def test_known_service_without_workers_is_unavailable_after_the_wait():
    h = Harness(unavailable_wait=1.0)
    h.ready(b"w", heartbeat_ms=100)
    h.advance(0.5)  # w expires
    rid = h.call(b"c")
    h.advance(0.5)
    assert h.take_replies() == []
    h.advance(0.6)
    [(_, reply, _)] = h.take_replies()
    assert (reply.request_id, reply.code) == (rid, StatusCode.UNAVAILABLE)
    assert "no live worker" in reply.message
    assert dict(reply.details) == p.NOT_RUN  # it never ran: a client may send it elsewhere


def test_refusals_before_any_worker_had_the_call_say_it_never_ran():
    h = Harness(queue_size=1, unknown_service_grace=0.0)
    h.ready(b"w", capacity=1, heartbeat_ms=100)
    held = h.call(b"c")  # at w
    h.call(b"c")  # queued
    full = h.call(b"c")
    unknown = h.call(b"c", service="never.S")
    replies = {r.request_id: r for _, r, _ in h.take_replies()}
    assert replies[full].code == StatusCode.RESOURCE_EXHAUSTED and dict(replies[full].details) == p.NOT_RUN
    assert replies[unknown].code == StatusCode.NOT_FOUND and dict(replies[unknown].details) == p.NOT_RUN
    h.advance(0.5)  # w expires holding a call it may have run: that one is not marked
    dead = {r.request_id: r for _, r, _ in h.take_replies()}[held]
    assert dead.code == StatusCode.UNAVAILABLE and p.RETRY_DETAIL not in dead.details


def test_unknown_method_is_unimplemented_when_the_service_declares_its_methods():
    h = Harness()
    h.backend(b"w", p.ready_message(p.Ready(services=["svc.S"], capacity=1, heartbeat_ms=1000,
                                            file_descriptor_set=SVC_FDS)))
    rid = h.call(b"c", method="Nope")
    [(_, reply, _)] = h.take_replies()
    assert (reply.request_id, reply.code) == (rid, StatusCode.UNIMPLEMENTED)
    assert "'M'" not in reply.message and "M" in reply.message
    rid = h.call(b"c", service=SERVICE, method="Nope")
    [(_, reply, _)] = h.take_replies()
    assert (reply.request_id, reply.code) == (rid, StatusCode.UNIMPLEMENTED)
    assert "ListServices" in reply.message


def test_reply_for_a_dispatch_the_worker_was_not_given_is_dropped_and_counted():
    h = Harness()
    h.ready(b"w1")
    h.ready(b"w2", capacity=1)
    h.call(b"c")
    [(worker, header, _)] = h.take_requests()
    other = b"w2" if worker == b"w1" else b"w1"
    h.reply_from(other, header.request_id, payload=b"forged")  # another worker's request
    h.reply_from(worker, 987654)  # an id nobody was given
    assert h.take_replies() == []
    assert h.engine.counters["malformed_unknown_dispatch"] == 2
    h.reply_from(worker, header.request_id, payload=b"real")
    assert [pl for _, _, pl in h.take_replies()] == [b"real"]


def test_reserved_service_names_and_second_ready_are_refused():
    h = Harness()
    h.ready(b"evil", services=("zrpc.Broker",))
    [(_, frames)] = h.take_control(p.DISCONNECT)
    assert "reserved" in p.decode_disconnect(frames[2:])
    assert b"evil" not in h.engine.workers
    h.ready(b"w", services=("svc.S",), capacity=1)
    h.ready(b"w", services=("svc.S",), capacity=100)
    assert h.engine.workers[b"w"].capacity == 1
    assert h.engine.counters["malformed_duplicate_ready"] == 1
    assert h.engine.counters["malformed_reserved_service"] == 1


def test_message_from_unknown_worker_is_answered_disconnect_so_it_re_registers():
    h = Harness()
    h.backend(b"stranger", p.heartbeat_message())
    [(identity, frames)] = h.take_control(p.DISCONNECT)
    assert identity == b"stranger" and "READY" in p.decode_disconnect(frames[2:])


def test_client_cancel_removes_queued_call_and_cancels_dispatched_one():
    h = Harness()
    h.ready(b"w", capacity=1)
    running = h.call(b"c")
    queued = h.call(b"c")
    [(_, header, _)] = h.take_requests()
    h.engine.on_frontend(b"c", p.cancel_message([queued, running]), h.now)
    h.engine.flush()
    assert h.engine.queue_depth() == 0
    [(_, frames)] = h.take_control(p.CANCEL)
    assert list(p.decode_cancel(frames[2:]).request_ids) == [header.request_id]
    assert h.take_replies() == []  # the client gave up: no answer is owed
    h.reply_from(b"w", header.request_id)
    assert h.take_replies() == []
    h.assert_baseline()


def test_per_client_outstanding_and_total_in_flight_are_bounded():
    h = Harness(max_outstanding_per_client=2, max_in_flight=3)
    h.ready(b"w", capacity=100)
    h.call(b"a")
    h.call(b"a")
    refused = h.call(b"a")
    [(_, reply, _)] = h.take_replies()
    assert (reply.request_id, reply.code) == (refused, StatusCode.RESOURCE_EXHAUSTED)
    h.call(b"b")
    refused = h.call(b"c")
    [(_, reply, _)] = h.take_replies()
    assert (reply.request_id, reply.code) == (refused, StatusCode.RESOURCE_EXHAUSTED)


def test_calls_in_a_message_a_worker_never_got_go_to_another_worker_and_the_rest_fail(caplog):
    caplog.set_level(logging.INFO, logger="zrpc.broker")
    h = Harness()
    h.ready(b"w1", capacity=2)
    ran = h.call(b"c1")  # not idempotent, delivered: it may have run
    h.engine.backend_out = []
    lost = h.call(b"c1", payload=b"lost")  # not idempotent either: its message never left
    (undelivered,) = h.engine.backend_out
    h.engine.backend_out = []
    h.ready(b"w2")
    h.engine.on_undeliverable([undelivered], h.now)
    h.engine.flush()
    assert [(who, header.attempt, payload) for who, header, payload in h.take_requests()] == [(b"w2", 1, b"lost")]
    (failed,) = h.take_replies()
    assert (failed[1].request_id, failed[1].code) == (ran, StatusCode.UNAVAILABLE)
    # Not its routing id (7731): a peer that learns them can make libzmq abort the broker (_unnamed).
    assert "w1 is gone (a message to it could not be sent) with the call in flight" in failed[1].message
    # One line says what happened and what it cost (there were two), with the connection.
    [said] = [r.getMessage() for r in caplog.records if "w1" in r.getMessage() and "joined" not in r.getMessage()]
    assert said.startswith("worker w1 (connection 7731) is gone (a message to it could not be sent) with 2 "
                           "call(s) in flight: 1 queued again for another worker, 1 failed UNAVAILABLE")
    assert set(h.engine.workers) == {b"w2"}
    assert h.engine.counters["requeued_undelivered"] == 1
    h.engine.on_undeliverable([undelivered], h.now)  # a worker removed already: nothing to do
    h.engine.on_undeliverable([(b"c1", [p.TAG, p.HEARTBEAT])], h.now)  # not a worker at all
    assert h.take_requests() == [] and set(h.engine.workers) == {b"w2"}
    assert lost != ran


def test_every_message_a_worker_never_got_in_a_round_counts_before_it_is_removed():
    h = Harness()
    h.ready(b"w1", capacity=2, batches=True)
    large, small = b"L" * p.BATCH_CALL_BYTES, b"small"
    headers = [p.RequestHeader(request_id=i, service="svc.S", method="M", deadline_ms=10_000).SerializeToString()
               for i in (1, 2)]
    h.engine.on_frontend(b"c1", p.request_message(zip(headers, [large, small])), h.now)
    h.engine.flush()
    undelivered = h.engine.backend_out  # the large call alone in a REQUEST, the other in a batch
    assert [frames[1] for _, frames in undelivered] == [p.REQUEST, p.REQUEST_BATCH]
    h.engine.backend_out = []
    h.ready(b"w2", capacity=2)
    h.engine.on_undeliverable(undelivered, h.now)
    h.engine.flush()
    assert sorted((who, header.attempt, len(payload)) for who, header, payload in h.take_requests()) == [
        (b"w2", 1, len(small)), (b"w2", 1, len(large))]
    assert h.take_replies() == []  # neither failed: neither reached a worker
    assert h.engine.counters["requeued_undelivered"] == 2


def test_draining_worker_hands_back_new_work_and_gets_no_more():
    h = Harness()
    h.ready(b"old", capacity=5)
    rid = h.call(b"c")
    [(_, header, _)] = h.take_requests()
    h.reply_from(b"old", header.request_id, code=StatusCode.UNAVAILABLE, details={"zrpc-retry": "draining"})
    assert h.take_replies() == []
    h.call(b"c")
    assert h.take_requests() == []  # no dispatch to a draining worker
    h.ready(b"new", capacity=5)
    sent = h.take_requests()
    assert [w for w, _, _ in sent] == [b"new", b"new"] and sent[0][1].attempt == 1
    assert rid


def test_idle_workers_get_heartbeats_at_their_interval():
    h = Harness()
    h.ready(b"w", heartbeat_ms=200)
    h.advance(0.01)  # one at the first tick: the worker hears us before its silence limit
    assert len(h.take_control(p.HEARTBEAT)) == 1
    h.advance(0.09)
    assert h.take_control(p.HEARTBEAT) == []
    h.advance(0.11)
    assert len(h.take_control(p.HEARTBEAT)) == 1
    h.backend(b"w", p.heartbeat_message())  # keeps it alive
    h.advance(0.2)
    h.backend(b"w", p.heartbeat_message())
    h.advance(0.2)
    h.backend(b"w", p.heartbeat_message())
    h.advance(0.2)
    assert b"w" in h.engine.workers


@pytest.mark.parametrize("frames, reason", [
    ([b"garbage"], "too_few_frames"),
    ([b"MDPC01", b"\x02", b"", b""], "bad_tag"),
    ([p.TAG, b"\x09"], "bad_command"),
    ([p.TAG, p.READY, b""], "bad_command"),
    ([p.TAG, p.REQUEST, b"\x08\x01"], "bad_frame_count"),
    ([p.TAG, p.REQUEST, b"\xff\xff\xff", b""], "bad_header"),
])
def test_malformed_client_messages_get_invalid_argument_and_are_counted(frames, reason):
    h = Harness()
    h.engine.on_frontend(b"c", frames, h.now)
    h.engine.flush()
    [(client, reply, _)] = h.take_replies()
    assert client == b"c" and reply.code == StatusCode.INVALID_ARGUMENT and reply.message
    assert h.engine.counters[f"malformed_{reason}"] == 1


@pytest.mark.parametrize("raw_header", [
    p.RequestHeader(request_id=12, service="echo.Echo", deadline_ms=1000).SerializeToString(),  # no method
    b"\x08\x0c\xff\xff",  # id 12, then bytes that do not decode
])
def test_a_bad_request_header_whose_id_reads_is_answered_under_that_id(raw_header):
    """§9: under the request id when the header could be read. A tester's two such headers were
    answered under id 0: their callers heard nothing."""
    h = Harness()
    h.engine.on_frontend(b"c", [p.TAG, p.REQUEST, raw_header, b""], h.now)
    h.engine.flush()
    [(_, reply, _)] = h.take_replies()
    assert (reply.request_id, reply.code) == (12, StatusCode.INVALID_ARGUMENT)
    assert h.engine.counters["malformed_bad_header"] == 1


def test_oversized_message_gets_resource_exhausted():
    h = Harness(max_message_bytes=1000, max_frames=p.MIN_FRAMES_LIMIT)
    h.call(b"c", payload=b"x" * 2000)
    h.engine.on_frontend(b"c", [p.TAG, p.REQUEST] + [b""] * p.MIN_FRAMES_LIMIT, h.now)
    h.engine.flush()
    replies = h.take_replies()
    assert [r.code for _, r, _ in replies] == [StatusCode.RESOURCE_EXHAUSTED] * 2
    assert replies[0][1].request_id == 1  # the caller of the oversized request is answered by id
    assert "bytes" in replies[0][1].message and "frames" in replies[1][1].message


def test_the_size_limit_is_per_call_not_per_message():
    """A client coalesces its calls without knowing the limit: small calls pass together."""
    h = Harness(max_message_bytes=1000)
    h.ready(b"w", capacity=8)

    def header(request_id: int) -> bytes:
        return p.RequestHeader(request_id=request_id, service="svc.S", method="M", deadline_ms=1000).SerializeToString()

    h.engine.on_frontend(b"c", p.request_message([(header(i), b"x" * 400) for i in (1, 2, 3)]), h.now)
    h.engine.flush()
    assert len(h.take_requests()) == 3 and h.take_replies() == []
    calls = [(header(4), b"small"), (header(5), b"x" * 2000), (header(6), b"small")]
    h.engine.on_frontend(b"c", p.request_message(calls), h.now)
    h.engine.flush()
    [(_, reply, _)] = h.take_replies()
    assert (reply.request_id, reply.code) == (5, StatusCode.RESOURCE_EXHAUSTED)
    assert reply.message.startswith("call is 20") and reply.message.endswith("bytes (limit 1000: the broker's max_message_bytes)")
    assert len(h.take_requests()) == 2  # the small calls 4 and 6, under their dispatch ids
    assert h.engine.counters["malformed_too_large"] == 1


def test_a_reply_over_the_limit_fails_its_call_and_frees_the_slot():
    h = Harness(max_message_bytes=1000)
    h.ready(b"w", capacity=3)
    ids = {h.call(b"c", payload=b"q"): None for _ in range(3)}
    dispatched = [header.request_id for _, header, _ in h.take_requests()]
    # Two replies of 600 bytes in one REPLY: over the limit together, each one under it.
    h.backend(b"w", p.reply_message([(p.encode_reply_header(d), b"y" * 600) for d in dispatched[:2]]))
    assert [(r.code, len(pl)) for _, r, pl in h.take_replies()] == [(StatusCode.OK, 600)] * 2
    h.backend(b"w", p.reply_message([(p.encode_reply_header(dispatched[2]), b"y" * 2000)]))
    [(_, reply, payload)] = h.take_replies()
    assert (reply.code, payload) == (StatusCode.RESOURCE_EXHAUSTED, b"")
    assert reply.request_id in ids and reply.message.startswith("reply is 20")
    assert h.engine.counters["malformed_too_large"] == 1 and b"w" in h.engine.workers
    assert h.engine.workers[b"w"].in_flight == {}
    h.assert_baseline()


def test_a_reply_header_over_the_header_limit_fails_its_call_without_being_decoded():
    h = Harness()
    h.ready(b"w", capacity=1)
    rid = h.call(b"c")
    [(_, header, _)] = h.take_requests()
    huge = p.encode_reply_header(header.request_id, StatusCode.INVALID_ARGUMENT, "x" * p.MAX_HEADER_BYTES)
    h.backend(b"w", p.reply_message([(huge, b"")]))
    [(_, reply, _)] = h.take_replies()
    assert (reply.request_id, reply.code) == (rid, StatusCode.RESOURCE_EXHAUSTED)
    assert reply.message.startswith("reply header is") and f"(limit {p.MAX_HEADER_BYTES})" in reply.message
    assert h.engine.workers[b"w"].in_flight == {}  # the slot is free for the next call
    h.assert_baseline()


def test_a_request_header_over_the_header_limit_is_refused_under_its_id():
    h = Harness()
    h.ready(b"w")
    header = p.RequestHeader(request_id=9, service="svc.S", method="M", deadline_ms=1000,
                             metadata={"k": "v" * p.MAX_HEADER_BYTES})
    h.engine.on_frontend(b"c", p.request_message([(header.SerializeToString(), b"")]), h.now)
    h.engine.flush()
    [(_, reply, _)] = h.take_replies()
    assert (reply.request_id, reply.code) == (9, StatusCode.RESOURCE_EXHAUSTED)
    assert reply.message.startswith("request header is")
    assert h.take_requests() == []


def test_a_cancel_of_many_calls_is_not_bound_by_the_size_limit():
    """Clients send every cancel they have in one CANCEL: its size is not a call's."""
    h = Harness(max_message_bytes=1000, unavailable_wait=60.0)
    h.ready(b"w", capacity=1)
    ids = [h.call(b"c", request_id=2**40 + i) for i in range(400)]  # 6 bytes each in a CANCEL
    h.engine.on_frontend(b"c", p.cancel_message(ids), h.now)
    h.engine.flush()
    assert len(p.cancel_message(ids)[2]) > 1000
    assert h.engine.calls_held == 0 and h.engine.counters["cancelled"] == 400


@pytest.mark.parametrize("raw, expected", [
    (p.RequestHeader(request_id=300, service="s", method="m").SerializeToString(), 300),
    (p.encode_reply_header(2**40 + 5, StatusCode.INTERNAL, "boom"), 2**40 + 5),
    (p.RequestHeader(service="s").SerializeToString(), 0),  # no id written
    (b"", 0), (b"\x08", 0), (b"\x08\xff\xff", 0), (b"\x12\x01a", 0),
    # A tenth byte's bits past 64 are dropped, as protobuf drops them.
    (b"\x08" + b"\xff" * 9 + b"\x7f", 2**64 - 1), (b"\x08" + b"\x80" * 9 + b"\x02", 0),
])
def test_request_id_of_reads_the_leading_id_without_decoding_the_rest(raw, expected):
    assert p.request_id_of(raw) == expected
    if raw[:1] == b"\x08" and expected:  # the id protobuf itself reads
        assert p.ReplyHeader.FromString(raw).request_id == expected


def test_a_refused_call_whose_id_overflows_uint64_costs_only_itself():
    """An oversized header starting with a 10-byte id over 2^64 - 1: the refusal is encodable,
    and the good call after it in the same message is served."""
    h = Harness(max_message_bytes=1000)
    h.ready(b"w", capacity=2)
    big = b"\x08" + b"\xff" * 9 + b"\x7f" + b"\x12\x01s" + b"\x1a\x01m" + b"\x00" * 10  # over 1000 bytes with its payload
    good = p.RequestHeader(request_id=7, service="svc.S", method="M", deadline_ms=5000).SerializeToString()
    h.engine.on_frontend(b"c", p.request_message([(big, b"x" * 2000), (good, b"q")]), h.now)
    h.engine.flush()
    [(_, reply, _)] = h.take_replies()
    assert (reply.request_id, reply.code) == (2**64 - 1, StatusCode.RESOURCE_EXHAUSTED)
    [(_, header, payload)] = h.take_requests()
    assert payload == b"q"
    assert h.engine.counters["internal_errors"] == 0


def test_a_worker_reply_over_the_frame_limit_ends_each_of_its_calls():
    """§9: refused whole, but no call of it waits for its deadline, and the slots are freed."""
    count = p.MAX_CALLS_PER_MESSAGE + 1  # one more than a worker may put in one message
    h = Harness(max_frames=p.MIN_FRAMES_LIMIT)
    h.ready(b"w", capacity=count)
    for _ in range(count):
        h.call(b"c")
    requests = h.take_requests()
    assert len(requests) == count
    h.backend(b"w", p.reply_message((p.encode_ok_reply_header(header.request_id), b"r") for _, header, _ in requests))
    replies = h.take_replies()
    assert sorted(reply.request_id for _, reply, _ in replies) == list(range(1, count + 1))
    assert {reply.code for _, reply, _ in replies} == {StatusCode.RESOURCE_EXHAUSTED}
    assert "frames (limit" in replies[0][1].message
    assert h.engine.counters["malformed_too_many_frames"] == 1
    h.call(b"c")  # the worker's slots are free again
    assert len(h.take_requests()) == 1


@pytest.mark.parametrize("request_id", [0, 1, 127, 128, 300, 16_383, 16_384, 2**21, 2**35 + 7, 2**63, 2**64 - 1])
def test_ok_reply_headers_are_written_byte_for_byte_as_protobuf_writes_them(request_id):
    assert p.encode_ok_reply_header(request_id) == p.ReplyHeader(request_id=request_id).SerializeToString()
    assert p.decode_reply_header(p.encode_ok_reply_header(request_id)).request_id == request_id


@pytest.mark.parametrize("request_id", [-1, 2**64])
def test_an_ok_reply_header_for_an_id_out_of_uint64_range_is_refused_as_protobuf_refuses_it(request_id):
    with pytest.raises(ValueError):
        p.encode_ok_reply_header(request_id)


def test_requests_to_one_worker_in_one_round_are_coalesced_into_one_message():
    h = Harness()
    h.ready(b"w", capacity=10)
    headers = [p.RequestHeader(request_id=i, service="svc.S", method="M", deadline_ms=1000).SerializeToString()
               for i in (1, 2, 3)]
    h.engine.on_frontend(b"c", p.request_message([(hd, b"x") for hd in headers]), h.now)
    h.engine.flush()
    assert len(h.engine.backend_out) == 1
    assert len(h.take_requests()) == 3


def test_builtin_list_services_reports_workers_and_queue():
    h = Harness()
    h.ready(b"w", services=("svc.S",), capacity=1)
    h.call(b"c")
    h.call(b"c")
    h.take_requests()
    h.call(b"c", service=SERVICE, method="ListServices", payload=b"")
    [(_, reply, payload)] = h.take_replies()
    listing = {s.name: s for s in bpb.ListServicesReply.FromString(payload).services}
    assert listing["svc.S"].live_workers == 1
    assert listing["svc.S"].queue_depth == 1 and listing["svc.S"].in_flight == 1
    own = listing[SERVICE]  # served by the broker: no workers of it anywhere
    assert (own.live_workers, own.capacity, list(own.methods)) == (0, 0, ["DescribeService", "Health", "ListServices"])


def test_builtin_describe_and_health():
    h = Harness()
    h.backend(b"w", p.ready_message(p.Ready(services=["svc.S"], capacity=1, heartbeat_ms=1000,
                                            file_descriptor_set=b"\x0a\x00")))
    h.call(b"c", service=SERVICE, method="DescribeService",
           payload=bpb.DescribeServiceRequest(service="svc.S").SerializeToString())
    h.call(b"c", service=SERVICE, method="DescribeService",
           payload=bpb.DescribeServiceRequest(service="none.S").SerializeToString())
    h.call(b"c", service=SERVICE, method="Health",
           payload=bpb.HealthRequest(service="svc.S").SerializeToString())
    h.call(b"c", service=SERVICE, method="Health", payload=b"\xff")
    h.call(b"c", service=SERVICE, method="DescribeService", payload=b"")
    described, missing, health, bad, nameless = h.take_replies()
    assert bpb.DescribeServiceReply.FromString(described[2]).file_descriptor_set == b"\x0a\x00"
    assert missing[1].code == StatusCode.NOT_FOUND
    assert bpb.HealthReply.FromString(health[2]).status == bpb.HealthReply.SERVING
    assert bad[1].code == StatusCode.INVALID_ARGUMENT
    assert (nameless[1].code, nameless[1].message) == (
        StatusCode.INVALID_ARGUMENT, "DescribeService needs the name of a service (ListServices lists them)")


def test_duplicate_request_id_in_flight_is_refused_without_touching_the_first():
    h = Harness()
    h.ready(b"w", capacity=1)
    h.call(b"c", request_id=7)
    h.call(b"c", request_id=7)
    [(_, reply, _)] = h.take_replies()
    assert reply.code == StatusCode.INVALID_ARGUMENT
    [(_, header, _)] = h.take_requests()
    h.reply_from(b"w", header.request_id)
    assert [(r.request_id, r.code) for _, r, _ in h.take_replies()] == [(7, StatusCode.OK)]


def test_drain_notice_stops_new_work_keeps_calls_in_flight_and_is_acknowledged():
    h = Harness()
    h.ready(b"old", capacity=5)
    rid = h.call(b"c")
    [(_, header, _)] = h.take_requests()
    h.backend(b"old", p.disconnect_message("stopping", drain=True))
    [(identity, frames)] = h.take_control(p.DISCONNECT)
    assert identity == b"old" and p.decode_disconnect_message(frames[2:]).drain
    h.call(b"c")
    assert h.take_requests() == []  # nothing new for a draining worker
    # ListServices tells it apart (a tester's listing counted it live, as Health did not).
    h.call(b"c", service=SERVICE, method="ListServices", payload=b"")
    [(_, _, payload)] = h.take_replies()
    [service] = [s for s in bpb.ListServicesReply.FromString(payload).services if s.name == "svc.S"]
    assert (service.live_workers, service.capacity, service.queue_depth, service.in_flight) == (0, 0, 1, 1)
    assert [(w.name, w.draining, w.in_flight) for w in service.workers] == [("old", True, 1)]
    h.reply_from(b"old", header.request_id, payload=b"finished")
    assert [(r.request_id, r.code) for _, r, _ in h.take_replies()] == [(rid, StatusCode.OK)]
    h.backend(b"old", p.disconnect_message("bye"))
    assert b"old" not in h.engine.workers
    h.ready(b"new", capacity=5)
    assert [w for w, _, _ in h.take_requests()] == [b"new"]


def test_a_call_held_long_does_not_keep_the_calls_answered_after_it():
    """The deadline heap is rebuilt without answered calls: without that, every call answered
    behind one held call (whose deadline comes first) stayed in memory until that deadline."""
    h = Harness()
    h.ready(b"w1", capacity=2)
    h.call(b"slow", deadline_ms=30_000)  # held at w1 for the whole test, never answered
    (_, held, _), = h.take_requests()
    for _ in range(5_000):
        h.call(b"c", deadline_ms=60_000, payload=b"x" * 100)
        (_, header, _), = h.take_requests()
        h.reply_from(b"w1", header.request_id)
        h.engine.frontend_out.clear()
        h.engine.next_timer(h.now)  # what the loop does each round
    assert h.engine.calls_held == 1
    assert len(h.engine._deadlines) <= 2 * h.engine.calls_held + 1024  # entries, answered ones included
    # The held call still expires on time.
    h.advance(30.0)
    assert h.engine.calls_held == 0
    assert h.engine.counters["deadline_exceeded"] == 1


# ---------------------------------------------------------------------------------- §4b batches

def _batch_reply(dispatch_ids, payloads, codes=None):
    headers = [p.encode_reply_header(i, code) for i, code in zip(dispatch_ids, codes or [0] * len(dispatch_ids))]
    return p.batch_message(p.REPLY_BATCH, headers, list(payloads))


def test_a_worker_that_reads_batches_gets_its_calls_of_a_round_in_one_frame_and_answers_in_one():
    h = Harness()
    h.ready(b"w", capacity=8, batches=True)
    clients = [b"c1", b"c2"]
    sent = {}
    for i in range(6):
        client = clients[i % 2]
        header = p.RequestHeader(request_id=100 + i, service="svc.S", method="M", deadline_ms=5000)
        h.engine.on_frontend(client, p.request_message([(header.SerializeToString(), b"p%d" % i)]), h.now)
        sent[(client, 100 + i)] = b"p%d" % i
    h.engine.flush()
    [(worker, frames)] = h.engine.backend_out
    assert worker == b"w" and frames[:2] == [p.TAG, p.REQUEST_BATCH] and len(frames) == 3
    headers = [p.RequestHeader.FromString(raw) for raw, _ in p.batch_pairs(frames[2:])]
    payloads = [payload for _, payload in p.batch_pairs(frames[2:])]
    assert payloads == [b"p%d" % i for i in range(6)]
    assert all(header.attempt == 1 and header.service == "svc.S" for header in headers)
    h.engine.backend_out = []
    # One REPLY_BATCH answers all six, each to its own caller under its own id.
    h.backend(b"w", _batch_reply([header.request_id for header in headers], [b"r" + pl for pl in payloads]))
    answered = {(client, reply.request_id): (reply.code, payload) for client, reply, payload in h.take_replies()}
    assert answered == {key: (StatusCode.OK, b"r" + payload) for key, payload in sent.items()}
    h.assert_baseline()


def test_a_large_payload_keeps_its_own_frame_even_for_a_worker_that_reads_batches():
    h = Harness()
    h.ready(b"w", capacity=4, batches=True)
    big = b"x" * p.BATCH_CALL_BYTES
    h.call(b"c", payload=b"small")
    h.call(b"c", payload=big)
    kinds = sorted(frames[1] for _, frames in h.engine.backend_out)
    assert kinds == [p.REQUEST, p.REQUEST_BATCH]
    pair_message = next(frames for _, frames in h.engine.backend_out if frames[1] == p.REQUEST)
    assert pair_message[3] is big  # the payload object itself: never copied into a batch
    requests = {payload: header.request_id for _, header, payload in h.take_requests()}
    h.reply_from(b"w", requests[big], payload=big)  # a worker may answer in either form
    h.backend(b"w", _batch_reply([requests[b"small"]], [b"done"]))
    assert sorted(payload for _, _, payload in h.take_replies()) == sorted([big, b"done"])
    h.assert_baseline()


def test_a_worker_that_does_not_announce_batches_is_sent_pairs():
    h = Harness()
    h.ready(b"old", capacity=4)
    pairs = [(p.RequestHeader(request_id=i, service="svc.S", method="M", deadline_ms=5000).SerializeToString(), b"")
             for i in (1, 2)]
    h.engine.on_frontend(b"c", p.request_message(pairs), h.now)
    h.engine.flush()
    [(_, frames)] = h.engine.backend_out
    assert frames[1] == p.REQUEST and len(frames) == 6


@pytest.mark.parametrize("frames, reason", [
    ([p.TAG, p.REPLY_BATCH], "bad_frame_count"),
    ([p.TAG, p.REPLY_BATCH, b"a", b"b"], "bad_frame_count"),
    ([p.TAG, p.REPLY_BATCH, b"\xff\xff\xff"], "bad_batch"),
    ([p.TAG, p.REPLY_BATCH, b"\x0a" * (p.MAX_BATCH_BYTES + 1)], "too_large"),  # refused undecoded
    ([p.TAG, p.REPLY_BATCH, b""], "bad_batch"),
    (p.batch_message(p.REPLY_BATCH, [p.encode_reply_header(99)], []), "bad_batch"),
    (p.batch_message(p.REPLY_BATCH, [p.encode_reply_header(99)] * 258, [b""] * 258), "too_many_calls"),
])
def test_a_malformed_reply_batch_is_counted_and_costs_the_worker_nothing(frames, reason):
    h = Harness(max_frames=p.MIN_FRAMES_LIMIT + 1)  # at most 257 calls per batch
    h.ready(b"w", capacity=2, batches=True)
    rid = h.call(b"c")
    [(_, header, _)] = h.take_requests()
    h.backend(b"w", frames)
    assert h.engine.counters[f"malformed_{reason}"] == 1
    assert b"w" in h.engine.workers and h.take_control(p.DISCONNECT) == []
    h.backend(b"w", _batch_reply([header.request_id], [b"late but fine"]))
    [(_, reply, payload)] = h.take_replies()
    assert (reply.request_id, payload) == (rid, b"late but fine")
    h.assert_baseline()


@pytest.mark.parametrize("make, reason, code", [
    (lambda ids: p.batch_message(p.REPLY_BATCH, [p.encode_reply_header(i) for i in ids], [b""]), "bad_batch",
     StatusCode.INTERNAL),
    (lambda ids: p.batch_message(p.REPLY_BATCH, [p.encode_reply_header(i) for i in ids * 129], [b""] * 258),
     "too_many_calls", StatusCode.RESOURCE_EXHAUSTED),
    (lambda ids: [p.TAG, p.REPLY, p.encode_reply_header(ids[0]), b"", p.encode_reply_header(ids[1])],
     "bad_frame_count", StatusCode.INTERNAL),
    # Each header alone: its id reads, the rest does not (a message that is not UTF-8).
    (lambda ids: p.batch_message(p.REPLY_BATCH, [bytes((0x08, i, 0x1a, 0x02, 0xff, 0xfe)) for i in ids], [b"", b""]),
     "bad_header", StatusCode.INTERNAL),
])
def test_each_call_of_a_malformed_reply_whose_id_reads_ends_at_once_and_frees_its_slot(make, reason, code):
    """An adversarial tester's worker answered with malformed replies: the broker dropped them,
    the callers waited out their deadlines (and were told the worker ran out of time), and the
    slots stayed taken, so the next call waited in the queue. As for a REPLY over max_frames."""
    h = Harness(max_frames=p.MIN_FRAMES_LIMIT + 1)  # at most 257 calls per batch
    h.ready(b"w", capacity=2, batches=True)
    calls = [h.call(b"c"), h.call(b"c")]
    ids = [header.request_id for _, header, _ in h.take_requests()]
    h.backend(b"w", make(ids))
    assert h.engine.counters[f"malformed_{reason}"] >= 1
    replies = sorted((reply.request_id, reply.code) for _, reply, _ in h.take_replies())
    assert replies == [(call, code) for call in calls]
    assert h.engine.workers[b"w"].free == 2  # the slots are free again: the next call goes at once
    h.call(b"c")
    assert len(h.take_requests()) == 1


def test_a_client_that_sends_a_batch_is_answered_in_one():
    h = Harness()
    h.ready(b"w", capacity=4, batches=True)
    ids = h.call_batch(b"c", [b"a", b"b", b"c"])
    requests = h.take_requests()
    assert [payload for _, _, payload in requests] == [b"a", b"b", b"c"]
    h.backend(b"w", _batch_reply([header.request_id for _, header, _ in requests], [b"A", b"B", b"C"]))
    commands = []
    replies = h.take_replies(commands)
    assert commands == [p.REPLY_BATCH]
    assert [(reply.request_id, payload) for _, reply, payload in replies] == list(zip(ids, [b"A", b"B", b"C"]))
    h.assert_baseline()


def test_only_a_client_that_says_it_reads_batches_is_answered_in_one():
    h = Harness()
    h.ready(b"w", capacity=4)
    old = h.call(b"old")  # a client from before spec §4c: pairs only
    new = h.call(b"new", reads_batches=True)
    for _, header, _ in h.take_requests():
        h.reply_from(b"w", header.request_id)
    commands = []
    replies = h.take_replies(commands)
    assert sorted((client, reply.request_id) for client, reply, _ in replies) == [(b"new", new), (b"old", old)]
    assert sorted(commands) == [p.REPLY, p.REPLY_BATCH]
    h.assert_baseline()


def test_a_large_answer_to_a_client_that_reads_batches_keeps_its_own_frame():
    h = Harness()
    h.ready(b"w", capacity=2)
    small, large = h.call(b"c", reads_batches=True), h.call(b"c", reads_batches=True)
    [(_, first, _), (_, second, _)] = h.take_requests()
    big = b"x" * p.BATCH_CALL_BYTES
    h.backend(b"w", p.reply_message([(p.encode_reply_header(first.request_id), b"small"),
                                     (p.encode_reply_header(second.request_id), big)]))
    by_command = {}
    for client, frames in h.engine.frontend_out:
        by_command[frames[1]] = frames
    assert set(by_command) == {p.REPLY, p.REPLY_BATCH}
    assert by_command[p.REPLY][3] is big  # the payload passes through uncopied
    replies = h.take_replies()
    assert sorted((reply.request_id, len(payload)) for _, reply, payload in replies) == [(small, 5), (large, len(big))]
    h.assert_baseline()


def test_errors_for_calls_of_a_client_that_reads_batches_are_answered_in_one():
    h = Harness()
    h.ready(b"w", capacity=1)
    busy = h.call(b"other")
    [queued] = h.call_batch(b"c", [b"a"], deadline_ms=100)  # waits for the busy worker, and expires
    h.advance(0.2)
    unknown = h.call(b"c", service="nobody.S", reads_batches=True)  # refused on arrival
    [in_batch] = h.call_batch(b"c", [b"b"], service="nobody.S")  # no flag: the batch is the sign
    commands = []
    replies = [(reply.request_id, reply.code) for _, reply, _ in h.take_replies(commands)]
    assert replies == [(queued, StatusCode.DEADLINE_EXCEEDED), (unknown, StatusCode.NOT_FOUND),
                       (in_batch, StatusCode.NOT_FOUND)]
    assert commands == [p.REPLY_BATCH] * 3
    [(_, header, _)] = h.take_requests()
    h.reply_from(b"w", header.request_id)
    assert [reply.request_id for _, reply, _ in h.take_replies()] == [busy]
    h.assert_baseline()


def test_a_client_batch_over_the_frame_limit_is_refused_with_an_answer_for_each_call():
    h = Harness(max_frames=p.MIN_FRAMES_LIMIT + 1)  # at most 257 calls per batch
    h.ready(b"w", capacity=1000, batches=True)
    ids = h.call_batch(b"c", [b""] * 258)
    assert h.take_requests() == []
    replies = h.take_replies()
    assert [reply.request_id for _, reply, _ in replies] == ids
    assert {reply.code for _, reply, _ in replies} == {StatusCode.RESOURCE_EXHAUSTED}
    assert "258 calls (limit 257)" in replies[0][1].message
    assert h.engine.counters["malformed_too_many_calls"] == 1
    h.assert_baseline()


@pytest.mark.parametrize("body, reason", [
    ([b"\xff\xff\xff"], "bad_batch"),
    ([b"\x0a" * (p.MAX_BATCH_BYTES + 1)], "too_large"),
    ([b"a", b"b"], "bad_frame_count"),
])
def test_a_malformed_client_batch_is_answered(body, reason):
    h = Harness()
    h.ready(b"w", batches=True)
    h.engine.on_frontend(b"c", [p.TAG, p.REQUEST_BATCH, *body], h.now)
    h.engine.flush()
    [(_, reply, _)] = h.take_replies()
    assert reply.request_id == 0 and reply.code in (StatusCode.INVALID_ARGUMENT, StatusCode.RESOURCE_EXHAUSTED)
    assert h.engine.counters[f"malformed_{reason}"] == 1
    h.assert_baseline()


def test_a_bad_header_in_a_reply_batch_costs_only_its_own_reply():
    h = Harness()
    h.ready(b"w", capacity=2, batches=True)
    first, second = h.call(b"c"), h.call(b"c")
    ids = [header.request_id for _, header, _ in h.take_requests()]
    h.backend(b"w", p.batch_message(p.REPLY_BATCH, [b"\xff\xff", p.encode_reply_header(ids[1])], [b"", b"two"]))
    [(_, reply, payload)] = h.take_replies()
    assert (reply.request_id, payload) == (second, b"two")
    assert h.engine.counters["malformed_bad_header"] == 1
    h.backend(b"w", _batch_reply([ids[0]], [b"one"]))
    assert [(r.request_id, pl) for _, r, pl in h.take_replies()] == [(first, b"one")]
    h.assert_baseline()


def test_a_round_of_calls_larger_than_a_batch_frame_is_split_into_several():
    h = Harness()
    h.ready(b"w", capacity=64, batches=True)
    payload = b"x" * (p.BATCH_CALL_BYTES - 200)  # just small enough to be batched
    pairs = [(p.RequestHeader(request_id=i, service="svc.S", method="M", deadline_ms=5000).SerializeToString(), payload)
             for i in range(1, 41)]
    h.engine.on_frontend(b"c", p.request_message(pairs), h.now)
    h.engine.flush()
    messages = [frames for _, frames in h.engine.backend_out]
    assert {frames[1] for frames in messages} == {p.REQUEST_BATCH}
    per_frame = p.MAX_BATCH_BYTES // (len(pairs[0][0]) + len(payload) + 8)  # as many as fit
    assert len(messages) == -(-40 // per_frame) > 1
    assert all(len(frames[2]) <= p.MAX_BATCH_BYTES for frames in messages)
    assert len(h.take_requests()) == 40


@pytest.mark.parametrize("then, answer", [
    # §11: once the worker has the drain acknowledgement, every request it will get has arrived.
    (lambda engine, now: engine.on_backend(b"w", p.disconnect_message("stopping", drain=True), now), p.DISCONNECT),
    # §8: a CANCEL for a dispatch id the worker has not seen yet would be ignored.
    (lambda engine, now: engine.on_frontend(b"c", p.cancel_message([7]), now), p.CANCEL),
])
@pytest.mark.parametrize("batches", [False, True])
def test_what_the_broker_says_after_a_dispatch_in_the_same_round_follows_the_request(then, answer, batches):
    h = Harness()
    h.ready(b"w", capacity=4, batches=batches)
    header = p.RequestHeader(request_id=7, service="svc.S", method="M", deadline_ms=5000)
    h.engine.on_frontend(b"c", p.request_message([(header.SerializeToString(), b"")]), h.now)
    then(h.engine, h.now)  # same round: nothing flushed in between
    h.engine.flush()
    commands = [frames[1] for _, frames in h.engine.backend_out]
    assert commands == [p.REQUEST_BATCH if batches else p.REQUEST, answer]


def test_batches_hold_at_most_half_the_frame_limit_in_calls():
    h = Harness(max_frames=p.MIN_FRAMES_LIMIT + 1)  # 257 calls per batch
    h.ready(b"w", capacity=600, batches=True)
    for i in range(1, 601):
        header = p.RequestHeader(request_id=i, service="svc.S", method="M", deadline_ms=5000)
        h.engine.on_frontend(b"c", p.request_message([(header.SerializeToString(), b"")]), h.now)
    h.engine.flush()
    assert [len(p.batch_pairs(frames[2:])) for _, frames in h.engine.backend_out] == [257, 257, 86]


@pytest.mark.parametrize("max_frames", [1, 4, p.MIN_FRAMES_LIMIT - 1])
def test_a_frame_limit_below_what_a_peer_sends_in_one_message_is_refused(max_frames):
    """Clients and workers put up to MAX_CALLS_PER_MESSAGE calls in one message: under a lower
    limit the broker would refuse such a message whole."""
    with pytest.raises(ValueError, match=f"max_frames must be at least {p.MIN_FRAMES_LIMIT}"):
        BrokerConfig(max_frames=max_frames).validate()


def test_the_largest_client_request_and_worker_reply_pass_a_broker_at_the_lowest_frame_limit():
    from zrpc._client._core import MAX_PAIRS_PER_MESSAGE
    from zrpc._worker._link import MAX_PAIRS_PER_REPLY

    count = MAX_PAIRS_PER_MESSAGE
    assert count == MAX_PAIRS_PER_REPLY == p.MAX_CALLS_PER_MESSAGE
    h = Harness(max_frames=p.MIN_FRAMES_LIMIT)
    h.ready(b"w", capacity=count)
    pairs = [(p.RequestHeader(request_id=i, service="svc.S", method="M", deadline_ms=5000).SerializeToString(), b"q")
             for i in range(1, count + 1)]
    h.engine.on_frontend(b"c", p.request_message(pairs), h.now)
    h.engine.flush()
    requests = h.take_requests()
    assert len(requests) == count
    h.backend(b"w", p.reply_message((p.encode_ok_reply_header(header.request_id), b"r") for _, header, _ in requests))
    replies = h.take_replies()
    assert sorted(reply.request_id for _, reply, _ in replies) == list(range(1, count + 1))
    assert all(reply.code == StatusCode.OK for _, reply, _ in replies)


def test_a_call_with_a_large_header_keeps_its_own_frames():
    h = Harness()
    h.ready(b"w", capacity=4, batches=True)
    header = p.RequestHeader(request_id=1, service="svc.S", method="M", deadline_ms=5000,
                             metadata={"k": "v" * (p.MAX_HEADER_BYTES - 150)})
    assert len(header.SerializeToString()) + 200 >= p.BATCH_CALL_BYTES
    h.engine.on_frontend(b"c", p.request_message([(header.SerializeToString(), b"s" * 200)]), h.now)
    h.engine.flush()
    [(_, frames)] = h.engine.backend_out
    assert frames[1] == p.REQUEST and frames[3] == b"s" * 200


def test_batch_messages_fit_the_frame_cap_and_keep_every_call_in_order():
    # Tiny entries: the per-entry overhead decides how many fit, and must not be underestimated.
    headers = [b"h%d" % i for i in range(120_000)]
    payloads = [b"p"] * len(headers)
    messages = p.batch_messages(p.REPLY_BATCH, headers, payloads, max_calls=1_000_000)
    assert len(messages) > 1 and all(len(frames[2]) <= p.MAX_BATCH_BYTES for frames in messages)
    assert [h for frames in messages for h, _ in p.batch_pairs(frames[2:])] == headers
    assert p.batch_messages(p.REPLY_BATCH, [], [], max_calls=8) == []
    with pytest.raises(ValueError):
        p.batch_messages(p.REPLY_BATCH, headers[:1], payloads[:1], max_calls=0)


class _RevokedClients:
    """An access policy (zrpc._security.AccessPolicy's shape) that admits no client key."""

    def client_allowed(self, key) -> bool:
        return False


def test_a_revoked_client_s_batch_gets_an_answer_for_each_call():
    h = Harness()
    h.ready(b"w", batches=True)
    h.engine.policy = _RevokedClients()
    ids = h.call_batch(b"c", [b"a", b"b"])
    replies = h.take_replies()
    assert [reply.request_id for _, reply, _ in replies] == ids
    assert {reply.code for _, reply, _ in replies} == {StatusCode.UNAUTHENTICATED}
    assert h.take_requests() == []


def test_a_drain_notice_goes_to_each_client_heard_from_lately_and_old_ones_are_forgotten():
    h = Harness()
    h.ready(b"w1")
    h.call(b"old")
    h.advance(400.0)
    h.call(b"new")
    h.advance(300.0)  # "old" was last heard 700 s ago: forgotten; "new" 300 s ago: kept
    h.take_requests()
    h.take_replies()  # their deadlines passed meanwhile
    assert list(h.engine.recent_clients) == [b"new"]
    assert h.engine.notify_draining() == 1
    [(client, frames)] = h.engine.frontend_out
    assert client == b"new" and frames[1] == p.DISCONNECT and p.decode_disconnect_message(frames[2:]).drain


def test_a_client_on_the_backend_is_told_and_logged_as_one(caplog):
    h = Harness()
    header = p.RequestHeader(request_id=1, service="svc.S", method="M", deadline_ms=1000).SerializeToString()
    h.backend(b"lost-client", p.request_message([(header, b"")]))
    [(peer, frames)] = h.take_control(p.DISCONNECT)
    assert peer == b"lost-client" and p.decode_disconnect_message(frames[2:]).drain is False  # "a backend"
    assert any("a client connected to the backend? clients use the frontend" in r.getMessage()
               for r in caplog.records)


def test_a_worker_on_the_frontend_is_logged_as_one(caplog):
    # The tester's worker given the frontend: its heartbeats were logged "command HEARTBEAT is
    # not allowed from this peer" with no word of the likely mistake.
    h = Harness()
    h.engine.on_frontend(b"lost-worker", p.heartbeat_message(), h.now)
    h.engine.flush()
    [(_, reply, _)] = h.take_replies()
    assert reply.code == StatusCode.INVALID_ARGUMENT
    assert "a worker connected to the frontend? workers use the backend" in reply.message
    assert any("a worker connected to the frontend?" in r.getMessage() for r in caplog.records)


def test_log_lines_tell_the_connections_of_one_worker_name_apart(caplog):
    """A worker stopped and resumed (SIGSTOP, SIGCONT) reconnects with a new socket: its new
    connection joins before its old one expires, and both lines carry its name (which is not
    unique anyway): each also names its connection."""
    h = Harness()
    with caplog.at_level(logging.INFO, logger="zrpc.broker"):
        h.ready(b"old", name="vm:7", heartbeat_ms=100)
        h.advance(0.2)
        h.ready(b"new", name="vm:7", heartbeat_ms=100)
        h.advance(0.15)  # the old connection is past 3 x 100 ms of silence, the new one is not
    lines = [r.getMessage() for r in caplog.records if "vm:7" in r.getMessage()]
    assert len(lines) == 3, lines
    assert lines[0].startswith(f"worker vm:7 joined (connection {b'old'.hex()}): ")
    assert lines[1].startswith(f"worker vm:7 joined (connection {b'new'.hex()}): ")
    assert lines[2] == f"worker vm:7 (connection {b'old'.hex()}) expired: silent for 0.350s"
    assert list(h.engine.workers) == [b"new"]


def test_which_field_changes_the_live_workers_could_not_read():
    from zrpc._descriptors import incompatibility

    T = descriptor_pb2.FieldDescriptorProto

    def file(*fields, nested=(), enums=()) -> bytes:
        req = descriptor_pb2.DescriptorProto(name="Req", field=list(fields), nested_type=list(nested))
        return descriptor_pb2.FileDescriptorProto(name="svc.proto", package="svc", message_type=[req],
                                                  enum_type=list(enums)).SerializeToString()

    def field(type_, type_name="", label=T.LABEL_OPTIONAL, name="f"):
        return T(name=name, number=1, type=type_, type_name=type_name, label=label)

    alike = [  # (old, new): protobuf reads each as the other
        (field(T.TYPE_INT32), field(T.TYPE_INT64, name="renamed")),
        (field(T.TYPE_STRING), field(T.TYPE_BYTES)),
        (field(T.TYPE_MESSAGE, ".svc.Item"), field(T.TYPE_MESSAGE, ".svc.Thing")),  # a message type renamed
        (field(T.TYPE_MESSAGE, ".svc.Req.CountsEntry", T.LABEL_REPEATED),  # a map renamed
         field(T.TYPE_MESSAGE, ".svc.Req.TalliesEntry", T.LABEL_REPEATED)),
        (field(T.TYPE_ENUM, ".svc.Kind"), field(T.TYPE_ENUM, ".svc.Sort")),
        (field(T.TYPE_MESSAGE, ".svc.Item"), field(T.TYPE_BYTES)),
        (field(T.TYPE_STRING), field(T.TYPE_STRING, label=T.LABEL_REPEATED)),
    ]
    for old, new in alike:
        assert incompatibility(file(new), file(old)) is None, (old, new)
    apart = [
        (field(T.TYPE_INT32), field(T.TYPE_STRING), "field 1 of svc.Req is string f, where the live workers' is int32 f"),
        (field(T.TYPE_INT32, label=T.LABEL_REPEATED), field(T.TYPE_INT32), "is int32 f, where the live workers' is repeated int32 f"),
        (field(T.TYPE_STRING), field(T.TYPE_MESSAGE, ".svc.Item"), "is svc.Item f"),
        (field(T.TYPE_SINT32), field(T.TYPE_INT32), "is int32 f, where the live workers' is sint32 f"),
    ]
    for old, new, said in apart:
        problem = incompatibility(file(new), file(old))
        assert problem is not None and said in problem, (old, new, problem)
    # Nested messages are compared too, by their full names.
    inner_old = descriptor_pb2.DescriptorProto(name="Inner", field=[field(T.TYPE_DOUBLE)])
    inner_new = descriptor_pb2.DescriptorProto(name="Inner", field=[field(T.TYPE_FLOAT)])
    assert "field 1 of svc.Req.Inner" in incompatibility(file(nested=[inner_new]), file(nested=[inner_old]))


def test_a_queued_call_whose_deadline_passed_before_a_late_round_is_never_dispatched():
    """The loop reads a worker's reply in a round that comes after a queued call's deadline (a
    GC pause, a starved CPU), before that round's tick: the freed slot must not get it (§12)."""
    h = Harness()
    h.ready(b"w", capacity=1)
    first = h.call(b"c", deadline_ms=10_000)
    late = h.call(b"c", deadline_ms=100)
    [(_, header, _)] = h.take_requests()
    h.now += 0.5  # no tick in between
    h.reply_from(b"w", header.request_id)
    assert h.take_requests() == []  # the slot stays free
    replies = {r.request_id: r for _, r, _ in h.take_replies()}
    assert replies[first].code == StatusCode.OK
    assert replies[late].code == StatusCode.DEADLINE_EXCEEDED and "while queued" in replies[late].message
    assert h.take_control(p.CANCEL) == []
    h.advance(0.0)  # the tick finds nothing left to expire: one answer each
    assert h.take_replies() == [] and h.engine.calls_held == 0


def test_queued_calls_cancelled_or_expired_by_the_thousand_leave_the_queue_in_order():
    """Calls taken out of the middle of a long queue (a client's CANCEL of all its calls, a batch
    of short deadlines) are counted out at once; the others keep their order and are served."""
    h = Harness(queue_size=20_000)
    h.ready(b"w", capacity=1)
    h.call(b"busy", deadline_ms=600_000)  # holds the only slot
    [(_, busy, _)] = h.take_requests()
    kept = []
    leaving = []
    for i in range(3_000):
        kept.append(h.call(b"long", deadline_ms=600_000))
        leaving.append(h.call(b"quits", deadline_ms=600_000))
    short = [h.call(b"short", deadline_ms=1_000) for _ in range(2_000)]
    queue = h.engine.services["svc.S"].queue
    assert len(queue) == 8_000
    h.engine.on_frontend(b"quits", p.cancel_message(leaving[::-1]), h.now)
    assert len(queue) == 5_000 and h.engine.queue_depth() == 5_000
    h.advance(1.5)  # the short ones expire while queued
    assert len(queue) == 3_000
    codes = [r.code for _, r, _ in h.take_replies()]
    assert codes == [StatusCode.DEADLINE_EXCEEDED] * len(short)  # cancelled calls get no answer (§8)
    served = []
    h.reply_from(b"w", busy.request_id)
    for _ in range(3_000):
        [(_, header, _)] = h.take_requests()
        served.append(header.request_id)
        h.reply_from(b"w", header.request_id)
    assert len(served) == 3_000 and h.take_requests() == [] and len(queue) == 0
    answered = [r.request_id for client, r, _ in h.take_replies() if client == b"long"]
    assert answered == kept  # in arrival order


def test_a_service_whose_only_workers_drain_is_unavailable_after_the_wait():
    """A draining worker takes no calls (§11): with no other, queued calls get UNAVAILABLE after
    unavailable_wait (§10) instead of waiting for it to leave or for their deadlines."""
    h = Harness(unavailable_wait=2.0)
    h.ready(b"w", capacity=4, heartbeat_ms=60_000)
    h.call(b"c", deadline_ms=600_000)  # a long call it keeps running while it drains
    h.backend(b"w", p.disconnect_message("draining", drain=True))
    h.take_requests()
    waiting = h.call(b"c", deadline_ms=60_000)
    h.advance(1.0)
    assert h.take_replies() == []
    h.advance(1.1)
    [(_, reply, _)] = h.take_replies()
    assert (reply.request_id, reply.code) == (waiting, StatusCode.UNAVAILABLE)
    assert dict(reply.details) == p.NOT_RUN and "no live worker" in reply.message


def test_services_left_without_worker_or_call_make_room_for_new_ones_at_the_limit():
    h = Harness(max_services=3)
    for version in range(3):  # versioned names, as the README advises for a changed contract
        h.ready(b"v%d" % version, services=(f"svc.V{version}",))
        h.now += 1.0
        h.backend(b"v%d" % version, p.disconnect_message("stopping"))
    h.ready(b"new", services=("svc.New",))  # the oldest idle one, V0, is forgotten for it
    assert b"new" in h.engine.workers and h.take_control(p.DISCONNECT) == []
    assert set(h.engine.services) == {"svc.V1", "svc.V2", "svc.New"}
    h.call(b"c", service="svc.V0")
    assert [r.code for _, r, _ in h.take_replies()] == [StatusCode.NOT_FOUND]
    waiting = h.call(b"c", service="svc.V2")  # known still: it waits for a worker
    for name in (b"a", b"b"):  # both live now: nothing idle is left to forget
        h.ready(name, services=(f"svc.{name.decode()}",))
    assert b"b" not in h.engine.workers
    [(_, refusal)] = h.take_control(p.DISCONNECT)
    assert "limit 3" in p.decode_disconnect(refusal[2:])
    assert "svc.V2" in h.engine.services and h.take_replies() == [] and waiting


def test_the_free_index_picks_the_worker_a_scan_of_every_worker_picks():
    """Services with many workers find the most free one in an index (§12): driven by the same
    random joins, calls, replies, capacity offers, drains and departures, an engine that
    always indexes sends every call to the same worker as one that always scans."""
    import random

    rng = random.Random(20261203)
    scanning, indexing = Harness(queue_size=100_000), Harness(queue_size=100_000)
    scanning.engine._INDEX_FROM = 10**9
    indexing.engine._INDEX_FROM = 1
    both = (scanning, indexing)
    live: list[bytes] = []
    held: dict[bytes, list[int]] = {}
    joined = 0
    for step in range(3_000):
        roll = rng.random()
        if roll < 0.05 or len(live) < 3:
            joined += 1
            name = b"w%d" % joined
            capacity = rng.randint(1, 6)
            for h in both:
                h.ready(name, capacity=capacity, heartbeat_ms=600_000)
            live.append(name)
            held[name] = []
        elif roll < 0.08:
            name = live.pop(rng.randrange(len(live)))
            message = rng.choice([p.disconnect_message("bye"), p.disconnect_message("draining", drain=True)])
            for h in both:
                h.backend(name, message)
            if message[2:] and p.decode_disconnect_message(message[2:]).drain:
                live.append(name)  # it stays, taking nothing new
        elif roll < 0.10:
            name = rng.choice(live)
            offer = p.capacity_message(rng.randint(0, 6))
            for h in both:
                h.backend(name, offer)
        elif roll < 0.55:
            for h in both:
                h.call(b"c", deadline_ms=600_000)
        else:
            busy = [name for name in live if held[name]]
            if busy:
                name = rng.choice(busy)
                dispatch_id = held[name].pop(rng.randrange(len(held[name])))
                for h in both:
                    h.reply_from(name, dispatch_id)
        sent = [[(worker, header.request_id) for worker, header, _ in h.take_requests()] for h in both]
        assert sent[0] == sent[1], f"step {step}"
        for worker, dispatch_id in sent[0]:
            held.setdefault(worker, []).append(dispatch_id)
        assert [r.request_id for _, r, _ in scanning.take_replies()] == \
            [r.request_id for _, r, _ in indexing.take_replies()]
    assert joined > 50 and indexing.engine.services["svc.S"].free_index is not None


def test_one_proto_generated_from_two_include_paths_is_one_definition(caplog):
    """protoc -I. names the file mysvc/calc.proto, -Imysvc calc.proto (and its imports alike):
    the same service, no warning, one definition (a tester was warned of another)."""
    def generated(path: str, imports: list[str]) -> bytes:
        return descriptor_pb2.FileDescriptorSet(file=[descriptor_pb2.FileDescriptorProto(
            name=path, package="svc", dependency=imports,
            message_type=[descriptor_pb2.DescriptorProto(name="Req")],
            service=[descriptor_pb2.ServiceDescriptorProto(name="S", method=[
                descriptor_pb2.MethodDescriptorProto(name="M", input_type=".svc.Req", output_type=".svc.Req")])],
        )]).SerializeToString()

    h = Harness()
    h.ready(b"a", fds=generated("mysvc/calc.proto", ["mysvc/common.proto"]))
    h.ready(b"b", fds=generated("calc.proto", ["common.proto"]))
    assert "another definition" not in caplog.text
    assert len(h.engine.services["svc.S"].definitions) == 1


def test_a_worker_serving_two_services_that_leaves_is_never_chosen_again():
    """Review: removing X (services A and B) dispatched A's requeued call before X left B, and a
    rebuild of B's free index then held X; the next B call went to the departed worker."""
    h = Harness()
    h.ready(b"X", services=("svc.A", "svc.B"), capacity=10, heartbeat_ms=600_000)
    h.ready(b"w2", services=("svc.A", "svc.B"), capacity=3, heartbeat_ms=600_000)
    for i in range(15):
        h.ready(b"b%d" % i, services=("svc.B",), capacity=1, heartbeat_ms=600_000)
    assert h.engine.services["svc.B"].free_index is not None
    h.call(b"c", service="svc.A", idempotent=True)
    assert [w for w, _, _ in h.take_requests()] == [b"X"]
    index = h.engine.services["svc.B"].free_index
    while len(index) <= 4 * 17 + 64:  # at the rebuild threshold: w2's next entry rebuilds it
        h.backend(b"b0", p.capacity_message(1))
        index = h.engine.services["svc.B"].free_index
    h.backend(b"X", p.disconnect_message("bye"))
    assert [w for w, _, _ in h.take_requests()] == [b"w2"]  # the A call again
    for _ in range(20):
        h.call(b"c", service="svc.B")
    assert b"X" not in {w for w, _, _ in h.take_requests()}


def test_a_free_index_stays_bounded_while_workers_come_and_go_without_calls():
    h = Harness()
    for i in range(16):
        h.ready(b"w%d" % i, capacity=2, heartbeat_ms=600_000)
    for i in range(500):
        h.ready(b"flap%d" % i, capacity=2, heartbeat_ms=600_000)
        h.backend(b"flap%d" % i, p.disconnect_message("bye"))
    assert len(h.engine.services["svc.S"].free_index) <= 4 * 17 + 65


def test_a_refused_ready_is_logged_as_such_under_the_workers_name(caplog):
    h = Harness(max_services=1)
    h.ready(b"w1", services=("svc.A",))
    with caplog.at_level("WARNING", logger="zrpc.broker"):
        h.ready(b"w2", services=("svc.B",), name="host:42:kv")
    assert "refused worker 'host:42:kv' (connection 7732) offering 'svc.B': broker knows 1 services (limit 1)" \
        in caplog.text
    # Its words are quoted and bounded (review: a name with a newline forged log lines, and
    # 200,000 services made one line of 2.6 MB); the same service twice counts once.
    h.ready(b"w3", services=[f"svc.X{i}" for i in range(10_000)], name="evil\nINFO forged")
    line = caplog.records[-1].getMessage()
    assert "\n" not in line and "'evil\\nINFO forged'" in line and "and 9995 more" in line and len(line) < 2_000
    h.backend(b"w1", p.disconnect_message("bye"))
    h.ready(b"w4", services=("svc.C", "svc.C"))
    assert b"w4" in h.engine.workers


def test_a_ready_naming_an_idle_service_at_the_limit_keeps_it_and_forgets_another():
    h = Harness(max_services=2)
    for name in ("A", "B"):
        h.ready(name.encode(), services=(f"svc.{name}",))
        h.now += 1.0
        h.backend(name.encode(), p.disconnect_message("stopping"))
    h.ready(b"ac", services=("svc.A", "svc.C"))  # review: A was forgotten and made again: 3 services
    assert set(h.engine.services) == {"svc.A", "svc.C"} and b"ac" in h.engine.workers


def test_a_requeued_call_that_finds_no_worker_is_not_marked_as_never_run():
    """It was at a worker that died: it may have run there (§10 marks only calls no worker had)."""
    h = Harness(unavailable_wait=1.0)
    h.ready(b"w", heartbeat_ms=100)
    h.call(b"c", idempotent=True)
    h.take_requests()
    h.advance(0.5)  # w expires; the call goes back to the queue, and no worker is left
    h.advance(1.1)
    [(_, reply, _)] = h.take_replies()
    assert reply.code == StatusCode.UNAVAILABLE and p.RETRY_DETAIL not in reply.details


def test_a_clients_cancel_at_its_deadlines_is_counted_deadline_exceeded_and_passed_on_so():
    h = Harness()
    h.ready(b"w", capacity=1)
    at_worker, queued, cancelled = h.call(b"c"), h.call(b"c"), h.call(b"c")
    h.take_requests()
    h.engine.on_frontend(b"c", p.cancel_message([at_worker, queued], deadline=True), h.now)
    h.engine.on_frontend(b"c", p.cancel_message([cancelled]), h.now)
    h.engine.flush()
    assert h.take_replies() == []  # the client has given them up: no answer (§8)
    counters = h.engine.counters
    assert (counters["deadline_exceeded"], counters["code_DEADLINE_EXCEEDED"], counters["cancelled"]) == (2, 2, 1)
    [(_, frames)] = h.take_control(p.CANCEL)
    assert p.decode_cancel(frames[2:]).deadline  # the worker answers DEADLINE_EXCEEDED too


def test_a_full_queue_is_said_once_per_service_not_once_per_refused_call(caplog):
    h = Harness(queue_size=1)
    h.ready(b"w", services=("svc.S", "svc.T"), capacity=1)
    with caplog.at_level("WARNING", logger="zrpc.broker"):
        for service in ("svc.S", "svc.T"):
            for _ in range(7):
                h.call(b"c", service=service)
    said = [r.getMessage() for r in caplog.records if "is full" in r.getMessage()]
    assert said == ["queue of service svc.S is full (1 calls): refusing calls",
                    "queue of service svc.T is full (1 calls): refusing calls"]
    assert h.engine.counters["queue_full"] == 11  # 5 for S (w took one); 6 for T (w was busy)


def test_suppressed_warnings_are_counted_when_their_window_ends_not_at_the_next_one(caplog):
    """A tester's 57,710 suppressed too_large warnings were reported 20 s late, by the next
    oversized call, as "in the last 10s" (and without one, never): the tick reports them."""
    from zrpc._broker._engine import _RateLimitedWarnings

    clock = [100.0]
    warnings = _RateLimitedWarnings(logging.getLogger("zrpc.test.ratelimit"), burst=2, window=10.0,
                                    clock=lambda: clock[0])
    with caplog.at_level(logging.WARNING, logger="zrpc.test.ratelimit"):
        for n in range(5):
            warnings.warn("too_large", "message %d too large", n)
        clock[0] = 105.0
        warnings.flush()  # the window has not ended
        assert [r.getMessage() for r in caplog.records] == ["message 0 too large", "message 1 too large"]
        clock[0] = 110.5
        warnings.flush()
        assert caplog.records[-1].getMessage() == "3 more too_large messages suppressed in the last 10s"
        assert caplog.records[-1].suppressed == 3
        clock[0] = 125.0
        warnings.flush()
        warnings.warn("too_large", "message %d too large", 5)  # a new window, nothing left to report
    assert [r.getMessage() for r in caplog.records][2:] == ["3 more too_large messages suppressed in the last 10s",
                                                            "message 5 too large"]


def test_no_routing_id_reaches_a_peer_a_worker_without_a_name_is_listed_by_number():
    """libzmq gives connections routing ids in sequence and does not check a peer's own id
    against the ones it will give: an adversarial tester read a worker's id in a client's error
    message, connected with the next ids, and libzmq aborted the broker at the next worker's
    connection. A worker whose READY has no name was listed under its routing id."""
    from zrpc import broker_service_pb2 as bpb

    h = Harness()
    for identity in (b"\x00\x12\x34\x56\x78", b"\x00\x12\x34\x56\x79"):  # routing ids as libzmq makes them
        h.backend(identity, p.ready_message(p.Ready(services=["svc.S"], capacity=1, heartbeat_ms=1000)))
    h.call(b"c1", service=SERVICE, method="ListServices", payload=b"")
    (_, header, payload), = h.take_replies()
    listed = bpb.ListServicesReply.FromString(payload)
    [service] = [s for s in listed.services if s.name == "svc.S"]
    assert sorted(w.name for w in service.workers) == ["unnamed-1", "unnamed-2"]
    ran = h.call(b"c1")  # delivered: then its worker is found gone, and the call fails
    (worker, _, _), = h.take_requests()
    h.engine.on_undeliverable([(worker, [p.TAG, p.HEARTBEAT])], h.now)
    h.engine.flush()
    (_, reply, _), = h.take_replies()
    assert reply.request_id == ran and reply.code == StatusCode.UNAVAILABLE
    assert reply.message.startswith("worker unnamed-") and worker.hex() not in reply.message, reply.message


def test_list_services_counts_the_slots_held_by_calls_answered_without_their_worker():
    """An adversarial tester's worker hung in its handlers: its calls were answered at their
    deadlines, their slots stayed taken (§8), and ListServices said 0 in flight of 2, as if
    it were free. The slots now show as held until the worker replies."""
    from zrpc import broker_service_pb2 as bpb

    h = Harness()
    h.ready(b"w", capacity=2)
    h.call(b"c", deadline_ms=100)
    h.call(b"c", deadline_ms=100)
    ids = [header.request_id for _, header, _ in h.take_requests()]

    def listed() -> tuple[int, int, int]:
        h.call(b"c2", service=SERVICE, method="ListServices", payload=b"")
        (_, _, payload), = h.take_replies()
        info = {s.name: s for s in bpb.ListServicesReply.FromString(payload).services}["svc.S"]
        return info.in_flight, info.held_by_answered, info.workers[0].in_flight

    assert listed() == (2, 0, 2)
    h.advance(0.2)  # both answered DEADLINE_EXCEEDED by the broker; the worker has not replied
    assert sorted(reply.code for _, reply, _ in h.take_replies()) == [StatusCode.DEADLINE_EXCEEDED] * 2
    assert listed() == (0, 2, 2)
    h.reply_from(b"w", ids[0], code=StatusCode.DEADLINE_EXCEEDED)
    assert listed() == (0, 1, 1)


def test_a_request_whose_headers_come_to_more_than_a_mebibyte_is_refused_before_any_is_decoded():
    """An adversarial tester's REQUESTs of 1,000 headers, each 64 KiB of metadata entries (0.6 ms
    to decode), held the broker's loop 0.5 s each: another client's calls ran out of time. Such
    a REQUEST is refused whole, each of its calls answered under its id; zrpc's clients put at
    most 1 MiB of calls in one (the limit is one header more)."""
    h = Harness()
    h.ready(b"w", capacity=100)
    heavy = p.RequestHeader(service="svc.S", method="M", deadline_ms=5000,
                            metadata={"k%05d" % i: "" for i in range(5400)})
    pairs = []
    for request_id in range(1, 19):  # 18 of about 64,815 bytes: over 1 MiB and 64 KiB
        heavy.request_id = request_id
        pairs.append((heavy.SerializeToString(), b""))
    size = sum(len(raw) for raw, _ in pairs)
    h.engine.on_frontend(b"c", p.request_message(pairs), h.now)
    h.engine.flush()
    replies = h.take_replies()
    assert sorted(reply.request_id for _, reply, _ in replies) == list(range(1, 19))
    assert {reply.code for _, reply, _ in replies} == {StatusCode.RESOURCE_EXHAUSTED}
    assert f"the headers of one REQUEST come to {size} bytes (limit 1114112)" in replies[0][1].message
    assert h.take_requests() == [] and h.engine.counters["malformed_too_large"] == 1
    # One fewer fits: those run.
    h.engine.on_frontend(b"c", p.request_message(pairs[1:]), h.now)
    h.engine.flush()
    assert len(h.take_requests()) == 17


def test_the_client_never_puts_more_headers_in_a_request_than_a_broker_takes():
    """Review: the client counted a call's payload, not its header, against 1 MiB when it
    coalesced calls into a REQUEST of pairs: 18 calls of 60 KB of metadata came to 1,081,350
    bytes of headers, over the broker's limit then, and all 18 were refused."""
    from zrpc._client._core import ClientCore

    core = ClientCore(endpoints=["inproc://a"], retry=None)
    core.connection_up(0)
    for _ in range(40):
        call = core.prepare("svc.S", "M", b"", timeout=30.0, idempotent=False,
                            metadata={"k%05d" % i: "" for i in range(5000)}, decode=None)
        assert core.add(call) is None
    sent = 0
    for _ in range(40):
        request = core.next_request(core.clock())
        if request is None:
            break
        frames, calls = request
        assert frames[1] == p.REQUEST
        assert sum(map(len, frames[2::2])) + sum(map(len, frames[3::2])) <= 1 << 20
        sent += len(calls)
    assert sent == 40


def test_a_worker_takes_the_place_of_names_no_worker_offered_when_the_table_is_full():
    """Just after a broker started, an adversarial tester's calls to 1,100 made-up names held all
    of max_services until the grace ended: the real worker was refused ("broker knows 1000
    services") and retried later and later. Its READY now wins: a made-up name's calls are
    answered NOT_FOUND at once, as the grace's end would have."""
    h = Harness(max_services=3, unknown_service_grace=30.0)
    made_up = [h.call(b"c", service=f"junk.S{i}", deadline_ms=60_000) for i in range(3)]
    assert h.take_replies() == [] and len(h.engine.services) == 3  # they wait out the grace
    assert h.call(b"c", service="junk.S4", deadline_ms=60_000)
    [(_, refused, _)] = h.take_replies()
    assert refused.code == StatusCode.RESOURCE_EXHAUSTED  # calls do not push each other out
    h.ready(b"w", services=("svc.S",))
    assert b"w" in h.engine.workers and h.take_control(p.DISCONNECT) == []
    [(_, gone, _)] = h.take_replies()
    assert (gone.request_id, gone.code) == (made_up[0], StatusCode.NOT_FOUND)
    assert "no worker offers service 'junk.S0'" in gone.message
    h.call(b"c")
    assert len(h.take_requests()) == 1


def test_a_ready_refused_for_another_reason_pushes_no_name_out():
    """Review: room was made before the READY's descriptors were checked, so a READY refused as
    bad still ended a waiting name's calls NOT_FOUND (one more per retry of that worker)."""
    h = Harness(max_services=3, unknown_service_grace=30.0)
    for i in range(3):
        h.call(b"c", service=f"real.S{i}", deadline_ms=60_000)
    h.ready(b"w", services=("svc.S",), fds=b"\xff not a FileDescriptorSet")
    assert h.engine.counters["malformed_bad_descriptors"] == 1
    assert h.take_replies() == [] and sorted(h.engine.services) == ["real.S0", "real.S1", "real.S2"]
