"""Client resilience (zrpc._client._retry, _breaker and their use in the core): the policy and
the state machine with a fake clock and a seeded RNG, then both flavours on real sockets
against a scripted fake broker."""
from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from typing import Callable

import pytest

from zrpc import _protocol, broker_service_pb2
from zrpc._client import AsyncClient, CircuitBreaker, Client, RetryPolicy
from zrpc._client._breaker import Circuit, State
from zrpc._client._core import ATTEMPT_METADATA, ATTEMPTS_DETAIL, ClientCore
from zrpc._errors import Error
from zrpc._status import StatusCode

from ._fake_frontend import FakeFrontend

BROKER_SERVICE = broker_service_pb2.DESCRIPTOR.services_by_name["Broker"]
WAIT = 5.0  # bound on every wait for a condition; tests normally finish in milliseconds
UNAVAILABLE = StatusCode.UNAVAILABLE


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def reply(request_id: int, code: StatusCode = StatusCode.OK, payload: bytes = b"") -> list[bytes]:
    return _protocol.reply_message([(_protocol.encode_reply_header(request_id, code, "test"), payload)])


def sent_headers(core: ClientCore, now: float) -> list:
    batch = core.next_request(now)
    if batch is None:
        return []
    frames = batch[0]
    return [_protocol.decode_request_header(raw) for raw in frames[2::2]]


# -- the retry policy ------------------------------------------------------------------------------

def test_backoff_grows_by_the_multiplier_up_to_the_cap():
    policy = RetryPolicy(max_attempts=10, initial_backoff=0.05, max_backoff=1.0, backoff_multiplier=2.0,
                         jitter=0.0)
    assert [policy.backoff(n) for n in range(1, 9)] == pytest.approx(
        [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])


def test_backoff_jitter_stays_within_its_fraction_and_repeats_with_a_seed():
    policy = RetryPolicy(max_attempts=10, jitter=0.2)
    first = [policy.backoff(n, random.Random(7).random) for n in range(1, 10)]
    again = [policy.backoff(n, random.Random(7).random) for n in range(1, 10)]
    assert first == again
    bases = [min(0.05 * 2 ** (n - 1), 1.0) for n in range(1, 10)]
    rng = random.Random(1)
    for _ in range(200):
        for base, n in zip(bases, range(1, 10)):
            assert base * 0.8 <= policy.backoff(n, rng.random) <= base * 1.2
    assert policy.backoff(1, lambda: 0.0) == pytest.approx(0.04)  # the extremes of the spread
    assert policy.backoff(1, lambda: 0.5) == pytest.approx(0.05)


def test_retry_policy_retries_only_its_codes_within_max_attempts():
    policy = RetryPolicy(max_attempts=3, retryable_status_codes={UNAVAILABLE, StatusCode.ABORTED})
    assert policy.retryable_status_codes == frozenset({UNAVAILABLE, StatusCode.ABORTED})
    assert policy.retries(UNAVAILABLE, 1) and policy.retries(StatusCode.ABORTED, 2)
    assert not policy.retries(UNAVAILABLE, 3)
    assert not policy.retries(StatusCode.INTERNAL, 1)
    assert not RetryPolicy(max_attempts=1).retries(UNAVAILABLE, 1)


@pytest.mark.parametrize("field, value", [
    ("max_attempts", 0), ("max_attempts", 11), ("max_attempts", 2.0), ("max_attempts", True),
    ("initial_backoff", 0), ("initial_backoff", float("inf")), ("initial_backoff", "1"),
    ("max_backoff", 0.01),  # below initial_backoff
    ("backoff_multiplier", 0.5), ("backoff_multiplier", float("nan")),
    ("jitter", -0.1), ("jitter", 1.0),
    ("retryable_status_codes", frozenset()), ("retryable_status_codes", {StatusCode.OK}),
    ("retryable_status_codes", {99}), ("retryable_status_codes", UNAVAILABLE),
])
def test_retry_policy_refuses_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        RetryPolicy(**{field: value})


def test_retry_policy_is_a_frozen_value():
    policy = RetryPolicy()
    with pytest.raises(AttributeError):
        policy.max_attempts = 5
    assert policy == RetryPolicy() and hash(policy) == hash(RetryPolicy())


# -- retries in the core, fake clock ---------------------------------------------------------------

