"""The reference services in workers/, their handlers called directly (no sockets)."""
from __future__ import annotations

import asyncio
import threading

import pytest

from workers.echo import Echo, echo_pb2
from workers.greeter import Greeter, helloworld_pb2
from workers.kv import KeyValue, kv_pb2
from zrpc._descriptors import is_idempotent
from zrpc._errors import Error
from zrpc._service import Context
from zrpc._status import StatusCode


def context(**fields) -> Context:
    return Context(service="test", method="test", **fields)


def raises(code: StatusCode, call, *args) -> Error:
    with pytest.raises(Error) as raised:
        call(*args, context())
    assert raised.value.code == code, raised.value
    return raised.value


# -- greeter -------------------------------------------------------------------------------------

def test_greeter_says_hello_by_name():
    reply = Greeter().SayHello(helloworld_pb2.HelloRequest(name="Ada"), context())
    assert reply == helloworld_pb2.HelloReply(message="Hello, Ada!")


# -- echo ----------------------------------------------------------------------------------------

def test_echo_say_returns_its_payload_and_is_idempotent():
    reply = Echo().Say(echo_pb2.EchoRequest(payload=b"\x00bytes"), context())
    assert reply.payload == b"\x00bytes"
    assert is_idempotent(Echo.descriptor.methods_by_name["Say"])
    assert not is_idempotent(Echo.descriptor.methods_by_name["Sleep"])


def test_echo_sleep_waits_then_returns_its_payload():
    reply = asyncio.run(Echo().Sleep(echo_pb2.SleepRequest(ms=1, payload=b"p"), context()))
    assert reply.payload == b"p"


def test_echo_sleep_stops_when_cancelled():
    async def cancel_soon():
        task = asyncio.ensure_future(Echo().Sleep(echo_pb2.SleepRequest(ms=60_000), context()))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)

    asyncio.run(cancel_soon())


def test_echo_fail_raises_the_code_and_message_asked_for():
    error = raises(StatusCode.PERMISSION_DENIED, Echo().Fail,
                   echo_pb2.FailRequest(code=StatusCode.PERMISSION_DENIED, message="no"))
    assert error.message == "no"


@pytest.mark.parametrize("code", [0, 99])
def test_echo_fail_refuses_ok_and_unknown_codes(code):
    raises(StatusCode.INVALID_ARGUMENT, Echo().Fail, echo_pb2.FailRequest(code=code))


# -- key-value store -----------------------------------------------------------------------------

@pytest.fixture
def kv():
    return KeyValue(max_value_bytes=8, max_key_bytes=16, max_keys=4)


def put(kv, key, value) -> int:
    return kv.Put(kv_pb2.PutRequest(key=key, value=value), context()).version


def get(kv, key) -> kv_pb2.Entry:
    return kv.Get(kv_pb2.GetRequest(key=key), context()).entry


def test_kv_put_then_get_returns_value_and_version(kv):
    version = put(kv, "a", b"1")
    assert get(kv, "a") == kv_pb2.Entry(key="a", value=b"1", version=version)


def test_kv_get_of_a_missing_key_is_not_found(kv):
    error = raises(StatusCode.NOT_FOUND, kv.Get, kv_pb2.GetRequest(key="nope"))
    assert "nope" in error.message


def test_kv_versions_grow_across_keys_and_never_repeat(kv):
    first = put(kv, "a", b"1")
    second = put(kv, "b", b"1")
    kv.Delete(kv_pb2.DeleteRequest(key="a"), context())
    third = put(kv, "a", b"1")
    assert first < second < third


def test_kv_putting_the_same_value_again_changes_nothing(kv):
    version = put(kv, "a", b"1")
    assert put(kv, "a", b"1") == version
    assert put(kv, "a", b"2") > version


def test_kv_delete_is_safe_to_retry(kv):
    version = put(kv, "a", b"1")
    assert kv.Delete(kv_pb2.DeleteRequest(key="a"), context()) == kv_pb2.DeleteReply(deleted=True, version=version)
    assert kv.Delete(kv_pb2.DeleteRequest(key="a"), context()) == kv_pb2.DeleteReply(deleted=False)
    raises(StatusCode.NOT_FOUND, kv.Get, kv_pb2.GetRequest(key="a"))


