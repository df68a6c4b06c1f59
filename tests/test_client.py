"""The clients (zrpc._client): the core with a fake clock, then both flavours on real sockets
against a fake broker (a ROUTER in a thread that answers per the spec)."""
from __future__ import annotations

import asyncio
import logging
import re
import threading
import time

import pytest
import zmq

from workers.echo import Echo
from zrpc import CircuitBreaker, Worker, _protocol, broker_service_pb2
from zrpc._client import AsyncClient, Client, RetryPolicy
from zrpc._client._core import MAX_PAIRS_PER_MESSAGE, ClientCore
from zrpc._client._stub import UnaryMethod
from zrpc._errors import Error
from zrpc._status import StatusCode

from ._fake_frontend import FakeFrontend
from .conftest import wait_for

BROKER_SERVICE = broker_service_pb2.DESCRIPTOR.services_by_name["Broker"]
WAIT = 5.0  # bound on every wait for a condition; tests normally finish in milliseconds


# -- the core, no sockets ----------------------------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def reply(request_id: int, code: StatusCode = StatusCode.OK, payload: bytes = b"", message: str = "") -> tuple:
    return _protocol.encode_reply_header(request_id, code, message), payload


def test_core_sends_remaining_deadline_measured_at_send():
    clock = FakeClock()
    core = ClientCore(clock=clock)
    call = core.prepare("a.S", "M", b"x", timeout=2.0)
    core.add(call)
    clock.now += 0.5
    frames, calls = core.next_request(clock())
    header = _protocol.decode_request_header(frames[2])
    assert calls == [call] and call.sent
    assert header.deadline_ms == 1480  # 20 ms short (spec §5: the broker answers an expired call first)
    assert (header.request_id, header.service, header.method, frames[3]) == (call.request_id, "a.S", "M", b"x")


def test_core_never_sends_a_deadline_below_one_millisecond():
    clock = FakeClock()
    core = ClientCore(clock=clock)
    core.add(core.prepare("a.S", "M", b"", timeout=0.0105))
    clock.now += 0.0104
    frames, _ = core.next_request(clock())
    assert _protocol.decode_request_header(frames[2]).deadline_ms == 1


def test_core_generates_a_trace_id_unless_the_caller_brings_one():
    core = ClientCore(metadata={"tenant": "t1"})
    generated = core.prepare("a.S", "M", b"").header.metadata
    assert len(generated["trace_id"]) == 32 and generated["tenant"] == "t1"
    assert core.prepare("a.S", "M", b"").header.metadata["trace_id"] != generated["trace_id"]
    given = core.prepare("a.S", "M", b"", metadata={"trace_id": "abc", "tenant": "t2"}).header.metadata
    assert dict(given) == {"trace_id": "abc", "tenant": "t2"}


def test_core_request_ids_are_unique_and_never_zero():
    core = ClientCore()
    ids = [core.prepare("a.S", "M", b"").request_id for _ in range(100)]
    assert len(set(ids)) == 100 and 0 not in ids


@pytest.mark.parametrize("timeout", [0, -1, float("inf"), float("nan"), "soon"])
def test_core_refuses_a_timeout_that_is_not_finite_and_positive(timeout):
    with pytest.raises(Error) as raised:
        ClientCore().prepare("a.S", "M", b"", timeout=timeout)
    assert raised.value.code == StatusCode.INVALID_ARGUMENT
    with pytest.raises(ValueError):
        ClientCore(default_timeout=timeout)


def test_core_refuses_metadata_that_is_not_strings():
    with pytest.raises(Error) as raised:
        ClientCore().prepare("a.S", "M", b"", metadata={"k": 1})
    assert raised.value.code == StatusCode.INVALID_ARGUMENT


def test_core_coalesces_unsent_calls_and_skips_cancelled_ones():
    core = ClientCore()
    calls = [core.prepare("a.S", "M", str(i).encode()) for i in range(MAX_PAIRS_PER_MESSAGE + 3)]
    for call in calls:
        core.add(call)
    assert core.cancel(calls[1].request_id) is calls[1]
    frames, first = core.next_request(core.clock())
    assert len(first) == MAX_PAIRS_PER_MESSAGE and calls[1] not in first
    assert frames[3] == b"0" and frames[5] == b"2"  # in order, pairs of (header, payload)
    _, rest = core.next_request(core.clock())
    assert rest == calls[-2:]
    assert core.next_request(core.clock()) is None


def test_core_unsent_calls_go_first_after_a_blocked_send():
    core = ClientCore()
    a, b = core.prepare("a.S", "M", b"a"), core.prepare("a.S", "M", b"b")
    core.add(a)
    _, batch = core.next_request(core.clock())
    core.add(b)
    core.unsend(batch)
    assert not a.sent
    assert core.next_request(core.clock())[1] == [a, b]


def test_core_settles_each_pair_of_a_reply_in_order_and_drops_the_rest(caplog):
    core = ClientCore()
    ok, failed = core.prepare("a.S", "M", b""), core.prepare("a.S", "M", b"")
    core.add(ok)
    core.add(failed)
    message = _protocol.reply_message([
        reply(ok.request_id, payload=b"done"),
        reply(0, StatusCode.INVALID_ARGUMENT, message="bad header"),
        reply(99999),  # unknown: a late reply
        reply(failed.request_id, StatusCode.NOT_FOUND, message="no such service"),
    ])
    with caplog.at_level(logging.DEBUG, logger="zrpc.client"):
        outcomes = core.handle_message(message, 0)
    assert [(o.call, o.value) for o in outcomes] == [(ok, b"done"), (failed, None)]
    assert outcomes[1].error.code == StatusCode.NOT_FOUND and outcomes[1].error.message == "no such service"
    assert core.in_flight == 0
    levels = {r.getMessage(): r.levelno for r in caplog.records}
    assert levels["broker rejected a message it could not attribute to a call: INVALID_ARGUMENT: bad header"] \
        == logging.WARNING
    assert levels["dropped a late reply for request 99999"] == logging.DEBUG


def test_core_sends_batches_over_a_link_once_its_broker_answered_in_one():
    core = ClientCore(endpoints=["inproc://a", "inproc://b"])
    first = core.prepare("a.S", "M", b"1")
    core.add(first)
    frames, _ = core.next_request(core.clock(), 0)
    assert frames[1] == _protocol.REQUEST  # until the broker shows it reads batches (spec §4c)
    assert _protocol.decode_request_header(frames[2]).reads_batches
    header, payload = reply(first.request_id, payload=b"one")
    [outcome] = core.handle_message(_protocol.batch_message(_protocol.REPLY_BATCH, [header], [payload]), 0)
    assert (outcome.call, outcome.value) == (first, b"one")
    calls = [core.prepare("a.S", "M", str(i).encode()) for i in range(3)]
    for call in calls:
        core.add(call)
    frames, sent = core.next_request(core.clock(), 0)
    assert frames[1] == _protocol.REQUEST_BATCH and sent == calls
    assert [payload for _, payload in _protocol.batch_pairs(frames[2:])] == [b"0", b"1", b"2"]
    core.add(core.prepare("a.S", "M", b"other"))
    assert core.next_request(core.clock(), 1)[0][1] == _protocol.REQUEST  # the other broker has not
    core.connection_closed(0, "inproc://a")  # a new connection may reach an older broker
    core.connection_up(0)
    core.add(core.prepare("a.S", "M", b"again"))
    assert core.next_request(core.clock(), 0)[0][1] == _protocol.REQUEST