def core_with(clock: FakeClock, **kwargs) -> ClientCore:
    kwargs.setdefault("retry", RetryPolicy(jitter=0.0))
    return ClientCore(clock=clock, **kwargs)


def test_core_retries_an_idempotent_call_after_its_backoff_with_a_new_request_id():
    clock = FakeClock()
    core = core_with(clock)
    call = core.prepare("a.S", "M", b"x", timeout=2.0, idempotent=True)
    core.add(call)
    [first] = sent_headers(core, clock())
    assert ATTEMPT_METADATA not in first.metadata

    assert core.handle_message(reply(first.request_id, UNAVAILABLE), 0) == []  # re-queued, not settled
    assert core.in_flight == 1 and not core.has_unsent()
    assert core.next_timer() == pytest.approx(clock.now + 0.05)  # the backoff, not the deadline
    clock.now += 0.049
    assert core.advance(clock()) == [] and sent_headers(core, clock()) == []
    clock.now += 0.001
    assert core.advance(clock()) == []
    [second] = sent_headers(core, clock())
    assert second.request_id != first.request_id and second.request_id == call.request_id
    assert second.metadata[ATTEMPT_METADATA] == "2"
    assert second.metadata["trace_id"] == first.metadata["trace_id"]  # one call, end to end
    assert second.deadline_ms == 1930  # what is left of the call's own deadline, 20 ms short (spec §5)

    # The old id is forgotten: a late (duplicate) answer to it settles nothing.
    assert core.handle_message(reply(first.request_id, payload=b"late"), 0) == []
    [outcome] = core.handle_message(reply(second.request_id, payload=b"done"), 0)
    assert (outcome.call, outcome.value, outcome.error) == (call, b"done", None)
    assert core.in_flight == 0 and core.next_timer() is None


def test_core_gives_up_after_max_attempts_with_the_last_error_and_the_count():
    clock = FakeClock()
    core = core_with(clock, retry=RetryPolicy(max_attempts=3, jitter=0.0))
    core.add(core.prepare("a.S", "M", b"", timeout=5.0, idempotent=True))
    ids = []
    for _ in range(3):
        clock.now = core.next_timer() if ids else clock.now
        core.advance(clock())
        [header] = sent_headers(core, clock())
        ids.append(header.request_id)
        outcomes = core.handle_message(reply(header.request_id, UNAVAILABLE), 0)
    [outcome] = outcomes
    assert len(set(ids)) == 3
    assert outcome.error.code == UNAVAILABLE and outcome.error.details[ATTEMPTS_DETAIL] == "3"
    assert core.in_flight == 0


@pytest.mark.parametrize("idempotent, code, retry", [
    (False, UNAVAILABLE, RetryPolicy()),  # the first attempt may have run: never again
    (True, StatusCode.INTERNAL, RetryPolicy()),  # not a retryable code
    (True, UNAVAILABLE, None),  # retries turned off
])
def test_core_settles_at_once_what_it_must_not_retry(idempotent, code, retry):
    core = ClientCore(retry=retry)
    core.add(core.prepare("a.S", "M", b"", idempotent=idempotent))
    [header] = sent_headers(core, core.clock())
    [outcome] = core.handle_message(reply(header.request_id, code), 0)
    assert outcome.error.code == code and ATTEMPTS_DETAIL not in outcome.error.details
    assert core.in_flight == 0 and core.next_timer() is None


def test_core_never_retries_past_the_deadline():
    clock = FakeClock()
    core = core_with(clock, retry=RetryPolicy(max_attempts=10, jitter=0.0))
    call = core.prepare("a.S", "M", b"", timeout=0.12, idempotent=True)
    core.add(call)
    [header] = sent_headers(core, clock())
    assert core.handle_message(reply(header.request_id, UNAVAILABLE), 0) == []  # retry at +0.05
    clock.now += 0.05
    core.advance(clock())
    [header] = sent_headers(core, clock())
    clock.now += 0.01
    # The next backoff (0.1 s) would end at +0.16, after the deadline at +0.12: fail now.
    [outcome] = core.handle_message(reply(header.request_id, UNAVAILABLE), 0)
    assert outcome.error.code == UNAVAILABLE and outcome.error.details[ATTEMPTS_DETAIL] == "2"
    assert clock.now < call.deadline and core.in_flight == 0