def test_kv_compare_and_set_creates_updates_and_refuses_a_stale_version(kv):
    cas = kv.CompareAndSet
    created = cas(kv_pb2.CompareAndSetRequest(key="k", expected_version=0, value=b"1"), context()).version
    updated = cas(kv_pb2.CompareAndSetRequest(key="k", expected_version=created, value=b"2"), context()).version
    assert updated > created and get(kv, "k").value == b"2"
    error = raises(StatusCode.FAILED_PRECONDITION, cas,
                   kv_pb2.CompareAndSetRequest(key="k", expected_version=created, value=b"3"))
    assert error.details == {"current_version": str(updated)}
    raises(StatusCode.FAILED_PRECONDITION, cas, kv_pb2.CompareAndSetRequest(key="k", expected_version=0, value=b"3"))
    raises(StatusCode.FAILED_PRECONDITION, cas, kv_pb2.CompareAndSetRequest(key="new", expected_version=5))
    assert get(kv, "k").value == b"2"


def test_kv_refuses_empty_keys_and_oversize_keys_and_values(kv):
    raises(StatusCode.INVALID_ARGUMENT, kv.Put, kv_pb2.PutRequest(key="", value=b"1"))
    raises(StatusCode.INVALID_ARGUMENT, kv.Get, kv_pb2.GetRequest(key=""))
    raises(StatusCode.INVALID_ARGUMENT, kv.Delete, kv_pb2.DeleteRequest(key=""))
    raises(StatusCode.INVALID_ARGUMENT, kv.Put, kv_pb2.PutRequest(key="k" * 17, value=b"1"))
    error = raises(StatusCode.INVALID_ARGUMENT, kv.Put, kv_pb2.PutRequest(key="k", value=b"123456789"))
    assert error.message == "value is 9 bytes; the limit is 8"
    raises(StatusCode.INVALID_ARGUMENT, kv.CompareAndSet, kv_pb2.CompareAndSetRequest(key="k", value=b"123456789"))
    put(kv, "k", b"12345678")  # exactly at the limit


def test_kv_refuses_new_keys_past_its_key_limit(kv):
    for key in "abcd":
        put(kv, key, b"1")
    raises(StatusCode.RESOURCE_EXHAUSTED, kv.Put, kv_pb2.PutRequest(key="e", value=b"1"))
    put(kv, "a", b"2")  # existing keys can still change


def test_kv_limits_come_from_the_environment_when_not_given(monkeypatch):
    monkeypatch.setenv("ZRPC_KV_MAX_VALUE_BYTES", "3")
    store = KeyValue()
    raises(StatusCode.INVALID_ARGUMENT, store.Put, kv_pb2.PutRequest(key="k", value=b"1234"))
    monkeypatch.setenv("ZRPC_KV_MAX_VALUE_BYTES", "lots")
    with pytest.raises(ValueError, match="ZRPC_KV_MAX_VALUE_BYTES"):
        KeyValue()


def test_kv_list_pages_through_a_prefix_in_key_order():
    kv = KeyValue()
    for key in ["user/c", "user/a", "other", "user/b", "user/d", "userx"]:
        put(kv, key, key.encode())
    first = kv.List(kv_pb2.ListRequest(prefix="user/", limit=3), context())
    assert [e.key for e in first.entries] == ["user/a", "user/b", "user/c"]
    assert first.entries[0].value == b"user/a" and first.next_start_after == "user/c"
    second = kv.List(kv_pb2.ListRequest(prefix="user/", limit=3, start_after=first.next_start_after), context())
    assert [e.key for e in second.entries] == ["user/d"] and second.next_start_after == ""
    everything = kv.List(kv_pb2.ListRequest(), context())
    assert [e.key for e in everything.entries] == ["other", "user/a", "user/b", "user/c", "user/d", "userx"]
    assert kv.List(kv_pb2.ListRequest(prefix="nothing"), context()).entries == []


def test_kv_list_limit_defaults_to_100_and_is_capped_at_1000():
    kv = KeyValue()
    for i in range(1001):
        put(kv, f"k{i:04}", b"")
    assert len(kv.List(kv_pb2.ListRequest(), context()).entries) == 100
    page = kv.List(kv_pb2.ListRequest(limit=5000), context())
    assert len(page.entries) == 1000 and page.next_start_after == "k0999"