def test_core_without_wait_for_broker_fails_calls_once_no_broker_accepts_a_connection():
    core = ClientCore(endpoints=["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"], wait_for_broker=False)
    waiting = core.prepare("a.S", "M", b"")
    assert core.add(waiting) is None  # no attempt has failed yet
    assert core.reconnect_scheduled(0) == []  # the other broker may still take it
    [failed] = core.reconnect_scheduled(1)
    assert failed.call is waiting and failed.error.code == StatusCode.UNAVAILABLE
    assert failed.error.message.startswith("cannot connect to the broker at tcp://127.0.0.1:1, tcp://127.0.0.1:2")
    assert core.in_flight == 0 and not core.has_unsent()
    refused = core.add(core.prepare("a.S", "M", b""))  # new calls fail at once, unsent
    assert refused is not None and refused.error.code == StatusCode.UNAVAILABLE
    core.connected(1)  # an attempt was accepted: calls wait for its handshake again
    assert core.add(core.prepare("a.S", "M", b"")) is None
    # A connection that was accepted and then closed (a broker gone, a CURVE handshake
    # refused) is not "nothing accepted it": ZeroMQ's retry after it fails no call.
    assert core.reconnect_scheduled(1) == []
    assert core.in_flight == 1


def test_core_without_wait_for_broker_a_replaced_socket_fails_calls_at_its_first_failed_attempt():
    core = ClientCore(endpoints=["ipc:///nowhere"], wait_for_broker=False)
    core.connected(0)
    core.connection_up(0)
    core.connection_closed(0, "ipc:///nowhere")  # the broker went: the flavour opens a new DEALER
    core.add(core.prepare("a.S", "M", b""))
    [failed] = core.reconnect_scheduled(0)  # the new socket's first attempt: nothing accepted it
    assert failed.error.code == StatusCode.UNAVAILABLE
    # A connection accepted, then closed before its handshake ended (a CURVE broker refusing a
    # plain client), is retried by the same DEALER: not a broker that is not there.
    core.connected(0)
    core.connection_closed(0, "ipc:///nowhere")
    assert core.add(core.prepare("a.S", "M", b"")) is None
    assert core.reconnect_scheduled(0) == []


def test_core_a_call_refused_as_unreachable_never_becomes_its_circuits_trial():
    now = [100.0]
    core = ClientCore(endpoints=["tcp://127.0.0.1:1"], wait_for_broker=False, clock=lambda: now[0], retry=None,
                      circuit_breaker=CircuitBreaker(failure_threshold=1, reset_timeout=1.0))
    core.connection_up(0)
    call = core.prepare("a.S", "M", b"")
    core.add(call)
    core.next_request(now[0], 0)
    header = _protocol.encode_reply_header(call.request_id, StatusCode.UNAVAILABLE, "boom", None)
    core.handle_message(_protocol.reply_message([(header, b"")]), 0)  # the circuit opens
    core.connection_closed(0, "tcp://127.0.0.1:1")
    core.reconnect_scheduled(0)  # and the broker is not there any more
    now[0] += 2.0  # the circuit's reset_timeout is over: its next call would be the trial
    refused = core.add(core.prepare("a.S", "M", b""))
    assert refused is not None and refused.error.message.startswith("cannot connect to the broker")
    core.connected(0)
    core.connection_up(0)
    assert core.add(core.prepare("a.S", "M", b"")) is None  # the trial, not "a trial is in flight"


def test_core_a_link_answered_by_a_brokers_backend_fails_its_calls_and_takes_no_more(caplog):
    core = ClientCore(endpoints=["inproc://back", "inproc://front"], retry=None)
    core.took(1)  # the next REQUEST goes to link 0
    call = core.prepare("a.S", "M", b"")
    core.add(call)
    assert core.next_request(core.clock(), 0) is not None
    refusal = _protocol.disconnect_message("refused: command REQUEST is not allowed")
    [failed] = core.handle_message(refusal, 0)  # what a backend answers a REQUEST with
    assert failed.call is call and failed.error.code == StatusCode.UNAVAILABLE
    assert failed.error.message.startswith("not a broker's frontend: inproc://back is a broker's backend")
    assert core.handle_message(refusal, 0) == []  # said once
    assert sum("answers like a broker's backend" in r.getMessage() for r in caplog.records) == 1
    assert list(core.link_order()) == [1]
    core.connection_closed(0, "inproc://back")
    core.connection_up(0)
    assert sorted(core.link_order()) == [0, 1]  # a new connection may reach a frontend


def test_core_with_only_a_backend_fails_calls_at_once_even_waiting_for_a_broker():
    core = ClientCore(endpoints=["inproc://back"])  # wait_for_broker and the default retries
    call = core.prepare("a.S", "M", b"", idempotent=True)
    core.add(call)
    core.next_request(core.clock(), 0)
    waiting = core.prepare("a.S", "M", b"")
    core.add(waiting)  # unsent when the backend answers
    [failed] = core.handle_message(_protocol.disconnect_message("refused: command REQUEST is not allowed"), 0)
    assert failed.call is waiting and failed.error.message.startswith("not a broker's frontend")
    [retried] = core.advance(core.clock() + 5.0)  # the idempotent call's retry: no broker for it either
    assert retried.call is call and retried.error.message.startswith("not a broker's frontend")
    refused = core.add(core.prepare("a.S", "M", b""))  # and the next call, at once
    assert refused is not None and refused.error.message.startswith("not a broker's frontend")


def test_core_a_call_a_backend_refused_goes_to_the_other_broker_even_if_not_idempotent():
    now = [100.0]
    core = ClientCore(endpoints=["inproc://back", "inproc://front"], clock=lambda: now[0])
    core.took(1)
    call = core.prepare("a.S", "M", b"")  # not idempotent: it never ran, so it may go again
    core.add(call)
    core.next_request(now[0], 0)
    assert core.handle_message(_protocol.disconnect_message("refused"), 0) == []  # re-queued, not failed
    now[0] += 5.0
    assert core.advance(now[0]) == []
    assert core.link_order() == [1]
    _, [again] = core.next_request(now[0], 1)
    assert again is call and call.attempt == 2


def test_core_a_drain_notice_stops_sends_to_that_broker_and_fails_nothing():
    core = ClientCore(endpoints=["inproc://a", "inproc://b"])
    core.took(1)
    call = core.prepare("a.S", "M", b"")
    core.add(call)
    core.next_request(core.clock(), 0)  # held by broker a, which then drains
    notice = _protocol.disconnect_message("broker is shutting down", drain=True)
    assert core.handle_message(notice, 0) == []  # the held call is still answered there
    assert core.link_order() == [1] and core.in_flight == 1
    core.connection_closed(0, "inproc://a")
    core.connection_up(0)
    assert sorted(core.link_order()) == [0, 1]  # its successor takes calls again


def test_core_waits_for_a_broker_by_default():
    core = ClientCore(endpoints=["tcp://127.0.0.1:1"])
    assert core.add(core.prepare("a.S", "M", b"")) is None
    assert core.reconnect_scheduled(0) == [] and core.reconnect_scheduled(0) == []
    assert core.add(core.prepare("a.S", "M", b"")) is None and core.in_flight == 2


def answer_in_a_batch(core: ClientCore, link: int = 0) -> None:
    """Send one call over ``link`` and answer it in a REPLY_BATCH: the link then batches (§4c)."""
    call = core.prepare("a.S", "M", b"")
    core.add(call)
    assert core.next_request(core.clock(), link) is not None
    header, payload = reply(call.request_id)
    [outcome] = core.handle_message(_protocol.batch_message(_protocol.REPLY_BATCH, [header], [payload]), link)
    assert outcome.call is call