def test_core_a_call_cancelled_in_its_backoff_is_never_sent_again():
    clock = FakeClock()
    core = core_with(clock)
    call = core.prepare("a.S", "M", b"", idempotent=True)
    core.add(call)
    [header] = sent_headers(core, clock())
    core.handle_message(reply(header.request_id, UNAVAILABLE), 0)
    cancelled = core.cancel(call.request_id)  # the id of the attempt to come
    assert cancelled is call and not call.sent  # nothing for the broker to CANCEL
    clock.now += 1.0
    assert core.advance(clock()) == [] and sent_headers(core, clock()) == []
    assert core.next_timer() is None


def test_core_closing_fails_calls_in_backoff_without_retrying():
    clock = FakeClock()
    core = core_with(clock)
    call = core.prepare("a.S", "M", b"", idempotent=True)
    core.add(call)
    [header] = sent_headers(core, clock())
    core.handle_message(reply(header.request_id, UNAVAILABLE), 0)
    [outcome] = core.fail_all(Error(StatusCode.CANCELLED, "closing"))
    assert outcome.call is call and outcome.error.code == StatusCode.CANCELLED
    clock.now += 1.0
    assert core.advance(clock()) == [] and core.next_timer() is None


def test_core_a_deadline_exceeded_by_the_client_is_never_retried():
    clock = FakeClock()
    both = RetryPolicy(retryable_status_codes={UNAVAILABLE, StatusCode.DEADLINE_EXCEEDED})
    core = core_with(clock, retry=both)
    core.add(core.prepare("a.S", "M", b"", timeout=1.0, idempotent=True))
    sent_headers(core, clock())
    clock.now += 1.0
    [outcome] = core.advance(clock())
    assert outcome.error.code == StatusCode.DEADLINE_EXCEEDED and core.in_flight == 0


# -- a broker that answers nothing, fake clock -----------------------------------------------------

def test_core_probes_a_link_that_owes_answers_and_passes_it_over_while_it_is_silent():
    clock = FakeClock()
    core = ClientCore(10.0, clock=clock, retry=None, endpoints=["tcp://a:1", "tcp://b:1"])
    for link in (0, 1):
        core.connection_up(link)

    def send(link: int) -> list:
        core.add(core.prepare("svc", "M", b"x"))
        frames, calls = core.next_request(clock(), link)
        return calls

    slow = send(0)[0]  # link 0 owes an answer from now on
    assert core.next_timer() == pytest.approx(clock.now + 1.0)  # the probe, before any deadline
    clock.now += 1.0
    assert core.advance(clock()) == []
    [(link, probe)] = core.take_link_messages()
    header = _protocol.decode_request_header(probe[2])
    assert link == 0 and (header.service, header.method) == ("zrpc.Broker", "Health")
    assert core.take_link_messages() == []
    # A slow call is no silence: the broker answers the probe (an id that matches no call).
    assert core.handle_message(reply(header.request_id), 0) == []
    assert core.next_timer() == pytest.approx(slow.deadline)
    # Silence: nothing comes after the next probe either.
    send(0)
    clock.now += 1.0
    core.advance(clock())
    [(_, probe)] = core.take_link_messages()
    clock.now += 0.999
    core.advance(clock())
    assert sorted(core.link_order()) == [0, 1]
    clock.now += 0.001
    core.advance(clock())
    assert list(core.link_order()) == [1]  # link 0 is passed over while link 1 takes calls
    assert core.take_link_messages() == []
    clock.now += 1.0
    core.advance(clock())
    [(link, _)] = core.take_link_messages()  # asked again every 2 s
    assert link == 0
    error = core.deadline_error(slow)
    assert "answered nothing for 3.0s" in error.message and error.details["zrpc-endpoint"] == "tcp://a:1"
    # Alone, a silent link still takes calls: there is nowhere else to send them.
    core.connection_closed(1, "tcp://b:1")
    assert list(core.link_order()) == [0]
    core.connection_up(1)
    assert list(core.link_order()) == [1]
    # Any message from it ends the silence.
    core.handle_message(reply(header.request_id), 0)
    assert sorted(core.link_order()) == [0, 1]
    assert core.next_timer() == pytest.approx(slow.deadline)


