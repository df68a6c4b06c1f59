"""CURVE + ZAP end to end (issue 5): real broker, worker and client threads on loopback tcp."""
from __future__ import annotations

import asyncio
import os
import logging
import pathlib
import select
import shutil
import socket
import stat
import threading
import time

import pytest
import zmq
import zmq.auth.thread

from tests.conftest import Process, wait_for
from workers.echo import Echo, echo_pb2
from zrpc import AsyncClient, Client, Error, StatusCode
from zrpc import _security as security
from zrpc._broker import Broker
from zrpc._broker import _auth
from zrpc._broker._config import BrokerConfig
from zrpc._worker import Worker

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")

SERVICE = "echo.Echo"
MARKER = b"ZRPC-PLAINTEXT-MARKER-7f3a9c"


class Keys:
    """A broker key, client keys (alice, bob) and a worker key, with the allow-list dirs."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        self.secrets = root / "secrets"
        self.clients = root / "clients"
        self.workers = root / "workers"
        self.clients.mkdir()
        self.workers.mkdir()
        self.broker_secret = security.generate_keys("broker", self.secrets)[1]
        self.broker_public = self.secrets / "broker.key"
        for name, allow_dir in (("alice", self.clients), ("bob", self.clients), ("w1", self.workers)):
            public, _ = security.generate_keys(name, self.secrets)
            shutil.copy(public, allow_dir / public.name)

    def secret(self, name: str) -> pathlib.Path:
        return self.secrets / f"{name}.key_secret"

    def config(self, **changes) -> BrokerConfig:
        settings = dict(frontend="tcp://127.0.0.1:0", backend="tcp://127.0.0.1:0",
                        curve_secret=str(self.broker_secret), client_keys=str(self.clients),
                        worker_keys=str(self.workers), unknown_service_grace=0.0, unavailable_wait=0.5)
        settings.update(changes)
        return BrokerConfig(**settings)


@pytest.fixture
def keys(tmp_path):
    return Keys(tmp_path)


@pytest.fixture
def running():
    """Start brokers, workers and clients; all are stopped when the test ends."""
    started: list = []

    def keep(thing):
        started.append(thing)
        return thing

    yield keep
    for thing in reversed(started):
        if isinstance(thing, Worker):
            thing.stop(grace=0)
        elif isinstance(thing, Broker):
            thing.stop()
        else:
            thing.close()


def start_broker(running, config: BrokerConfig) -> Broker:
    return running(Broker(config).start())


def start_worker(running, keys: Keys, broker: Broker, key: str = "w1") -> Worker:
    return running(Worker([Echo()], brokers=broker.backend_endpoint, concurrency=4,
                          heartbeat_interval=0.1, curve_secret=keys.secret(key),
                          broker_key=keys.broker_public).start())


def client(running, keys: Keys, broker: Broker | str, key: str = "alice", **kwargs) -> Client:
    endpoint = broker if isinstance(broker, str) else broker.frontend_endpoint
    return running(Client(endpoint, timeout=5.0, curve_secret=keys.secret(key),
                          broker_key=keys.broker_public, **kwargs))


def say(client_: Client, payload: bytes = b"hi", timeout: float = 5.0) -> bytes:
    raw = client_.call(SERVICE, "Say", echo_pb2.EchoRequest(payload=payload).SerializeToString(),
                       timeout=timeout)
    return echo_pb2.EchoReply.FromString(raw).payload


def served(broker: Broker) -> bool:
    service = broker.engine.services.get(SERVICE)
    return bool(service and service.workers)


# ---------------------------------------------------------------------------- keys


def test_generated_secret_key_is_0600_and_loads(tmp_path):
    public, secret = security.generate_keys("node", tmp_path / "k")
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(public).st_mode) == 0o644
    pair = security.load_keypair(secret)
    assert security.load_public_key(public) == pair.public
    assert security.load_public_key(pair.public.decode()) == pair.public
    with pytest.raises(ValueError, match="no secret key"):
        security.load_keypair(public)


def test_a_secret_key_others_may_read_is_loaded_with_a_warning(tmp_path, caplog):
    _, secret = security.generate_keys("node", tmp_path / "k")
    with caplog.at_level(logging.WARNING, logger="zrpc.security"):
        security.load_keypair(secret)
        assert caplog.records == []
        os.chmod(secret, 0o644)  # a tester's chmod: the broker started without a word
        security.load_keypair(secret)
    [warning] = caplog.records
    assert "has mode 644: other users may read it; `chmod 600" in warning.getMessage()


@pytest.mark.parametrize("endpoint, loopback", [
    ("tcp://127.0.0.1:5555", True), ("tcp://127.9.0.1:1", True), ("tcp://[::1]:5555", True),
    ("tcp://localhost:5555", True), ("ipc:///tmp/x", True), ("inproc://x", True),
    ("tcp://0.0.0.0:5555", False), ("tcp://*:5555", False), ("tcp://10.0.0.5:5555", False),
    ("tcp://eth0:5555", False), ("tcp://[::]:5555", False), ("tcp://example.org:1", False),
])
def test_loopback_classifier_decides_the_plain_tcp_warning(endpoint, loopback):
    assert security.is_loopback_endpoint(endpoint) is loopback


def test_plain_broker_on_loopback_does_not_warn(running, caplog):
    broker = start_broker(running, BrokerConfig(frontend="tcp://127.0.0.1:0", backend="tcp://127.0.0.1:0"))
    assert broker.security is None
    assert not [r for r in caplog.records if "CURVE is off" in r.getMessage()]


def test_curve_config_needs_both_allow_lists(keys):
    with pytest.raises(ValueError, match="client_keys and worker_keys"):
        keys.config(worker_keys="").validate()
    with pytest.raises(ValueError, match="need curve_secret"):
        BrokerConfig(client_keys=str(keys.clients)).validate()


# ---------------------------------------------------------------------------- the authenticator


def test_broker_refuses_curve_when_the_authenticator_is_not_running(keys, monkeypatch):
    monkeypatch.setattr(_auth.BrokerSecurity, "running", property(lambda self: False))
    broker = Broker(keys.config())
    with pytest.raises(RuntimeError, match="CURVE without ZAP accepts any key"):
        broker.bind()
    assert broker.frontend is None and broker.backend is None


def test_authenticator_is_configured_for_the_exact_domains_of_the_sockets(keys, running):
    broker = start_broker(running, keys.config())
    assert broker.frontend.zap_domain == security.FRONTEND_DOMAIN.encode()
    assert broker.backend.zap_domain == security.BACKEND_DOMAIN.encode()
    assert set(broker.security.domains) == {security.FRONTEND_DOMAIN, security.BACKEND_DOMAIN}


def test_configure_curve_wildcard_domain_does_not_cover_a_named_zap_domain(keys):
    """The pitfall behind configuring exact domains: '*' leaves a named domain unconfigured."""
    context = zmq.Context()
    authenticator = zmq.auth.thread.ThreadAuthenticator(context)
    authenticator.start()
    try:
        authenticator.configure_curve(domain="*", location=str(keys.clients))
        server_pair = security.load_keypair(keys.broker_secret)
        router = context.socket(zmq.ROUTER)
        router.linger = 0
        router.zap_domain = security.FRONTEND_DOMAIN.encode()
        router.curve_secretkey, router.curve_publickey = server_pair.secret, server_pair.public
        router.curve_server = True
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer = context.socket(zmq.DEALER)
        dealer.linger = 0
        security.apply_client_curve(dealer, security.load_keypair(keys.secret("alice")), server_pair.public)
        monitor = dealer.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        dealer.connect(f"tcp://127.0.0.1:{port}")
        assert monitor.poll(5000), "no handshake outcome within 5s"
        from zmq.utils.monitor import recv_monitor_message
        assert recv_monitor_message(monitor)["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH
        dealer.disable_monitor()
        for sock in (monitor, dealer, router):
            sock.close(0)
    finally:
        authenticator.stop()
        context.term()


# ---------------------------------------------------------------------------- calls


def test_encrypted_calls_succeed(keys, running):
    broker = start_broker(running, keys.config())
    start_worker(running, keys, broker)
    wait_for(lambda: served(broker), 10, message="worker registered")
    alice = client(running, keys, broker)
    assert [say(alice, b"%d" % i) for i in range(20)] == [b"%d" % i for i in range(20)]
    worker_state = next(iter(broker.engine.workers.values()))
    assert worker_state.peer_key == security.load_public_key(keys.secrets / "w1.key").decode()


def test_async_client_calls_over_curve_and_is_refused_with_an_unknown_key(keys, running):
    broker = start_broker(running, keys.config())
    start_worker(running, keys, broker)
    wait_for(lambda: served(broker), 10, message="worker registered")
    stranger = security.KeyPair(*zmq.curve_keypair())

    async def scenario():
        async with AsyncClient(broker.frontend_endpoint, timeout=5.0, curve_secret=keys.secret("alice"),
                               broker_key=keys.broker_public) as good:
            raw = await good.call(SERVICE, "Say", echo_pb2.EchoRequest(payload=b"a").SerializeToString())
            assert echo_pb2.EchoReply.FromString(raw).payload == b"a"
        async with AsyncClient(broker.frontend_endpoint, timeout=5.0, curve_secret=stranger,
                               broker_key=keys.broker_public) as bad:
            started = time.monotonic()
            with pytest.raises(Error) as info:
                await bad.call(SERVICE, "Say", b"")
            return info.value, time.monotonic() - started

    error, elapsed = asyncio.run(scenario())
    assert error.code == StatusCode.UNAUTHENTICATED
    assert elapsed < 2.0


def test_a_key_with_eight_connections_takes_one_turn_in_a_queue(keys, running):
    """Under CURVE a client is its key (§12): alice's calls over eight connections wait as one
    client's, so bob's one call, sent behind 40 of hers at a worker of capacity 1, waits for
    her running call and one turn of hers, not a turn of each of her connections."""
    broker = start_broker(running, keys.config(unavailable_wait=30.0))
    running(Worker([Echo()], brokers=broker.backend_endpoint, concurrency=1, heartbeat_interval=0.1,
                   curve_secret=keys.secret("w1"), broker_key=keys.broker_public).start())
    wait_for(lambda: served(broker), 10, message="worker registered")
    body = echo_pb2.SleepRequest(ms=20).SerializeToString()

    def connect(name: str) -> AsyncClient:
        return AsyncClient(broker.frontend_endpoint, timeout=30.0, curve_secret=keys.secret(name),
                           broker_key=keys.broker_public)

    async def scenario() -> list[str]:
        alice, bob = [connect("alice") for _ in range(8)], connect("bob")
        answered: list[str] = []

        async def sleep(client: AsyncClient, name: str) -> None:
            await client.call(SERVICE, "Sleep", body)
            answered.append(name)

        try:
            batch = [asyncio.ensure_future(sleep(alice[n % 8], "alice")) for n in range(40)]
            for _ in range(1000):  # until 35 of hers wait at the broker (bounded: 10 s)
                if broker.engine.queue_depth() >= 35:
                    break
                await asyncio.sleep(0.01)
            assert len(broker.engine.services[SERVICE].queue._by_client) == 1  # one line: her key
            await sleep(bob, "bob")
            for task in batch:
                task.cancel()
            await asyncio.gather(*batch, return_exceptions=True)
        finally:
            for client_ in (*alice, bob):
                await client_.close()
        return answered

    answered = asyncio.run(scenario())
    assert "bob" in answered[:3], answered[:10]


def test_unknown_client_key_gets_unauthenticated_fast_and_is_counted(keys, running):
    broker = start_broker(running, keys.config())
    stranger = security.KeyPair(*zmq.curve_keypair())
    bad = running(Client(broker.frontend_endpoint, timeout=10.0, curve_secret=stranger,
                         broker_key=keys.broker_public))
    for _ in range(2):  # a second call after the refusal is refused too, not left to time out
        started = time.monotonic()
        with pytest.raises(Error) as info:
            say(bad, timeout=10.0)
        assert info.value.code == StatusCode.UNAUTHENTICATED
        assert "handshake refused by broker at " + broker.frontend_endpoint in info.value.message
        assert time.monotonic() - started < 2.0
    assert broker.security.refusals[security.FRONTEND_DOMAIN] >= 1


def test_wrong_broker_key_gets_unauthenticated_fast(keys, running):
    broker = start_broker(running, keys.config())
    wrong = zmq.curve_keypair()[0]
    bad = running(Client(broker.frontend_endpoint, timeout=10.0, curve_secret=keys.secret("alice"),
                         broker_key=wrong))
    started = time.monotonic()
    with pytest.raises(Error) as info:
        say(bad, timeout=10.0)
    assert info.value.code == StatusCode.UNAUTHENTICATED
    assert time.monotonic() - started < 2.0


def test_a_plain_client_or_worker_at_a_curve_broker_is_told_it_may_need_keys(keys, running, caplog):
    """A tester's plain client waited out its deadline, then read "is a broker running?", and a
    plain worker said only "no answer". ZeroMQ mostly reports just a connection closed during
    the handshake (a broker at its connection cap does that too): after two, both say what it
    may mean. When it reports the mechanism mismatch itself, the client's calls fail at once."""
    broker = start_broker(running, keys.config())
    caplog.set_level(logging.WARNING)
    plain = running(Client(broker.frontend_endpoint, timeout=10.0))
    with pytest.raises(Error) as info:
        say(plain, timeout=1.0)
    assert info.value.code in (StatusCode.UNAUTHENTICATED, StatusCode.DEADLINE_EXCEEDED)
    if info.value.code == StatusCode.UNAUTHENTICATED:
        assert "requires CURVE: give its public key (--broker-key)" in info.value.message
    else:
        wait_for(lambda: any(r.name == "zrpc.client" and "closed our connection during the handshake 2 times"
                             in r.getMessage() for r in caplog.records), 10, message="the client's hint")
    running(Worker([Echo()], brokers=broker.backend_endpoint, heartbeat_interval=0.05).start())
    hints = lambda: [r.getMessage() for r in caplog.records if r.name == "zrpc.worker" and "CURVE" in r.getMessage()]
    wait_for(hints, 10, message="the plain worker's hint")
    assert "its worker keys, then SIGHUP" not in hints()[0]  # not the broker's to fix