def test_core_a_closed_connections_batch_read_late_leaves_the_next_connection_in_pairs():
    core = ClientCore(endpoints=["inproc://a"])
    call = core.prepare("a.S", "M", b"")
    core.add(call)
    core.next_request(core.clock(), 0)
    [lost] = core.connection_closed(0, "inproc://a")  # the broker went away with the call...
    assert lost.error.code == StatusCode.UNAVAILABLE
    core.connection_up(0)  # ...and another (maybe older) took the endpoint
    header, payload = reply(call.request_id)
    assert core.handle_message(_protocol.batch_message(_protocol.REPLY_BATCH, [header], [payload]), 0) == []
    core.add(core.prepare("a.S", "M", b"next"))
    assert core.next_request(core.clock(), 0)[0][1] == _protocol.REQUEST


def test_core_goes_back_to_pairs_when_a_batching_broker_answers_what_it_cannot_attribute():
    core = ClientCore(endpoints=["inproc://a"])
    answer_in_a_batch(core)
    core.handle_message(_protocol.error_reply(0, StatusCode.INVALID_ARGUMENT, "unknown command byte b'\\x07'"), 0)
    core.add(core.prepare("a.S", "M", b"next"))
    assert core.next_request(core.clock(), 0)[0][1] == _protocol.REQUEST


def test_core_batches_stay_within_the_batch_frame_and_a_large_call_goes_alone_in_pairs():
    core = ClientCore(endpoints=["inproc://a"])
    answer_in_a_batch(core)
    small = _protocol.BATCH_CALL_BYTES // 2
    calls = [core.prepare("a.S", "M", bytes(small)) for _ in range(13)]  # 7 of them fill a batch
    large = core.prepare("a.S", "M", bytes(_protocol.BATCH_CALL_BYTES))
    for call in calls[:4] + [large] + calls[4:]:
        core.add(call)
    messages = []
    while (request := core.next_request(core.clock(), 0)) is not None:
        messages.append(request)
    assert [(frames[1], len(sent)) for frames, sent in messages] == [
        (_protocol.REQUEST_BATCH, 4), (_protocol.REQUEST, 1), (_protocol.REQUEST_BATCH, 7),
        (_protocol.REQUEST_BATCH, 2)]
    assert messages[1][0][3] is large.payload  # not copied into a batch
    for frames, sent in messages:
        if frames[1] == _protocol.REQUEST_BATCH:
            assert len(frames[2]) <= _protocol.MAX_BATCH_BYTES
            assert len(_protocol.batch_pairs(frames[2:])) == len(sent)


def test_core_drops_a_message_that_breaks_the_spec(caplog):
    core = ClientCore()
    core.add(core.prepare("a.S", "M", b""))
    assert core.handle_message([b"MDPC01", _protocol.REPLY, b"", b""], 0) == []
    assert core.handle_message([_protocol.TAG, _protocol.REQUEST, b"", b""], 0) == []
    assert core.handle_message([_protocol.TAG, _protocol.REPLY, b""], 0) == []
    assert core.in_flight == 1 and len(caplog.records) == 3


def test_core_expires_calls_in_deadline_order_and_ignores_answered_ones():
    clock = FakeClock()
    core = ClientCore(clock=clock)
    slow, fast, answered = (core.prepare("a.S", "M", b"", timeout=t) for t in (3.0, 1.0, 2.0))
    for call in (slow, fast, answered):
        core.add(call)
    core.handle_message(_protocol.reply_message([reply(answered.request_id)]), 0)
    assert core.next_deadline() == fast.deadline
    assert core.expire(clock.now + 0.999) == []
    clock.now += 10
    outcomes = core.expire(clock())
    assert [o.call for o in outcomes] == [fast, slow]
    assert outcomes[0].error.code == StatusCode.DEADLINE_EXCEEDED
    assert outcomes[0].error.message.startswith("deadline of 1.000s exceeded calling a.S/M")
    assert core.next_deadline() is None


def test_core_deadline_heap_stays_proportional_to_calls_in_flight():
    core = ClientCore()
    calls = [core.prepare("a.S", "M", b"") for _ in range(1000)]
    for call in calls:
        core.add(call)
    core.handle_message(_protocol.reply_message([reply(c.request_id) for c in calls[:-10]]), 0)
    assert core.in_flight == 10 and len(core._deadlines) <= 64


def test_core_expired_calls_are_never_sent():
    clock = FakeClock()
    core = ClientCore(clock=clock)
    call = core.prepare("a.S", "M", b"", timeout=1.0)
    core.add(call)
    clock.now += 1.0
    assert core.next_request(clock()) is None
    assert [o.call for o in core.expire(clock())] == [call] and not call.sent


# -- a fake broker -------------------------------------------------------------------------------

class FakeBroker(FakeFrontend):
    """By method name: Echo answers OK with the payload, Fail<CODE> answers that code, Hang never
    answers, Garbage answers OK with bytes that are no protobuf message; zrpc.Broker/Health
    answers a HealthReply."""

    thread_name = "fake-broker"

    def answer(self, header, payload: bytes) -> tuple[bytes, bytes] | None:
        rid = header.request_id
        if header.service == "zrpc.Broker" and header.method == "Health":
            request = broker_service_pb2.HealthRequest.FromString(payload)
            answer = broker_service_pb2.HealthReply(status=broker_service_pb2.HealthReply.SERVING,
                                                    live_workers=len(request.service))
            return _protocol.encode_reply_header(rid), answer.SerializeToString()
        if header.method == "Echo":
            return _protocol.encode_reply_header(rid), payload
        if header.method == "Garbage":
            return _protocol.encode_reply_header(rid), b"\x0a\xff"
        if header.method.startswith("Fail"):
            code = StatusCode[header.method[len("Fail"):]]
            return _protocol.encode_reply_header(rid, code, "failed on purpose", {"why": "test"}), b""
        return None  # Hang


@pytest.fixture
def broker():
    fake = FakeBroker()
    yield fake
    fake.stop()


@pytest.fixture
def client(broker):
    with Client(broker.endpoint, timeout=WAIT) as c:
        yield c


# -- the blocking client --------------------------------------------------------------------------

@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_call_failed_at_its_deadline_is_cancelled_at_the_broker_as_a_deadline(broker, flavour):
    """(spec §8) The CANCEL says `deadline`: the broker counts the call DEADLINE_EXCEEDED as its
    caller saw it (a plain CANCEL was counted CANCELLED: a tester's 30 of 336), and a call that
    waited unread at a stopped broker is dropped, not run after its caller gave up (review)."""
    if flavour == "sync":
        with Client(broker.endpoint, timeout=WAIT) as client:
            with pytest.raises(Error) as caught:
                client.call("test.Svc", "Hang", b"", timeout=0.2)
    else:
        async def call() -> pytest.ExceptionInfo:
            async with AsyncClient(broker.endpoint, timeout=WAIT) as client:
                with pytest.raises(Error) as raised:
                    await client.call("test.Svc", "Hang", b"", timeout=0.2)
                return raised
        caught = asyncio.run(call())
    assert caught.value.code == StatusCode.DEADLINE_EXCEEDED
    request_id = broker.requests[0].request_id
    broker.wait_for(lambda: request_id in broker.cancels)
    assert broker.cancel_deadlines == [True]