def _silent_after(core: ClientCore, clock: FakeClock, link: int) -> None:
    """Advance ``clock`` until ``link`` (which owes an answer) is found silent: probed, unanswered."""
    for _ in range(3):
        clock.now += 1.0
        core.advance(clock())
        core.take_link_messages()
    assert core._silence.silent[link]


def test_core_moves_idempotent_calls_off_a_silent_link_only_to_one_that_answers():
    clock = FakeClock()
    core = ClientCore(10.0, clock=clock, endpoints=["tcp://a:1", "tcp://b:1"],
                      retry=RetryPolicy(max_attempts=5, jitter=0.0))
    for link in (0, 1):
        core.connection_up(link)
    idempotent = core.prepare("svc", "M", b"i", idempotent=True)
    other = core.prepare("svc", "M", b"o")
    for call in (idempotent, other):
        core.add(call)
    first_id = idempotent.request_id
    assert core.next_request(clock(), 0)[1] == [idempotent, other]
    core.next_request(clock(), 1)  # nothing: link 1 owes nothing
    _silent_after(core, clock, 0)
    # Moved as a retry (new id, attempt 2), CANCELled at the silent broker; the other stays.
    assert idempotent.request_id != first_id and idempotent.attempt == 2 and not idempotent.sent
    assert other.sent and other.attempt == 1
    clock.now += 0.1  # its backoff
    core.advance(clock())
    frames, calls = core.next_request(clock(), 1)
    assert calls == [idempotent]
    # Link 1 falls silent too: no answering link is left, so nothing moves back to link 0.
    _silent_after(core, clock, 1)
    assert idempotent.sent and idempotent.attempt == 2


def test_core_leaves_a_circuits_trial_call_on_a_silent_link():
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=1.0)
    core = ClientCore(10.0, clock=clock, endpoints=["tcp://a:1", "tcp://b:1"], circuit_breaker=breaker)
    for link in (0, 1):
        core.connection_up(link)
    failing = core.prepare("svc", "M", b"x")
    core.add(failing)
    [failed] = core.next_request(clock(), 1)[1]
    core.handle_message(reply(failed.request_id, UNAVAILABLE), 1)  # the circuit opens
    assert core.circuit("svc").state is State.OPEN
    clock.now += 1.0
    trial = core.prepare("svc", "M", b"t", idempotent=True)
    assert core.add(trial) is None and trial.trial  # half-open: this call is the trial
    assert core.next_request(clock(), 0)[1] == [trial]
    _silent_after(core, clock, 0)
    assert trial.sent and trial.trial and trial.attempt == 1  # it stays, and stays the trial


# -- the circuit breaker, fake clock ---------------------------------------------------------------

def test_circuit_opens_after_consecutive_failures_then_half_opens_for_one_trial():
    circuit = Circuit("a.S", CircuitBreaker(failure_threshold=3, reset_timeout=5.0))
    now = 100.0
    for code in (UNAVAILABLE, UNAVAILABLE, StatusCode.OK, UNAVAILABLE, StatusCode.DEADLINE_EXCEEDED):
        assert circuit.admit(now) is None
        circuit.record(code, now)
    assert circuit.state is State.CLOSED and circuit.failures == 2  # the OK reset the count

    circuit.record(UNAVAILABLE, now)
    assert circuit.state is State.OPEN and circuit.refuses(now)
    refusal = circuit.admit(now + 1.0)
    assert refusal.code == UNAVAILABLE
    assert refusal.message == "circuit open for service 'a.S' after 3 consecutive failures; retrying in 4.0s"
    assert refusal.details == {"zrpc-circuit": "open"}
    circuit.record(StatusCode.OK, now + 1.0)  # a call admitted before it opened: ignored
    assert circuit.state is State.OPEN

    assert circuit.admit(now + 5.0) is None  # reset_timeout passed: this is the trial
    assert circuit.state is State.HALF_OPEN
    second = circuit.admit(now + 5.0)
    assert second.message.endswith("a trial call is in flight")
    assert second.details == {"zrpc-circuit": "half-open"}
    circuit.record(StatusCode.OK, now + 5.1)  # not the trial: it does not decide
    assert circuit.state is State.HALF_OPEN

    circuit.record(UNAVAILABLE, now + 5.2, trial=True)  # the trial failed: open again, timer anew
    assert circuit.state is State.OPEN and circuit.failures == 4
    assert circuit.admit(now + 10.1) is not None and circuit.admit(now + 10.2) is None
    circuit.record(StatusCode.OK, now + 10.3, trial=True)
    assert circuit.state is State.CLOSED and circuit.failures == 0
    assert circuit.admit(now + 10.3) is None and circuit.admit(now + 10.3) is None