def test_a_curve_client_at_a_plain_broker_is_told_it_uses_no_keys(keys, running, ipc_dir):
    broker = start_broker(running, BrokerConfig(frontend=f"ipc://{ipc_dir}/plain-front",
                                                backend=f"ipc://{ipc_dir}/plain-back"))
    keyed = client(running, keys, broker)
    with pytest.raises(Error) as info:
        say(keyed, timeout=10.0)
    assert info.value.code == StatusCode.UNAUTHENTICATED
    # The mismatch when ZeroMQ reports it; else the connection closed during the handshake.
    assert "does not use CURVE" in info.value.message or "is CURVE on at the broker?" in info.value.message


def test_client_key_cannot_register_as_a_worker(keys, running):
    broker = start_broker(running, keys.config())
    start_worker(running, keys, broker, key="alice")
    wait_for(lambda: broker.security.refusals[security.BACKEND_DOMAIN] >= 1, 10,
             message="the backend refusing a client key")
    alice = client(running, keys, broker)
    from zrpc import broker_service_pb2 as pb
    listing = pb.ListServicesReply.FromString(alice.call("zrpc.Broker", "ListServices", b""))
    assert SERVICE not in [s.name for s in listing.services]
    assert not broker.engine.workers


@pytest.mark.parametrize("key, broker_key, reason", [
    ("alice", None, "our key is not allowed"),  # a key the broker's worker list does not hold
    ("w1", "alice", "is --broker-key the broker's public key"),  # the wrong broker key
])
def test_a_refused_worker_says_why_once_instead_of_reconnecting_silently(keys, running, caplog, key, broker_key,
                                                                         reason):
    broker = start_broker(running, keys.config())
    caplog.set_level(logging.DEBUG, logger="zrpc.worker")
    running(Worker([Echo()], brokers=broker.backend_endpoint, heartbeat_interval=0.05, liveness=2,
                   curve_secret=keys.secret(key),
                   broker_key=keys.secrets / f"{broker_key}.key" if broker_key else keys.broker_public).start())
    refusals = lambda: [r for r in caplog.records if r.levelno == logging.ERROR and "refused our handshake" in r.message]
    wait_for(refusals, 10, message="the worker logging the refusal")
    # It keeps retrying (a key may be added to the list and the broker reloaded), quietly.
    wait_for(lambda: sum("still refuses" in r.message for r in caplog.records) >= 2, 10,
             message="two reconnections after the refusal")
    [refusal] = refusals()
    assert broker.backend_endpoint in refusal.message and reason in refusal.message
    assert not broker.engine.workers