def test_call_returns_the_reply_payload(client, broker):
    assert client.call("test.Svc", "Echo", b"hello", timeout=2.0) == b"hello"
    header = broker.requests[0]
    assert (header.service, header.method, header.idempotent) == ("test.Svc", "Echo", False)
    assert 0 < header.deadline_ms <= 2000 and len(header.metadata["trace_id"]) == 32


def test_call_sends_idempotent_flag_and_metadata(broker):
    with Client(broker.endpoint, metadata={"tenant": "t1"}) as c:
        c.call("test.Svc", "Echo", b"", idempotent=True, metadata={"trace_id": "t-42"})
    header = broker.requests[0]
    assert header.idempotent and dict(header.metadata) == {"tenant": "t1", "trace_id": "t-42"}
    assert 29_000 < header.deadline_ms <= 30_000  # the client's default timeout


def test_error_reply_raises_error_with_code_message_and_details(client):
    with pytest.raises(Error) as raised:
        client.call("test.Svc", "FailRESOURCE_EXHAUSTED", b"")
    error = raised.value
    assert (error.code, error.message, error.details) == (
        StatusCode.RESOURCE_EXHAUSTED, "failed on purpose", {"why": "test"})


def test_concurrent_calls_from_many_threads_get_their_own_replies(client):
    mismatches: list = []

    def caller(thread: int) -> None:
        for i in range(100):
            payload = f"{thread}:{i}".encode()
            answer = client.call("test.Svc", "Echo", payload)
            if answer != payload:
                mismatches.append((payload, answer))

    threads = [threading.Thread(target=caller, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT * 2)
    assert not any(t.is_alive() for t in threads)
    assert mismatches == []


def test_many_futures_in_flight_on_one_socket(client, broker):
    futures = [client.call_future("test.Svc", "Echo", str(i).encode()) for i in range(500)]
    assert [f.result(WAIT) for f in futures] == [str(i).encode() for i in range(500)]


def test_stub_call_decodes_the_reply_type_and_marks_idempotent_methods(client, broker):
    stub = client.stub(BROKER_SERVICE)
    reply = stub.Health(broker_service_pb2.HealthRequest(service="abc"), timeout=2.0)
    assert isinstance(reply, broker_service_pb2.HealthReply)
    assert (reply.status, reply.live_workers) == (broker_service_pb2.HealthReply.SERVING, 3)
    assert broker.requests[0].idempotent  # Health is NO_SIDE_EFFECTS


def test_stub_future_resolves_to_the_reply_type(client):
    future = client.stub(BROKER_SERVICE).Health.future(broker_service_pb2.HealthRequest(service="ab"))
    assert future.result(WAIT).live_workers == 2


def test_stub_refuses_the_wrong_request_type_without_sending(client, broker):
    stub = client.stub(BROKER_SERVICE)
    for wrong in (broker_service_pb2.ListServicesRequest(), b"raw"):
        with pytest.raises(Error) as raised:
            stub.Health(wrong)
        assert raised.value.code == StatusCode.INVALID_ARGUMENT
        assert "zrpc.HealthRequest" in raised.value.message
    assert broker.requests == []


def test_stub_reports_a_reply_that_does_not_parse_as_internal(client):
    method = BROKER_SERVICE.methods_by_name["Health"]
    garbage = UnaryMethod(client, method)
    garbage.name = "Garbage"  # the fake broker answers this method with bytes that do not parse
    with pytest.raises(Error) as raised:
        garbage(broker_service_pb2.HealthRequest())
    assert raised.value.code == StatusCode.INTERNAL
    assert raised.value.message.startswith("reply is not a valid zrpc.HealthReply")


def test_deadline_is_exceeded_on_time_with_no_broker(ipc_dir):
    with Client(f"ipc://{ipc_dir}/nobody") as c:
        started = time.monotonic()
        with pytest.raises(Error) as raised:
            c.call("test.Svc", "Echo", b"", timeout=0.3)
        elapsed = time.monotonic() - started
        assert raised.value.code == StatusCode.DEADLINE_EXCEEDED
        assert raised.value.message.startswith("deadline of 0.300s exceeded")
        assert elapsed < 0.3 + 0.5
        # A tiny budget fails fast, and the shorter of two deadlines fires first.
        late = c.call_future("test.Svc", "Echo", b"", timeout=WAIT)
        with pytest.raises(Error) as raised:
            c.call("test.Svc", "Echo", b"", timeout=1e-6)
        assert raised.value.code == StatusCode.DEADLINE_EXCEEDED and not late.done()


def test_requests_made_before_the_broker_binds_are_delivered(ipc_dir):
    endpoint = f"ipc://{ipc_dir}/late"
    with Client(endpoint) as c:
        future = c.call_future("test.Svc", "Echo", b"early")
        fake = FakeBroker(endpoint)
        try:
            assert future.result(WAIT) == b"early"
        finally:
            fake.stop()


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_without_wait_for_broker_a_call_fails_at_once_while_nothing_listens_and_works_once_it_does(ipc_dir, flavour):
    endpoint = f"ipc://{ipc_dir}/later"

    async def call_async(client) -> bytes:
        return await client.call("test.Svc", "Echo", b"x", timeout=60.0)

    def call(client) -> bytes:
        if flavour == "sync":
            return client.call("test.Svc", "Echo", b"x", timeout=60.0)
        return client_loop.run_until_complete(call_async(client))

    client_loop = asyncio.new_event_loop()
    client = (Client if flavour == "sync" else AsyncClient)(endpoint, wait_for_broker=False)
    try:
        with pytest.raises(Error) as raised:  # at the first failed attempt, not at 60 s
            call(client)
        assert raised.value.code == StatusCode.UNAVAILABLE
        assert raised.value.details["zrpc-endpoint"] == endpoint
        fake = FakeBroker(endpoint)
        try:
            def answered() -> bytes | None:  # once ZeroMQ's next attempt (within 100 ms) connects
                try:
                    return call(client)
                except Error as error:
                    assert error.code == StatusCode.UNAVAILABLE
                    return None
            assert wait_for(answered, message="a call to get through") == b"x"
        finally:
            fake.stop()
    finally:
        if flavour == "sync":
            client.close()
        else:
            client_loop.run_until_complete(client.close())
        client_loop.close()


def test_cancelling_a_future_sends_cancel_with_its_request_id(client, broker):
    future = client.call_future("test.Svc", "Hang", b"")
    broker.wait_for(lambda: broker.requests)
    request_id = broker.requests[0].request_id
    assert future.cancel()
    broker.wait_for(lambda: request_id in broker.cancels)
    assert broker.cancels == [request_id]
    assert client.call("test.Svc", "Echo", b"still works") == b"still works"


def test_a_call_cancelled_right_before_close_is_cancelled_at_the_broker(broker):
    """Ctrl-C on `zrpc call`: the interrupted call is cancelled, then the `with` block closes the
    client. When the I/O thread took both at once, the call was out of the core before the close
    sent CANCELs for the calls in flight: its handler ran on. The I/O thread is held here (a
    done-callback) until both wait for it."""
    from zrpc._client._sync import _CLOSE

    c = Client(broker.endpoint, timeout=WAIT)
    hanging = c.call_future("test.Svc", "Hang", b"")
    broker.wait_for(lambda: broker.requests)
    request_id = broker.requests[0].request_id
    held, release = threading.Event(), threading.Event()
    c.call_future("test.Svc", "Echo", b"x").add_done_callback(lambda _: (held.set(), release.wait(WAIT)))
    assert held.wait(WAIT), "the echo call was not answered"
    assert hanging.cancel()
    closing = threading.Thread(target=c.close)
    closing.start()
    try:
        wait_for(lambda: _CLOSE in c._outbox, WAIT, message="close() queued behind the cancellation")
    finally:
        release.set()
        closing.join(WAIT)
    broker.wait_for(lambda: request_id in broker.cancels)
    assert not closing.is_alive()


def test_close_is_prompt_fails_calls_in_flight_and_is_idempotent(broker):
    c = Client(broker.endpoint)
    future = c.call_future("test.Svc", "Hang", b"", timeout=WAIT)
    broker.wait_for(lambda: broker.requests)
    started = time.monotonic()
    c.close()
    assert time.monotonic() - started < 1.0
    assert future.exception(0).code == StatusCode.CANCELLED
    c.close()
    with pytest.raises(Error) as raised:
        c.call("test.Svc", "Echo", b"")
    assert raised.value.code == StatusCode.CANCELLED
    assert not c._thread.is_alive()


def test_client_refuses_bad_configuration():
    with pytest.raises(ValueError):
        Client([])
    with pytest.raises(ValueError):
        Client("tcp://127.0.0.1:1", timeout=None)


@pytest.mark.parametrize("endpoint, why", [
    ("localhost:5555", "expected a ZeroMQ endpoint such as tcp://127.0.0.1:5555 or ipc://"),
    ("tcp://localhost", "no port: expected HOST:PORT"),  # libzmq would say only "Invalid argument"
    ("tcp://127.0.0.1:99999", "port '99999' is not a number from 0 to 65535"),  # libzmq: port 34463
    ("tcp2://127.0.0.1:5555", "unknown transport 'tcp2'"),
    ("tcp://*:5555", "a wildcard (* or port 0) is for binding"),  # libzmq: "Invalid argument"
    ("tcp://127.0.0.1:0", "a wildcard (* or port 0) is for binding"),  # libzmq: waits forever
])
def test_clients_and_workers_refuse_a_bad_endpoint_at_construction(endpoint, why):
    for flavour in (Client, AsyncClient, lambda endpoint: Worker([Echo()], endpoint)):
        with pytest.raises(ValueError, match=re.escape(f"bad broker endpoint '{endpoint}'")) as raised:
            flavour(endpoint)
        assert why in str(raised.value)


@pytest.mark.parametrize("metadata, named", [
    ({"a": 1}, "'a': 1"),
    ({1: "x"}, "1: 'x'"),
    ({"b": None}, "'b': None"),
])
def test_clients_refuse_bad_client_wide_metadata_at_construction(metadata, named):
    for flavour in (Client, AsyncClient):
        with pytest.raises(ValueError, match="metadata must map str to str") as raised:
            flavour("tcp://127.0.0.1:1", metadata=metadata)
        assert named in str(raised.value)


def test_bad_per_call_metadata_still_fails_the_call(client):
    with pytest.raises(Error) as raised:
        client.call("test.Svc", "Echo", b"", metadata={"a": 1})
    assert raised.value.code == StatusCode.INVALID_ARGUMENT
    assert "metadata must map str to str" in raised.value.message


# -- the asyncio client ---------------------------------------------------------------------------

def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, WAIT * 2))