def test_circuit_counts_only_its_failure_codes():
    circuit = Circuit("a.S", CircuitBreaker(failure_threshold=2))
    for code in (StatusCode.RESOURCE_EXHAUSTED, StatusCode.NOT_FOUND, StatusCode.INTERNAL) * 3:
        circuit.record(code, 0.0)
    assert circuit.state is State.CLOSED and circuit.failures == 0
    shed_load = CircuitBreaker(failure_threshold=2, failure_codes={StatusCode.RESOURCE_EXHAUSTED})
    shedding = Circuit("a.S", shed_load)
    shedding.record(StatusCode.RESOURCE_EXHAUSTED, 0.0)
    shedding.record(StatusCode.RESOURCE_EXHAUSTED, 0.0)
    assert shedding.state is State.OPEN


def test_circuit_an_abandoned_trial_lets_another_call_through():
    circuit = Circuit("a.S", CircuitBreaker(failure_threshold=1, reset_timeout=1.0))
    circuit.record(UNAVAILABLE, 0.0)
    assert circuit.admit(1.0) is None and circuit.admit(1.0) is not None
    circuit.abandon_trial()
    assert circuit.admit(1.0) is None and circuit.state is State.HALF_OPEN


@pytest.mark.parametrize("field, value", [
    ("failure_threshold", 0), ("failure_threshold", 2.5), ("reset_timeout", 0),
    ("reset_timeout", float("inf")), ("failure_codes", frozenset()), ("failure_codes", {StatusCode.OK}),
])
def test_circuit_breaker_refuses_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        CircuitBreaker(**{field: value})


def test_core_refuses_calls_to_an_open_circuit_unsent_and_per_service():
    clock = FakeClock()
    core = ClientCore(clock=clock, retry=None,
                      circuit_breaker=CircuitBreaker(failure_threshold=2, reset_timeout=1.0))
    for _ in range(2):
        assert core.add(core.prepare("down.S", "M", b"")) is None
        [header] = sent_headers(core, clock())
        core.handle_message(reply(header.request_id, UNAVAILABLE), 0)
    refused = core.add(core.prepare("down.S", "M", b""))
    assert refused.error.code == UNAVAILABLE and refused.error.message.startswith("circuit open")
    assert not refused.call.sent and core.in_flight == 0 and sent_headers(core, clock()) == []
    assert core.add(core.prepare("other.S", "M", b"")) is None  # another service is unaffected

    # After reset_timeout the trial goes out; cancelling it lets the next call be the trial.
    clock.now += 1.0
    sent_headers(core, clock())
    trial = core.prepare("down.S", "M", b"")
    assert core.add(trial) is None and trial.trial
    assert core.add(core.prepare("down.S", "M", b"")) is not None
    core.cancel(trial.request_id)
    successor = core.prepare("down.S", "M", b"")
    assert core.add(successor) is None
    [header] = sent_headers(core, clock())
    core.handle_message(reply(header.request_id), 0)
    assert core.circuit("down.S").state is State.CLOSED


def test_core_does_not_retry_into_a_circuit_that_this_failure_opened():
    clock = FakeClock()
    core = ClientCore(clock=clock, retry=RetryPolicy(jitter=0.0),
                      circuit_breaker=CircuitBreaker(failure_threshold=1, reset_timeout=10.0))
    core.add(core.prepare("a.S", "M", b"", idempotent=True))
    [header] = sent_headers(core, clock())
    [outcome] = core.handle_message(reply(header.request_id, UNAVAILABLE), 0)
    assert outcome.error.message == "test"  # the service's own error, not the circuit's
    assert core.in_flight == 0