def test_a_refused_worker_still_reports_its_broker_going_silent_afterwards(keys, running, caplog):
    """The refusal is said once; a broker that is then gone is a different story, and is told."""
    broker = Broker(keys.config()).start()
    caplog.set_level(logging.WARNING, logger="zrpc.worker")
    try:
        running(Worker([Echo()], brokers=broker.backend_endpoint, heartbeat_interval=0.05, liveness=2,
                       curve_secret=keys.secret("alice"), broker_key=keys.broker_public).start())
        wait_for(lambda: any("refused our handshake" in r.message for r in caplog.records), 10,
                 message="the refusal")
    finally:
        broker.stop()
    # It never answered us: not "silent", but not (or no longer) there.
    wait_for(lambda: any("no answer from a broker at" in r.message for r in caplog.records), 10,
             message="a warning that the broker went silent")


def test_worker_key_cannot_call_through_the_frontend(keys, running):
    broker = start_broker(running, keys.config())
    as_worker = client(running, keys, broker, key="w1")
    with pytest.raises(Error) as info:
        say(as_worker)
    assert info.value.code == StatusCode.UNAUTHENTICATED


def test_access_rules_deny_services_with_permission_denied_and_refuse_registrations(keys, running):
    rules = keys.root / "rules.toml"
    rules.write_text('[clients]\nalice = ["echo.*"]\n"*" = []\n\n[workers]\nw1 = ["echo.Echo"]\n')
    broker = start_broker(running, keys.config(access_rules=str(rules)))
    start_worker(running, keys, broker)
    wait_for(lambda: served(broker), 10, message="worker registered")
    assert say(client(running, keys, broker)) == b"hi"
    bob = client(running, keys, broker, key="bob")
    with pytest.raises(Error) as info:
        say(bob)
    assert info.value.code == StatusCode.PERMISSION_DENIED
    assert "bob" in info.value.message
    bob.call("zrpc.Broker", "ListServices", b"")  # the built-in service stays callable

    # A worker key that may not offer echo.Echo is refused at READY, and counted.
    rules.write_text('[workers]\nw1 = ["other.*"]\n')
    broker.reload_keys()
    wait_for(lambda: not broker.engine.workers, 10, message="worker dropped after its rule changed")
    wait_for(lambda: broker.engine.counters["malformed_forbidden_service"] >= 1, 10,
             message="re-registration refused")