def test_async_call_ok_error_and_stub(broker):
    async def main():
        async with AsyncClient(broker.endpoint) as ac:
            results = await asyncio.gather(*(ac.call("test.Svc", "Echo", str(i).encode(), timeout=2.0)
                                             for i in range(200)))
            assert results == [str(i).encode() for i in range(200)]
            with pytest.raises(Error) as raised:
                await ac.call("test.Svc", "FailNOT_FOUND", b"")
            assert (raised.value.code, raised.value.message) == (StatusCode.NOT_FOUND, "failed on purpose")
            stub = ac.stub(BROKER_SERVICE)
            reply = await stub.Health(broker_service_pb2.HealthRequest(service="abcd"), timeout=2.0)
            assert isinstance(reply, broker_service_pb2.HealthReply) and reply.live_workers == 4
            with pytest.raises(Error) as raised:
                await stub.Health(broker_service_pb2.ListServicesRequest())
            assert raised.value.code == StatusCode.INVALID_ARGUMENT

    run(main())
    assert broker.requests[-1].idempotent  # the stub's Health call


def test_async_deadline_is_exceeded_on_time_with_no_broker(ipc_dir):
    async def main():
        async with AsyncClient(f"ipc://{ipc_dir}/nobody") as ac:
            started = time.monotonic()
            with pytest.raises(Error) as raised:
                await ac.call("test.Svc", "Echo", b"", timeout=0.3)
            assert raised.value.code == StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 0.3 + 0.5

    run(main())


def test_async_calls_wait_in_the_writer_while_the_queue_is_full_and_leave_once_there_is_room(ipc_dir):
    """A broker that stops reading fills the client's queue: the calls wait unsent in the core
    (no send ever waits), fail DEADLINE_EXCEEDED on time, and once the broker reads again the
    writer finds room (the DEALER's FD, or its pause) and the next call leaves."""
    import zmq
    import zmq.asyncio

    endpoint = f"ipc://{ipc_dir}/stalled"
    broker_context = zmq.Context()
    router = broker_context.socket(zmq.ROUTER)
    router.linger = 0
    router.rcvhwm = 10
    router.bind(endpoint)

    def read_until(service: str) -> bool:
        """The broker reads again: every message queued, until a call to ``service``."""
        for _ in range(10_000):
            if not router.poll(5000):
                return False
            frames = router.recv_multipart()
            command, body = _protocol.split(frames[1:], _protocol.CLIENT_COMMANDS)
            if command == _protocol.CANCEL:  # the expired calls that were sent
                continue
            pairs = _protocol.batch_pairs(body) if command == _protocol.REQUEST_BATCH else _protocol.pairs(body)
            if any(_protocol.decode_request_header(raw).service == service for raw, _ in pairs):
                return True
        return False

    async def main():
        context = zmq.asyncio.Context()  # an asyncio context gives plain sockets, with its options
        context.setsockopt(zmq.SNDHWM, 10)
        try:
            async with AsyncClient(endpoint, context=context, retry=None) as ac:
                # Time enough to fill the pipes before the calls expire, on a loaded machine too:
                # with 1 s, a run beside two other test suites saw them expire first (never blocked).
                timeout = 3.0

                async def one():
                    with pytest.raises(Error) as raised:
                        await ac.call("test.Svc", "Echo", b"x" * 60_000, timeout=timeout)
                    return raised.value.code
                started = time.monotonic()
                calls = [asyncio.ensure_future(one()) for _ in range(300)]  # 18 MB: far over the pipes' room
                for _ in range(500):
                    if ac._send_blocked:
                        break
                    await asyncio.sleep(0.01)
                assert ac._send_blocked, f"the writer was never refused in {time.monotonic() - started:.1f}s"
                assert set(await asyncio.gather(*calls)) == {StatusCode.DEADLINE_EXCEEDED}
                assert time.monotonic() - started < timeout + 1.0
                later = asyncio.ensure_future(ac.call("test.Later", "Echo", b"", timeout=10.0))
                assert await asyncio.to_thread(read_until, "test.Later")
                later.cancel()
                await asyncio.gather(later, return_exceptions=True)
        finally:
            context.term()

    try:
        run(main())
    finally:
        router.close(0)
        broker_context.term()