def test_kv_is_consistent_under_concurrent_compare_and_set():
    kv = KeyValue()
    put(kv, "counter", b"0")
    barrier = threading.Barrier(8)

    def increment(times: int) -> None:
        barrier.wait(5)
        for _ in range(times):
            while True:
                entry = get(kv, "counter")
                request = kv_pb2.CompareAndSetRequest(key="counter", expected_version=entry.version,
                                                      value=str(int(entry.value) + 1).encode())
                try:
                    kv.CompareAndSet(request, context())
                    break
                except Error as error:
                    assert error.code == StatusCode.FAILED_PRECONDITION

    threads = [threading.Thread(target=increment, args=(50,)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert not any(thread.is_alive() for thread in threads)
    assert get(kv, "counter").value == b"400"


def test_kv_idempotency_levels_match_what_retries_may_do():
    methods = KeyValue.descriptor.methods_by_name
    assert {name: is_idempotent(m) for name, m in methods.items()} == {
        "Get": True, "Put": True, "Delete": True, "List": True, "CompareAndSet": False}


# -- the call context ----------------------------------------------------------------------------

def test_context_reports_time_remaining_and_cancellation_with_an_injected_clock():
    now = [100.0]
    ctx = Context(deadline=102.5, clock=lambda: now[0])
    assert ctx.time_remaining() == 2.5 and not ctx.cancelled
    now[0] = 103.0
    assert ctx.time_remaining() == 0.0 and ctx.cancelled
    assert Context().time_remaining() is None and not Context().cancelled
    cancelled = Context()
    cancelled.cancel()
    assert cancelled.cancelled


@pytest.mark.parametrize("metadata, deadline", [({"trace_id": "t-1", "user": "ann"}, 12.5), ({}, None)])
def test_the_workers_context_constructor_sets_every_slot_as_the_public_one_does(metadata, deadline):
    """Context._for_call skips __init__ for speed: a slot added there must be added here too."""
    fast = Context._for_call(7, "a.S", "M", metadata, 2, deadline)
    public = Context(request_id=7, service="a.S", method="M", trace_id=metadata.get("trace_id", ""),
                     metadata=metadata, attempt=2, deadline=deadline)
    assert {slot: getattr(fast, slot) for slot in Context.__slots__} == {
        slot: getattr(public, slot) for slot in Context.__slots__}


# -- end to end, through zrpc.testing.serve (in-process broker and worker) ----------------------

def test_serve_runs_the_reference_services_behind_a_real_broker():
    from zrpc.testing import serve

    before = set(threading.enumerate())
    with serve(Greeter(), Echo(), KeyValue) as client:
        greeting = client.stub(Greeter.descriptor).SayHello(helloworld_pb2.HelloRequest(name="Ada"))
        assert greeting.message == "Hello, Ada!"
        echo = client.stub(Echo.descriptor)
        assert echo.Say(echo_pb2.EchoRequest(payload=b"\x01\x02")).payload == b"\x01\x02"
        with pytest.raises(Error) as raised:
            echo.Fail(echo_pb2.FailRequest(code=StatusCode.ABORTED, message="on purpose"))
        assert (raised.value.code, raised.value.message) == (StatusCode.ABORTED, "on purpose")
        with pytest.raises(Error) as raised:
            echo.Sleep(echo_pb2.SleepRequest(ms=60_000), timeout=0.05)
        assert raised.value.code == StatusCode.DEADLINE_EXCEEDED
        store = client.stub(KeyValue.descriptor)
        version = store.Put(kv_pb2.PutRequest(key="k", value=b"v")).version
        assert store.Get(kv_pb2.GetRequest(key="k")).entry.version == version
        with pytest.raises(Error) as raised:
            store.Get(kv_pb2.GetRequest(key="missing"))
        assert raised.value.code == StatusCode.NOT_FOUND
    pause = threading.Event()
    for _ in range(500):  # bounded: the broker, worker and client threads end on exit
        if not set(threading.enumerate()) - before:
            break
        pause.wait(0.01)
    assert not set(threading.enumerate()) - before