def test_access_rules_hide_the_services_a_key_may_not_call_from_the_built_in_service(keys, running):
    """A tester's key denied every service listed them all with ListServices, workers and all,
    and described them; the broker now answers as for a call to them."""
    from zrpc import broker_service_pb2 as bpb

    rules = keys.root / "rules.toml"
    rules.write_text('[clients]\nalice = ["echo.*"]\n"*" = []\n')
    broker = start_broker(running, keys.config(access_rules=str(rules)))
    start_worker(running, keys, broker)
    wait_for(lambda: served(broker), 10, message="worker registered")

    def listed(key: str) -> list[str]:
        raw = client(running, keys, broker, key=key).call("zrpc.Broker", "ListServices", b"")
        return [s.name for s in bpb.ListServicesReply.FromString(raw).services]

    assert listed("alice") == ["zrpc.Broker", "echo.Echo"]
    assert listed("bob") == ["zrpc.Broker"]
    bob = client(running, keys, broker, key="bob")
    for method, request in [("DescribeService", bpb.DescribeServiceRequest(service="echo.Echo")),
                            ("Health", bpb.HealthRequest(service="echo.Echo"))]:
        with pytest.raises(Error) as info:
            bob.call("zrpc.Broker", method, request.SerializeToString())
        assert info.value.code == StatusCode.PERMISSION_DENIED, method
        assert info.value.message == "key 'bob' may not call service 'echo.Echo' (broker access rules)"
    health = bpb.HealthReply.FromString(bob.call("zrpc.Broker", "Health", b""))  # the broker's own
    assert health.status == bpb.HealthReply.SERVING
    assert broker.engine.counters["permission_denied"] == 2