def test_core_a_retry_whose_circuit_opened_during_its_backoff_fails_with_its_last_error():
    clock = FakeClock()
    core = ClientCore(clock=clock, retry=RetryPolicy(jitter=0.0),
                      circuit_breaker=CircuitBreaker(failure_threshold=2, reset_timeout=10.0))
    retried = core.prepare("a.S", "M", b"", idempotent=True)
    other = core.prepare("a.S", "M", b"")
    core.add(retried)
    core.add(other)
    first, second = sent_headers(core, clock())
    core.handle_message(reply(first.request_id, UNAVAILABLE), 0)  # retried waits out its backoff
    core.handle_message(reply(second.request_id, UNAVAILABLE), 0)  # second failure: circuit opens
    clock.now += 0.05
    [outcome] = core.advance(clock())
    assert outcome.call is retried and outcome.error.message == "test"
    assert sent_headers(core, clock()) == [] and core.in_flight == 0


# -- a scripted fake broker ------------------------------------------------------------------------

Script = Callable[[object], StatusCode | None]  # request header -> code to answer, None: no answer


def unavailable_first(k: int, method: str | None = None) -> Script:
    """Answer UNAVAILABLE to the first ``k`` requests (for ``method``, or any), then OK."""
    seen = iter(range(k))

    def script(header) -> StatusCode:
        if method not in (None, header.method):
            return StatusCode.OK
        return UNAVAILABLE if next(seen, None) is not None else StatusCode.OK
    return script


def always(code: StatusCode) -> Script:
    return lambda header: code


class ScriptedBroker(FakeFrontend):
    """Answers each request as ``script`` says (OK echoes the payload; Health answers a
    HealthReply)."""

    thread_name = "scripted-broker"

    def __init__(self, script: Script):
        self.script = script  # replaced by tests between calls; read only by the broker thread
        super().__init__()

    def answer(self, header, payload: bytes) -> tuple[bytes, bytes] | None:
        code = self.script(header)
        if code is None:
            return None
        if code == StatusCode.OK and header.method == "Health":
            payload = broker_service_pb2.HealthReply(live_workers=1).SerializeToString()
        message = "" if code == StatusCode.OK else "scripted failure"
        return (_protocol.encode_reply_header(header.request_id, code, message),
                payload if code == StatusCode.OK else b"")


@pytest.fixture
def make_broker():
    started: list[ScriptedBroker] = []

    def make(script: Script) -> ScriptedBroker:
        broker = ScriptedBroker(script)
        started.append(broker)
        return broker

    yield make
    for broker in started:
        broker.stop()


def poll_until(condition: Callable[[], bool], what: str) -> None:
    """Try ``condition`` until it holds; fail after WAIT. (Each try is a real, cheap call, as
    tests.conftest.wait_for does, kept here so this file needs no package-relative import.)"""
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {WAIT}s waiting for {what}"
        threading.Event().wait(0.02)  # a bounded poll interval, not synchronisation


FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05)


# -- the blocking client ----------------------------------------------------------------------------

def test_idempotent_call_succeeds_after_retries_with_distinct_request_ids(make_broker):
    broker = make_broker(unavailable_first(2))
    with Client(broker.endpoint, timeout=WAIT, retry=FAST_RETRY) as client:
        assert client.call("test.Svc", "Echo", b"hello", idempotent=True) == b"hello"
        assert client._core.in_flight == 0
    headers = broker.requests
    assert len(headers) == 3 and len({h.request_id for h in headers}) == 3
    assert [h.metadata.get(ATTEMPT_METADATA) for h in headers] == [None, "2", "3"]
    assert len({h.metadata["trace_id"] for h in headers}) == 1
    gaps = [later - earlier for earlier, later in zip(broker.times, broker.times[1:])]
    assert all(gap >= 0.008 for gap in gaps)  # each attempt waited out a backoff (≥ 0.01 × 0.8)


def test_stub_retries_a_method_declared_idempotent(make_broker):
    broker = make_broker(unavailable_first(1))
    with Client(broker.endpoint, timeout=WAIT, retry=FAST_RETRY) as client:
        reply_message = client.stub(BROKER_SERVICE).Health(broker_service_pb2.HealthRequest())
    assert reply_message.live_workers == 1 and broker.count("Health") == 2


def test_non_idempotent_call_fails_at_once_and_is_sent_exactly_once(make_broker):
    broker = make_broker(unavailable_first(1))
    with Client(broker.endpoint, timeout=WAIT, retry=FAST_RETRY) as client:
        with pytest.raises(Error) as raised:
            client.call("test.Svc", "Echo", b"", idempotent=False)
        assert raised.value.code == UNAVAILABLE and raised.value.message == "scripted failure"
        assert client._core.in_flight == 0  # nothing left to send again
    assert broker.count() == 1