def test_an_async_client_closed_by_its_own_failure_stops_watching_its_sockets(caplog):
    """A client that failed (here its reader, on a bug) stops watching its DEALER and monitor:
    left unread, their FDs would stay readable and the loop would call it every turn."""
    fake = FakeBroker()
    stopped = False

    async def main():
        nonlocal stopped
        ac = AsyncClient(fake.endpoint, retry=None)
        looks = 0

        def counted(look):
            def wrapper(link):
                nonlocal looks
                looks += 1
                look(link)
            return wrapper

        ac._on_readable = counted(ac._on_readable)
        ac._on_monitor_events = counted(ac._on_monitor_events)

        def broken(frames, link):
            raise RuntimeError("a bug in the reader")

        ac._core.handle_message = broken
        with pytest.raises(Error) as raised:
            await ac.call("test.Svc", "Echo", b"x", timeout=5.0)
        assert raised.value.code == StatusCode.CANCELLED
        fake.stop()  # its connection closes: both FDs signal, and nobody reads them
        stopped = True
        before = looks
        await asyncio.sleep(0.3)
        assert looks - before <= 4  # once per FD and per scheduled read, not every loop turn
        await ac.close()

    with caplog.at_level(logging.ERROR, logger="zrpc.client"):
        try:
            run(main())
        finally:
            if not stopped:
                fake.stop()
    assert "reader failed; the client is closed" in caplog.text


def test_an_async_client_refuses_a_second_loop_while_its_own_runs_in_another_thread(broker):
    """The loop check must not take "our first call's thread" for "our loop's" (review: with
    the first loop moved to another thread, a call from a new loop in the first thread was
    taken in, then failed with asyncio's "Future attached to a different loop")."""
    client = AsyncClient(broker.endpoint, timeout=5.0)
    first = asyncio.new_event_loop()
    elsewhere = threading.Thread(target=first.run_forever, daemon=True)
    try:
        assert first.run_until_complete(client.call("test.Svc", "Echo", b"1")) == b"1"
        elsewhere.start()
        wait_for(first.is_running, 5)
        with pytest.raises(RuntimeError, match="belongs to the event loop of its first call"):
            asyncio.run(client.call("test.Svc", "Echo", b"2"))
        assert broker.count("Echo") == 1
        # its own loop, in its new thread, still has it
        assert asyncio.run_coroutine_threadsafe(client.call("test.Svc", "Echo", b"3"), first).result(5) == b"3"
        asyncio.run_coroutine_threadsafe(client.close(), first).result(5)
    finally:
        first.call_soon_threadsafe(first.stop)
        elsewhere.join(5)
        first.close()


def test_an_async_writer_that_waits_long_for_room_does_not_overflow_its_pause(broker):
    """Each wake-up of a writer with no room counts towards its next pause, and a reply on
    another link wakes it early: thousands of waits must not overflow (review: 2 ** 1024 raised
    OverflowError in the writer, which closed the client)."""
    async def main():
        async with AsyncClient(broker.endpoint, timeout=5.0) as ac:
            assert await ac.call("test.Svc", "Echo", b"x") == b"x"
            started = time.monotonic()
            await ac._writable(5000)  # the longest pause, not an exception
            assert time.monotonic() - started < 1.0
            assert await ac.call("test.Svc", "Echo", b"y") == b"y"

    run(main())


def test_an_async_client_on_a_loop_that_cannot_watch_sockets_says_so_at_every_call(broker):
    """(review) A loop without add_reader (asyncio's Proactor loop on Windows) failed the first
    call and left the client half set up: every later call waited out its deadline."""
    class NoReaders(asyncio.SelectorEventLoop):
        def add_reader(self, fd, callback, *args):
            raise NotImplementedError

    loop = NoReaders()
    client = AsyncClient(broker.endpoint, timeout=5.0)
    try:
        for _ in range(2):
            started = time.monotonic()
            with pytest.raises(RuntimeError, match="needs an event loop that can watch file descriptors"):
                loop.run_until_complete(client.call("test.Svc", "Echo", b"x"))
            assert time.monotonic() - started < 2.0
        assert broker.count() == 0
    finally:
        loop.close()
    # the same client on a loop that can watch its sockets works
    async def on_a_selector_loop():
        try:
            return await client.call("test.Svc", "Echo", b"y")
        finally:
            await client.close()

    assert asyncio.run(on_a_selector_loop()) == b"y"


def test_calls_failed_together_each_get_their_own_error():
    """(review) fail_all gave every call one Error object, and _finish wrote the attempt count of
    a retried call into it: a first attempt then read zrpc-attempts 3."""
    core = ClientCore(5.0, None, endpoints=["ipc:///nowhere"])
    retried, fresh = core.prepare("s.S", "M", b""), core.prepare("s.S", "M", b"")
    retried.attempt = 3
    for call in (retried, fresh):
        assert core.add(call) is None
    errors = {outcome.call.request_id: outcome.error for outcome in core.fail_all(Error(StatusCode.CANCELLED, "closing"))}
    assert errors[retried.request_id] is not errors[fresh.request_id]
    assert errors[retried.request_id].details.get("zrpc-attempts") == "3"
    assert "zrpc-attempts" not in errors[fresh.request_id].details


def test_async_cancelling_the_task_sends_cancel(broker):
    async def main():
        async with AsyncClient(broker.endpoint) as ac:
            task = asyncio.create_task(ac.call("test.Svc", "Hang", b""))
            await asyncio.to_thread(broker.wait_for, lambda: broker.requests)
            request_id = broker.requests[0].request_id
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.to_thread(broker.wait_for, lambda: request_id in broker.cancels)
            assert await ac.call("test.Svc", "Echo", b"after") == b"after"

    run(main())


def test_async_a_call_cancelled_right_before_close_is_cancelled_at_the_broker(broker):
    """(review) A caller's timeout cancels the call, then ``async with`` closes the client before
    the writer ran: the call was out of the core, so close() sent no CANCEL for it. The timeout
    is expired by hand once the broker holds the call; close() follows with no await between."""
    async def main():
        ac = AsyncClient(broker.endpoint)
        loop = asyncio.get_running_loop()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(None) as scope:
                def expire_when_held() -> None:
                    broker.wait_for(lambda: broker.requests)
                    loop.call_soon_threadsafe(scope.reschedule, loop.time())
                threading.Thread(target=expire_when_held, daemon=True).start()
                await ac.call("test.Svc", "Hang", b"")
        await ac.close()
        request_id = broker.requests[0].request_id
        await asyncio.to_thread(broker.wait_for, lambda: request_id in broker.cancels)

    run(main())


def test_async_close_fails_calls_in_flight_and_is_idempotent(broker):
    async def main():
        ac = AsyncClient(broker.endpoint)
        task = asyncio.create_task(ac.call("test.Svc", "Hang", b""))
        await asyncio.to_thread(broker.wait_for, lambda: broker.requests)
        await ac.close()
        with pytest.raises(Error) as raised:
            await task
        assert raised.value.code == StatusCode.CANCELLED
        await ac.close()
        with pytest.raises(Error) as raised:
            await ac.call("test.Svc", "Echo", b"")
        assert raised.value.code == StatusCode.CANCELLED

    run(main())