def test_rule_names_that_match_no_key_and_secret_keys_in_an_allow_list_are_warned_of(keys, running, caplog):
    """A tester's rules file named `alcie` (for alice): loaded without a word, found only when
    alice's calls were denied. And an allow-list holding *.key_secret files (the directory keys
    were generated in) admitted every key made there."""
    caplog.set_level(logging.WARNING, logger="zrpc")
    rules = keys.root / "rules.toml"
    alice_key = security.load_public_key(keys.clients / "alice.key").decode()
    rules.write_text(f'[clients]\nalcie = ["echo.*"]\n"{alice_key}" = ["kv.*"]\n"*" = []\n\n'
                     f'[workers]\nw1 = ["echo.Echo"]\n')
    start_broker(running, keys.config(access_rules=str(rules), client_keys=str(keys.secrets)))
    said = [r.getMessage() for r in caplog.records]
    assert [line for line in said if "match no key" in line] == [
        f"access rules {rules}: [clients] names 'alcie', which match no key in the client allow-list "
        f"(it holds: alice, bob, broker, w1)"]
    assert any(line.startswith(f"client allow-list {keys.secrets} holds secret keys (alice.key_secret, ")
               for line in said), said


def test_revoked_client_with_a_live_connection_is_refused_after_reload(keys, running):
    broker = start_broker(running, keys.config())
    start_worker(running, keys, broker)
    wait_for(lambda: served(broker), 10, message="worker registered")
    alice = client(running, keys, broker)
    assert say(alice) == b"hi"  # the connection is up and authenticated
    (keys.clients / "alice.key").unlink()
    broker.reload_keys()
    with pytest.raises(Error) as info:
        say(alice)
    assert info.value.code == StatusCode.UNAUTHENTICATED
    assert "not allowed" in info.value.message
    assert say(client(running, keys, broker, key="bob")) == b"hi"  # others are unaffected