def test_a_backoff_blocks_no_other_call_and_cancelling_in_it_sends_nothing_more(make_broker, caplog):
    broker = make_broker(always(UNAVAILABLE))
    caplog.set_level(logging.DEBUG, logger="zrpc.client")
    slow = RetryPolicy(initial_backoff=0.5, max_backoff=0.5, jitter=0.0)
    with Client(broker.endpoint, timeout=WAIT, retry=slow) as client:
        future = client.call_future("test.Svc", "Flaky", b"", idempotent=True)
        poll_until(lambda: any(r.getMessage().startswith("retrying test.Svc/Flaky") for r in caplog.records),
                   "the first attempt's failure")
        broker.script = unavailable_first(1_000, method="Flaky")
        assert client.call("test.Svc", "Echo", b"meanwhile") == b"meanwhile"
        assert not future.done()  # still in its 0.5 s backoff
        assert future.cancel()
        poll_until(lambda: client._core.in_flight == 0, "the cancelled call to be forgotten")
    assert [h.method for h in broker.requests] == ["Flaky", "Echo"]


def test_retries_are_off_with_retry_none(make_broker):
    broker = make_broker(unavailable_first(1))
    with Client(broker.endpoint, timeout=WAIT, retry=None) as client:
        with pytest.raises(Error) as raised:
            client.call("test.Svc", "Echo", b"", idempotent=True)
        assert raised.value.code == UNAVAILABLE
    assert broker.count() == 1


def test_retries_stop_at_the_deadline(make_broker):
    broker = make_broker(always(UNAVAILABLE))
    policy = RetryPolicy(max_attempts=10, initial_backoff=0.05, backoff_multiplier=2.0, jitter=0.2)
    timeout = 0.3
    # The shortest backoffs (0.04, 0.08, 0.16, 0.32) end at 0.04, 0.12, 0.28, 0.60 s: at most
    # four attempts start within the deadline.
    fit = 4
    with Client(broker.endpoint, timeout=WAIT, retry=policy) as client:
        started = time.monotonic()
        with pytest.raises(Error) as raised:
            client.call("test.Svc", "Echo", b"", timeout=timeout, idempotent=True)
        elapsed = time.monotonic() - started
    assert raised.value.code == UNAVAILABLE  # the last error, not a deadline the client let pass
    attempts = int(raised.value.details[ATTEMPTS_DETAIL])
    assert 2 <= attempts <= fit and broker.count() == attempts
    assert elapsed < timeout + 0.2
    assert all(t - started < timeout for t in broker.times)  # no attempt started past the deadline


def test_circuit_opens_after_failures_fails_fast_unsent_and_half_opens_after_reset(make_broker):
    broker = make_broker(always(UNAVAILABLE))
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout=0.2)
    with Client(broker.endpoint, timeout=WAIT, retry=None, circuit_breaker=breaker) as client:
        for _ in range(3):
            with pytest.raises(Error) as raised:
                client.call("down.Svc", "Echo", b"")
            assert raised.value.message == "scripted failure"
        with pytest.raises(Error) as raised:
            client.call("down.Svc", "Echo", b"")
        assert raised.value.code == UNAVAILABLE
        assert raised.value.message.startswith("circuit open for service 'down.Svc' after 3 consecutive")
        # The refused call was never sent: a later call on the same socket arrives right after
        # the third (one DEALER to one ROUTER keeps order).
        broker.script = always(StatusCode.OK)
        assert client.call("up.Svc", "Echo", b"marker") == b"marker"
        assert [h.service for h in broker.requests] == ["down.Svc"] * 3 + ["up.Svc"]

        # Still down after reset_timeout: the trial is sent, fails, and the circuit opens again.
        broker.script = always(UNAVAILABLE)

        def trial_sent() -> bool:
            try:
                client.call("down.Svc", "Echo", b"")
            except Error as error:
                return not error.message.startswith("circuit open")
            return True

        poll_until(trial_sent, "the half-open trial call")
        assert broker.count() == 5
        with pytest.raises(Error) as raised:
            client.call("down.Svc", "Echo", b"")
        assert "after 4 consecutive failures" in raised.value.message

        # Back up: the next trial succeeds and closes the circuit.
        broker.script = always(StatusCode.OK)
        poll_until(trial_sent, "the second trial call")
        assert client.call("down.Svc", "Echo", b"closed") == b"closed"
        assert broker.count() == 7