def test_core_refusals_as_never_run_do_not_use_up_the_retry_policys_attempts():
    """Brokers restarted one after another each refuse the call as they drain: it waits for
    the next, within its deadline, instead of failing after max_attempts refusals."""
    now = [100.0]
    core = ClientCore(endpoints=["inproc://a"], clock=lambda: now[0])  # RetryPolicy(): 3 attempts
    call = core.prepare("a.S", "M", b"", timeout=60.0)  # not idempotent
    core.add(call)
    for refusal in range(5):  # five brokers in turn, each draining when the call reaches it
        _, [sent] = core.next_request(now[0], 0)
        assert sent is call and call.attempt == refusal + 1
        header = _protocol.encode_reply_header(call.request_id, StatusCode.UNAVAILABLE, "shutting down",
                                               _protocol.DRAINING)
        assert core.handle_message(_protocol.reply_message([(header, b"")]), 0) == []  # re-queued
        core.connection_closed(0, "inproc://a")  # the broker goes; its successor comes up
        core.connection_up(0)
        now[0] += 2.0
        assert core.advance(now[0]) == []
    _, [sent] = core.next_request(now[0], 0)
    header = _protocol.encode_reply_header(call.request_id, StatusCode.UNAVAILABLE, "it may have run", None)
    [failed] = core.handle_message(_protocol.reply_message([(header, b"")]), 0)  # a real failure: not retried
    assert failed.call is call and failed.error.details["zrpc-attempts"] == "6"


def test_core_with_one_broker_answers_its_not_run_refusal_at_once():
    """Review: the one broker that waited unavailable_wait for a worker would be asked again,
    and wait again; with no other broker to send it to, its refusal is the answer."""
    now = [100.0]
    core = ClientCore(endpoints=["inproc://a"], clock=lambda: now[0])
    call = core.prepare("a.S", "M", b"", timeout=60.0)  # not idempotent
    core.add(call)
    core.next_request(now[0], 0)
    header = _protocol.encode_reply_header(call.request_id, StatusCode.UNAVAILABLE, "no live worker",
                                           _protocol.NOT_RUN)
    [failed] = core.handle_message(_protocol.reply_message([(header, b"")]), 0)
    assert failed.call is call and failed.error.message == "no live worker" and call.attempt == 1
    # Idempotent too (a tester: the retry waited there again and ended DEADLINE_EXCEEDED).
    idempotent = core.prepare("a.S", "M", b"", timeout=60.0, idempotent=True)
    core.add(idempotent)
    core.next_request(now[0], 0)
    header = _protocol.encode_reply_header(idempotent.request_id, StatusCode.UNAVAILABLE, "no live worker",
                                           _protocol.NOT_RUN)
    [failed] = core.handle_message(_protocol.reply_message([(header, b"")]), 0)
    assert failed.call is idempotent and failed.error.code == StatusCode.UNAVAILABLE and idempotent.attempt == 1
    # A full queue at that one broker is another matter: it answered at once, and a policy that
    # retries RESOURCE_EXHAUSTED sends the call again after its backoff (PROTOCOL §10).
    core = ClientCore(endpoints=["inproc://a"], clock=lambda: now[0],
                      retry=RetryPolicy(retryable_status_codes={StatusCode.RESOURCE_EXHAUSTED}))
    call = core.prepare("a.S", "M", b"", timeout=60.0)
    core.add(call)
    core.next_request(now[0], 0)
    header = _protocol.encode_reply_header(call.request_id, StatusCode.RESOURCE_EXHAUSTED, "queue full",
                                           _protocol.NOT_RUN)
    assert core.handle_message(_protocol.reply_message([(header, b"")]), 0) == [] and call.attempt == 2


def test_core_tries_other_brokers_for_an_unknown_service_within_the_policy_and_the_circuit_learns_nothing():
    """Review: the failover ignored max_attempts=1 (retries off), and a broker's not knowing the
    service reset the circuit's count of the service's failures at the other broker."""
    from zrpc._client._breaker import State

    now = [100.0]
    not_found = lambda rid: _protocol.reply_message([(_protocol.encode_reply_header(
        rid, StatusCode.NOT_FOUND, "no worker offers it", _protocol.NOT_RUN), b"")])
    failed = lambda rid: _protocol.reply_message([(_protocol.encode_reply_header(
        rid, StatusCode.UNAVAILABLE, "worker died"), b"")])
    core = ClientCore(endpoints=["inproc://a", "inproc://b"], clock=lambda: now[0], retry=RetryPolicy(max_attempts=1))
    call = core.prepare("a.S", "M", b"", timeout=60.0)
    core.add(call)
    core.next_request(now[0], 0)
    [outcome] = core.handle_message(not_found(call.request_id), 0)
    assert outcome.error.code == StatusCode.NOT_FOUND and call.attempt == 1
    core = ClientCore(endpoints=["inproc://a", "inproc://b"], clock=lambda: now[0], retry=None,
                      circuit_breaker=CircuitBreaker(failure_threshold=2))
    for answer in (failed, not_found, failed):
        call = core.prepare("a.S", "M", b"", timeout=60.0)
        core.add(call)
        core.next_request(now[0], 0)
        core.handle_message(answer(call.request_id), 0)
    assert core.circuit("a.S").state is State.OPEN  # two failures; the NOT_FOUND between said nothing


def test_core_sends_a_retry_for_an_unknown_service_to_a_broker_it_has_not_tried():
    """Review: the retry followed the client's turn, which other calls had moved back to the
    broker that refused it; it failed NOT_FOUND without reaching the one that knows it."""
    now = [100.0]
    core = ClientCore(endpoints=["inproc://a", "inproc://b"], clock=lambda: now[0])
    x, y = core.prepare("a.S", "M", b"x", timeout=60.0), core.prepare("a.S", "M", b"y", timeout=60.0)
    core.add(x)
    core.next_request(now[0], 0)
    core.took(0)
    core.add(y)
    core.next_request(now[0], 1)
    core.took(1)  # the turn is back at link 0
    header = _protocol.encode_reply_header(x.request_id, StatusCode.NOT_FOUND, "unknown here", _protocol.NOT_RUN)
    assert core.handle_message(_protocol.reply_message([(header, b"")]), 0) == []
    now[0] += 1.0
    core.advance(now[0])
    z = core.prepare("a.S", "M", b"z", timeout=60.0)  # a newer call behind it goes where it may
    core.add(z)
    order = core.link_order()
    assert order[0] == 1
    _, sent = core.next_request(now[0], order[0])
    assert sent[0] is x and x.attempt == 2


def test_core_refuses_an_idempotent_flag_that_is_not_a_bool():
    core = ClientCore()
    with pytest.raises(Error) as refused:
        core.prepare("a.S", "M", b"", idempotent="false")  # truthy: it would have run twice
    assert refused.value.code == StatusCode.INVALID_ARGUMENT and "'false'" in refused.value.message
    assert core.prepare("a.S", "M", b"", idempotent=1).header.idempotent


def test_core_retries_a_call_the_broker_refused_before_a_worker_had_it_and_counts_the_attempts():
    """UNAVAILABLE with `zrpc-retry: not-run` (no live worker there): the call never ran, so a
    non-idempotent call goes again, within the retry policy's attempts; without the detail it
    may have run, and fails at once."""
    now = [100.0]
    core = ClientCore(endpoints=["inproc://a", "inproc://b"], clock=lambda: now[0])  # 3 attempts
    for link in (0, 1):
        core.connection_up(link)
    call = core.prepare("a.S", "M", b"", timeout=60.0)  # not idempotent
    core.add(call)
    links = []
    for attempt in (1, 2, 3):
        link = core.link_order()[0]
        _, [sent] = core.next_request(now[0], link)
        core.took(link)
        links.append(link)
        assert sent is call and call.attempt == attempt
        header = _protocol.encode_reply_header(call.request_id, StatusCode.UNAVAILABLE, "no live worker",
                                               _protocol.NOT_RUN)
        outcomes = core.handle_message(_protocol.reply_message([(header, b"")]), link)
        now[0] += 2.0
        outcomes += core.advance(now[0])
    assert links == [0, 1, 0]  # each attempt went to the next broker in turn
    [failed] = outcomes  # the third refusal used up max_attempts
    assert failed.error.code == StatusCode.UNAVAILABLE and failed.error.details["zrpc-attempts"] == "3"

    other = core.prepare("a.S", "M", b"", timeout=60.0)
    core.add(other)
    link = core.link_order()[0]
    core.next_request(now[0], link)
    header = _protocol.encode_reply_header(other.request_id, StatusCode.UNAVAILABLE, "worker died", None)
    [failed] = core.handle_message(_protocol.reply_message([(header, b"")]), link)
    assert failed.call is other and other.attempt == 1  # it may have run: not sent again