def test_revoked_worker_with_a_live_connection_is_dropped_after_reload(keys, running, monkeypatch):
    """And it then sends the broker only its READYs, less and less often: a tester's revoked
    worker kept heartbeating, and the broker refused and logged each heartbeat (every 0.1 s
    here), which also counted as a refusal and lengthened the wait for the next READY."""
    from zrpc._worker._link import BrokerLink

    sent = {"ready": 0, "heartbeat": 0}
    send_ready, heartbeat = BrokerLink.send_ready, BrokerLink.heartbeat

    def counted_ready(link):
        sent["ready"] += 1
        send_ready(link)

    def counted_heartbeat(link, now):
        sent["heartbeat"] += 1
        heartbeat(link, now)

    broker = start_broker(running, keys.config())
    start_worker(running, keys, broker)
    wait_for(lambda: served(broker), 10, message="worker registered")
    monkeypatch.setattr(BrokerLink, "send_ready", counted_ready)
    monkeypatch.setattr(BrokerLink, "heartbeat", counted_heartbeat)
    (keys.workers / "w1.key").unlink()
    broker.reload_keys()
    wait_for(lambda: not broker.engine.workers, 10, message="revoked worker removed")
    assert broker.engine.counters["workers_revoked"] == 1
    with pytest.raises(Error) as info:
        say(client(running, keys, broker), timeout=3.0)
    assert info.value.code == StatusCode.UNAVAILABLE
    # READYs 0.2, 0.6 and 1.4 s after the first refusal (heartbeats every 0.1 s).
    wait_for(lambda: sent["ready"] >= 3, 15, message="three READYs, each refused")
    # Heartbeats leave after a READY only until its refusal is read: one or two on a loaded
    # machine, none in between (before the fix: every 0.1 s, and the READYs came ever later).
    assert sent["heartbeat"] <= 2 * sent["ready"] + 1, sent
    assert broker.engine.counters["refused_unauthenticated"] <= sent["ready"] + sent["heartbeat"] + 1