# -- the asyncio client ----------------------------------------------------------------------------

def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, WAIT * 2))


def test_async_idempotent_call_succeeds_after_retries(make_broker):
    broker = make_broker(unavailable_first(2, method="Flaky"))
    policy = RetryPolicy(initial_backoff=0.2, max_backoff=0.2, jitter=0.0)

    async def main():
        async with AsyncClient(broker.endpoint, timeout=WAIT, retry=policy) as client:
            retried = asyncio.create_task(client.call("test.Svc", "Flaky", b"again", idempotent=True))
            await asyncio.to_thread(broker.wait_for, lambda: broker.requests)
            # Another call completes while the first waits out its backoffs: nothing blocks.
            assert await client.call("test.Svc", "Echo", b"meanwhile") == b"meanwhile"
            assert not retried.done()
            assert await retried == b"again"
            assert client._core.in_flight == 0

    run(main())
    headers = [h for h in broker.requests if h.method == "Flaky"]
    assert len({h.request_id for h in headers}) == 3
    assert [h.metadata.get(ATTEMPT_METADATA) for h in headers] == [None, "2", "3"]


def test_async_non_idempotent_call_fails_at_once_and_is_sent_once(make_broker):
    broker = make_broker(unavailable_first(1))

    async def main():
        async with AsyncClient(broker.endpoint, timeout=WAIT, retry=FAST_RETRY) as client:
            with pytest.raises(Error) as raised:
                await client.call("test.Svc", "Echo", b"")
            assert raised.value.code == UNAVAILABLE
            assert client._core.in_flight == 0

    run(main())
    assert broker.count() == 1


def test_async_circuit_open_fails_fast_without_sending(make_broker):
    broker = make_broker(always(UNAVAILABLE))

    async def main():
        breaker = CircuitBreaker(failure_threshold=2, reset_timeout=60.0)
        async with AsyncClient(broker.endpoint, timeout=WAIT, retry=None, circuit_breaker=breaker) as client:
            for _ in range(2):
                with pytest.raises(Error):
                    await client.call("down.Svc", "Echo", b"")
            with pytest.raises(Error) as raised:
                await client.call("down.Svc", "Echo", b"")
            assert raised.value.details == {"zrpc-circuit": "open"}

    run(main())
    assert broker.count() == 2


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_client_whose_socket_connects_to_itself_drops_that_connection(flavour, caplog):
    """A new-user tester's client, reconnecting to a loopback port where no broker listened
    (inside the kernel's local port range), was connected to itself by TCP: it read its own
    REQUEST back ("dropped a message from the broker (bad_command)"), its call hung, and no
    broker could bind the port. Here the connection is made to itself on purpose (libzmq's
    "tcp://SOURCE;DESTINATION" form): each one is dropped, and the call ends at its deadline."""
    import socket

    from zrpc._client._monitor import connected_to_itself

    caplog.set_level(logging.INFO, logger="zrpc")
    with socket.socket() as probe, socket.socket() as other:
        probe.bind(("127.0.0.1", 0))
        probe.connect(probe.getsockname())  # TCP's simultaneous open, with itself
        assert connected_to_itself(probe.fileno())
        other.bind(("127.0.0.1", 0))  # a port of its own: the probe's stays in TIME_WAIT a while
        port = other.getsockname()[1]
    endpoint = f"tcp://127.0.0.1:{port};127.0.0.1:{port}"

    async def call_async() -> Error:
        async with AsyncClient(endpoint, retry=None) as client:
            with pytest.raises(Error) as raised:
                await client.call("echo.Echo", "Say", b"", timeout=0.5)
        return raised.value

    if flavour == "sync":
        with Client(endpoint, timeout=0.5, retry=None) as client, pytest.raises(Error) as raised:
            client.call("echo.Echo", "Say", b"")
        error = raised.value
    else:
        error = asyncio.run(call_async())
    assert error.code == StatusCode.DEADLINE_EXCEEDED
    said = [r.getMessage() for r in caplog.records]
    assert any(line.startswith(f"zrpc client: connected to itself at {endpoint}") for line in said), said
    assert not any("bad_command" in line for line in said), said