def test_a_call_that_got_no_answer_names_the_broker_that_had_it(ipc_dir):
    """Two brokers, one of which takes calls and never answers: the deadline error says which."""
    import zmq

    silent_endpoint = f"ipc://{ipc_dir}/silent"
    with zmq.Context() as context, context.socket(zmq.ROUTER) as silent:
        silent.bind(silent_endpoint)
        fake = FakeBroker(f"ipc://{ipc_dir}/answers")
        try:
            with Client([silent_endpoint, fake.endpoint], timeout=WAIT) as client:
                wait_for(lambda: client._core.link_is_up(0) and client._core.link_is_up(1), message="both up")
                errors = []
                for _ in range(4):  # dealt in turn: some go to the silent one
                    try:
                        client.call("test.Svc", "Echo", b"x", timeout=0.3)
                    except Error as error:
                        errors.append(error)
                assert errors and all(e.code == StatusCode.DEADLINE_EXCEEDED for e in errors)
                assert all(e.details["zrpc-endpoint"] == silent_endpoint for e in errors)
                assert all(f"sent to the broker at {silent_endpoint}" in e.message for e in errors)
        finally:
            fake.stop()
            silent.close(0)


def test_a_deadline_error_says_the_call_was_slow_when_its_broker_answers_meanwhile():
    """Past the silence watch's 2 s, a broker that was not found silent answered something since
    the call was sent (its Health at least): the call is slow, not the broker unreachable."""
    broker = FakeBroker()
    try:
        with Client(broker.endpoint, timeout=10.0) as client:
            with pytest.raises(Error) as slow:
                client.call("a.S", "Hang", b"", timeout=2.6)
    finally:
        broker.stop()
    assert slow.value.code == StatusCode.DEADLINE_EXCEEDED
    assert "no answer in time, though that broker answers; the call is slow" in slow.value.message
    assert broker.count("Health") >= 1


def test_an_async_client_closed_from_a_new_loop_after_its_own_ended_releases_its_sockets(broker):
    """(review) Closed in a second asyncio.run after the first had ended, close() raised "Event
    loop is closed" (it awaited the old loop's writer) and left its DEALER open: a context the
    caller passed in could then never be terminated."""
    context = zmq.Context()
    client = AsyncClient(broker.endpoint, timeout=5.0, context=context)
    assert asyncio.run(client.call("test.Svc", "Echo", b"1")) == b"1"
    asyncio.run(client.close())  # a loop of its own, the first one closed
    terminated = threading.Thread(target=context.term, daemon=True)
    terminated.start()
    terminated.join(WAIT)  # term() returns once every socket of the context is closed
    assert not terminated.is_alive()
    with pytest.raises(Error) as failed:  # and the client says it is closed
        asyncio.run(client.call("test.Svc", "Echo", b"2"))
    assert failed.value.code == StatusCode.CANCELLED


def test_an_async_writer_refused_while_room_came_tries_again_without_a_pause(broker, monkeypatch):
    """(review) Room that came between a refused send and the look at ZMQ_EVENTS after it was
    seen by no one (the writer was not waiting yet) and its FD signal was taken by that look:
    the writer waited out a pause (up to 20 ms) for a signal that would not come."""
    from zrpc._client import _async

    async def main():
        async with AsyncClient(broker.endpoint, timeout=WAIT) as ac:
            assert await ac.call("test.Svc", "Echo", b"up") == b"up"  # connected, plenty of room
            real_send, refusals = _async._frames.send, []

            def refuse_once(socket, frames):  # a full queue that drained just after refusing
                if not refusals:
                    refusals.append(frames)
                    raise zmq.Again()
                real_send(socket, frames)

            loop, pauses = asyncio.get_running_loop(), []
            real_call_later = loop.call_later

            def call_later(delay, callback, *args, **kwargs):
                if getattr(callback, "__name__", "") == "_room_found":  # the writer's pause
                    pauses.append(delay)
                return real_call_later(delay, callback, *args, **kwargs)

            monkeypatch.setattr(_async._frames, "send", refuse_once)
            monkeypatch.setattr(loop, "call_later", call_later)
            assert await ac.call("test.Svc", "Echo", b"again") == b"again"
            assert len(refusals) == 1 and pauses == []

    run(main())


def test_an_async_client_closed_after_its_loop_was_closed_with_a_call_awaited_releases_its_sockets(broker):
    """(review) A loop closed without cancelling its tasks (run_until_complete, then close())
    left a call's future pending: close() from a new loop settled it, which scheduled on the
    closed loop, raised "Event loop is closed" and left the DEALER open."""
    context = zmq.Context()
    client = AsyncClient(broker.endpoint, timeout=30.0, context=context)
    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(client.call("test.Svc", "Echo", b"1")) == b"1"
        hung = loop.create_task(client.call("test.Svc", "Hang", b"h"))
        # the loop runs (and sends the call) while a thread waits for the broker to have it
        sent = loop.run_in_executor(None, broker.wait_for, lambda: broker.count("Hang") == 1)
        loop.run_until_complete(sent)
        assert not hung.done()
    finally:
        loop.close()  # the call is still awaited
    asyncio.run(client.close())
    terminated = threading.Thread(target=context.term, daemon=True)
    terminated.start()
    terminated.join(WAIT)
    assert not terminated.is_alive()


def test_an_async_client_closed_from_another_threads_loop_closes_on_its_own(broker):
    """(review) close() awaited in a loop of another thread, while the client's own loop ran:
    it settled that loop's futures and closed its sockets from the wrong thread (a caller there
    learnt of it only at its loop's next timer; its reader found a socket closed under it).
    The own loop, in debug mode, raises at any scheduling from another thread."""
    own = asyncio.new_event_loop()
    own.set_debug(True)  # call_soon from another thread raises instead of going unnoticed
    thread = threading.Thread(target=own.run_forever, daemon=True)
    thread.start()
    client = AsyncClient(broker.endpoint, timeout=30.0)
    try:
        assert asyncio.run_coroutine_threadsafe(client.call("test.Svc", "Echo", b"1"), own).result(WAIT) == b"1"
        hung = asyncio.run_coroutine_threadsafe(client.call("test.Svc", "Hang", b"x"), own)
        broker.wait_for(lambda: broker.count("Hang") == 1)
        asyncio.run(client.close())
        with pytest.raises(Error) as failed:
            hung.result(WAIT)
        assert failed.value.code == StatusCode.CANCELLED
        with pytest.raises(Error) as refused:  # closed for every loop
            asyncio.run_coroutine_threadsafe(client.call("test.Svc", "Echo", b"2"), own).result(WAIT)
        assert refused.value.code == StatusCode.CANCELLED
    finally:
        own.call_soon_threadsafe(own.stop)
        thread.join(WAIT)
        own.close()