def test_flood_of_unauthenticated_handshakes_does_not_hurt_authorised_calls(keys, running):
    broker = start_broker(running, keys.config())
    start_worker(running, keys, broker)
    wait_for(lambda: served(broker), 10, message="worker registered")
    alice = client(running, keys, broker)
    context = zmq.Context()
    intruders = []
    try:
        server_key = security.load_public_key(keys.broker_public)
        for _ in range(200):
            intruder = context.socket(zmq.DEALER)
            intruder.linger = 0
            security.apply_client_curve(intruder, security.KeyPair(*zmq.curve_keypair()), server_key)
            intruder.connect(broker.frontend_endpoint)
            intruder.send_multipart([b"ZRPC1", b"\x02", b"junk", b"junk"], zmq.NOBLOCK)
            intruders.append(intruder)
        futures = [alice.call_future(SERVICE, "Say", echo_pb2.EchoRequest(payload=b"%d" % i).SerializeToString(),
                                     timeout=10.0) for i in range(200)]
        replies = [echo_pb2.EchoReply.FromString(f.result(15)).payload for f in futures]
        assert replies == [b"%d" % i for i in range(200)]
        wait_for(lambda: broker.security.refusals[security.FRONTEND_DOMAIN] >= 200, 15,
                 message="200 refused handshakes")
        assert broker.engine.counters["requests"] >= 200
    finally:
        for intruder in intruders:
            intruder.close(0)
        context.term()


# ---------------------------------------------------------------------------- the wire


