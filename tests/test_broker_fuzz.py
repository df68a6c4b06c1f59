"""Random frames at the broker engine: it never raises, answers clients, and keeps serving."""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zrpc import _protocol as p
from zrpc._broker import BrokerConfig, BrokerEngine
from zrpc._status import StatusCode

COMMANDS = st.sampled_from([p.READY, p.REQUEST, p.REPLY, p.HEARTBEAT, p.DISCONNECT, p.CANCEL, p.REQUEST_BATCH,
                           p.REPLY_BATCH, b"\x00", b"\xff"])
FRAME = st.binary(max_size=64)
# Mostly well-tagged messages with junk after the command: they reach the deepest code.
MESSAGE = st.one_of(
    st.lists(FRAME, max_size=6),
    st.tuples(COMMANDS, st.lists(FRAME, max_size=6)).map(lambda t: [p.TAG, t[0], *t[1]]),
)

def _engine_with_traffic() -> tuple[BrokerEngine, float]:
    now = 100.0
    engine = BrokerEngine(BrokerConfig(unknown_service_grace=0.0), now)
    engine.on_backend(b"worker", p.ready_message(p.Ready(services=["svc.S"], capacity=4, heartbeat_ms=1000)), now)
    return engine, now


def _good_call(engine: BrokerEngine, now: float, request_id: int) -> None:
    header = p.RequestHeader(request_id=request_id, service="svc.S", method="M", deadline_ms=5000)
    engine.on_frontend(b"good-client", p.request_message([(header.SerializeToString(), b"x")]), now)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.booleans(), MESSAGE), min_size=1, max_size=20))
def test_random_messages_never_break_the_engine_and_good_calls_still_succeed(messages):
    engine, now = _engine_with_traffic()
    for index, (to_frontend, frames) in enumerate(messages):
        if to_frontend:
            engine.on_frontend(b"fuzzer", frames, now)
        else:
            engine.on_backend(b"fuzz-worker" if index % 2 else b"worker", frames, now)
        engine.tick(now)
        engine.flush()
    # A correct call still goes through the registered worker and back.
    engine.frontend_out.clear()
    engine.backend_out.clear()
    _good_call(engine, now, request_id=424242)
    engine.flush()
    dispatched = [f for i, f in engine.backend_out if i == b"worker" and f[1] == p.REQUEST]
    if b"worker" in engine.workers and engine.workers[b"worker"].free > 0:
        assert dispatched, "a good call was not dispatched to a free worker"
        header = p.RequestHeader.FromString(dispatched[-1][-2])
        engine.on_backend(b"worker", p.reply_message([(p.encode_reply_header(header.request_id), b"y")]), now)
        engine.flush()
        answers = [p.ReplyHeader.FromString(f[2]) for i, f in engine.frontend_out if i == b"good-client"]
        assert [(a.request_id, a.code) for a in answers] == [(424242, StatusCode.OK)]