class Relay:
    """A loopback TCP relay that records every byte it forwards in both directions."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.captured = bytearray()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pairs: dict[socket.socket, socket.socket] = {}
        try:
            while not self._stop.is_set():
                readable, _, _ = select.select([self.listener, *pairs], [], [], 0.05)
                for sock in readable:
                    if sock is self.listener:
                        inbound, _ = self.listener.accept()
                        outbound = socket.create_connection(("127.0.0.1", self.target_port))
                        pairs[inbound], pairs[outbound] = outbound, inbound
                        continue
                    try:
                        chunk = sock.recv(65536)
                    except OSError:
                        chunk = b""
                    peer = pairs.get(sock)
                    if not chunk or peer is None:
                        for s in (sock, peer):
                            if s is not None:
                                pairs.pop(s, None)
                                s.close()
                        continue
                    with self._lock:
                        self.captured += chunk
                    peer.sendall(chunk)
        finally:
            for s in pairs:
                s.close()
            self.listener.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def bytes(self) -> bytes:
        with self._lock:
            return bytes(self.captured)


@pytest.mark.parametrize("curve", [True, False], ids=["curve", "plain-control"])
def test_payload_never_crosses_the_wire_in_plaintext_under_curve(keys, running, curve):
    config = keys.config() if curve else BrokerConfig(frontend="tcp://127.0.0.1:0", backend="tcp://127.0.0.1:0",
                                                     unknown_service_grace=0.0)
    broker = start_broker(running, config)
    if curve:
        start_worker(running, keys, broker)
    else:
        running(Worker([Echo()], brokers=broker.backend_endpoint, heartbeat_interval=0.1).start())
    wait_for(lambda: served(broker), 10, message="worker registered")
    relay = running(Relay(int(broker.frontend_endpoint.rsplit(":", 1)[1])))
    endpoint = f"tcp://127.0.0.1:{relay.port}"
    caller = client(running, keys, endpoint) if curve else running(Client(endpoint, timeout=5.0))
    assert say(caller, MARKER) == MARKER
    captured = relay.bytes()
    assert len(captured) > 2 * len(MARKER)  # the relay did carry the call
    assert (MARKER in captured) is (not curve)


# ---------------------------------------------------------------------------- the CLI


def test_cli_keys_generate_writes_a_0600_secret(tmp_path):
    from click.testing import CliRunner

    from zrpc._cli.main import main

    result = CliRunner().invoke(main, ["keys", "generate", "node", "--dir", str(tmp_path / "k")])
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(os.stat(tmp_path / "k" / "node.key_secret").st_mode) == 0o600
    assert security.load_keypair(tmp_path / "k" / "node.key_secret").public == \
        security.load_public_key(tmp_path / "k" / "node.key")
    bad = CliRunner().invoke(main, ["keys", "generate", "../x", "--dir", str(tmp_path)])
    assert bad.exit_code == 2


def test_cli_broker_worker_and_call_over_curve(keys, spawn, endpoints):
    from tests.conftest import zrpc_cli

    frontend, backend = endpoints
    broker = spawn(*zrpc_cli("broker", "start", "--frontend", frontend, "--backend", backend,
                             "--unknown-service-grace", "0", "--curve-secret", str(keys.broker_secret),
                             "--client-keys", str(keys.clients), "--worker-keys", str(keys.workers)))
    broker.wait_line("zrpc broker ready")
    worker = spawn(*zrpc_cli("worker", "run", "workers.echo:Echo", "--broker", backend,
                             "--curve-secret", str(keys.secret("w1")), "--broker-key", str(keys.broker_public)))
    worker.wait_line("zrpc worker ready")

    def call(key: str) -> Process:
        return spawn(*zrpc_cli("call", "echo.Echo/Say", '{"payload": "aGk="}', "--broker", frontend,
                               "--timeout", "10", "--curve-secret", str(keys.secret(key)),
                               "--broker-key", str(keys.broker_public)))

    def finished(process: Process) -> int:
        wait_for(lambda: process.popen.poll() is not None, 20, message=f"{process.args} to exit")
        return process.stop()

    # The worker registers within a heartbeat or two; a call before that waits in the queue.
    good = call("alice")
    assert finished(good) == 0, good.errors
    assert any("aGk=" in line for line in good.lines)
    refused = call("w1")  # a worker key on the frontend
    assert finished(refused) == 10 + StatusCode.UNAUTHENTICATED
    assert any("UNAUTHENTICATED" in line and "handshake refused" in line for line in refused.errors)


def test_a_rules_file_that_is_not_toml_is_named_in_the_error(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text("[clients]\nalice = [\n")
    with pytest.raises(ValueError, match=f"{path}: not valid TOML"):
        security.load_rules(path)


def test_a_refusal_that_says_why_is_not_replaced_by_a_closed_handshake_that_does_not():
    """A CURVE client at a plain broker: ZeroMQ first reports the mechanism mismatch, and after
    the client connects again for its next call, often only a handshake the broker closed. A
    tester read "drop --broker-key" in the log, then a final error asking "is CURVE on at the
    broker?"."""
    import zmq

    from zrpc._client._monitor import HandshakeWatch

    endpoint = "tcp://127.0.0.1:5555"
    watch = HandshakeWatch([endpoint], curve=True)
    error = watch.on_event(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH, endpoint)
    assert "does not use CURVE: drop --broker-key" in error.message
    assert watch.to_retry() == [endpoint]  # the next call connects again
    error = watch.on_event(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, 0, endpoint)
    assert error.message == (f"handshake refused by broker at {endpoint}: the broker closed the handshake; the "
                             f"attempt before was refused: the broker there does not use CURVE: drop --broker-key "
                             f"and --curve-secret")
    # With nothing said before, a closed handshake says what it can.
    fresh = HandshakeWatch([endpoint], curve=True)
    assert "is CURVE on at the broker?" in fresh.on_event(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, 0, endpoint).message
