"""Structured logs: JSON lines with extra fields, and the caller's trace id in handler logs."""
from __future__ import annotations

import io
import json
import logging

from zrpc import Client
from zrpc._logging import TRACE_ID, JsonFormatter, TextFormatter, setup_logging
from workers.echo import echo_pb2

from .conftest import wait_for, zrpc_cli

ECHO = echo_pb2.DESCRIPTOR.services_by_name["Echo"]


def json_lines(lines: list[str]) -> list[dict]:
    entries = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except ValueError:
            pass
    return entries


def test_json_formatter_writes_one_object_with_extra_fields_and_trace_id():
    stream = io.StringIO()
    handler = setup_logging("INFO", "json", stream)
    try:
        token = TRACE_ID.set("t-123")
        try:
            logging.getLogger("zrpc.test").warning("bad message from %s", "peer-1",
                                                   extra={"peer": "peer-1", "reason": "bad_tag"})
        finally:
            TRACE_ID.reset(token)
        logging.getLogger("zrpc.test").info("outside a call")
    finally:
        logging.getLogger().removeHandler(handler)
    first, second = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert first["level"] == "WARNING" and first["logger"] == "zrpc.test"
    assert first["msg"] == "bad message from peer-1"
    assert (first["peer"], first["reason"], first["trace_id"]) == ("peer-1", "bad_tag", "t-123")
    assert first["ts"].endswith("+00:00")
    assert "trace_id" not in second


def test_text_formatter_appends_fields_after_the_message():
    record = logging.LogRecord("zrpc.broker", logging.INFO, __file__, 1, "worker %s joined", ("w1",), None)
    record.peer = "w1"
    assert TextFormatter().format(record).endswith("INFO zrpc.broker worker w1 joined peer=w1")
    assert json.loads(JsonFormatter().format(record))["peer"] == "w1"


def test_trace_id_from_the_client_shows_in_the_worker_handler_json_log(spawn, cli_broker):
    _, frontend, backend = cli_broker
    worker = spawn(*zrpc_cli("worker", "run", "tests._chatty:Chatty", "--broker", backend,
                             "--heartbeat-interval", "0.2", "--log-format", "json"))
    worker.wait_line("zrpc worker ready")
    with Client(frontend, timeout=10.0) as client:
        stub = client.stub(ECHO)
        stub.Say(echo_pb2.EchoRequest(payload=b"abc"), metadata={"trace_id": "trace-sync-42"})
        stub.Sleep(echo_pb2.SleepRequest(ms=1), metadata={"trace_id": "trace-async-43"})

    def handler_lines():
        entries = [e for e in json_lines(worker.errors) if e.get("logger") == "chatty"]
        return entries if len(entries) == 2 else None

    said, slept = wait_for(handler_lines, message="two handler log lines")
    assert said["msg"] == "saying 3 bytes" and said["trace_id"] == "trace-sync-42"
    assert slept["msg"] == "sleeping 1 ms" and slept["trace_id"] == "trace-async-43"
    # Framework lines are JSON too, and none of them is per request at INFO.
    assert all(entry.get("logger") for entry in json_lines(worker.errors))
    assert not [line for line in worker.errors if not line.startswith("{")]


def test_broker_json_log_names_the_worker_that_joined(spawn, endpoints):
    frontend, backend = endpoints
    broker = spawn(*zrpc_cli("broker", "start", "--frontend", frontend, "--backend", backend,
                             "--log-format", "json"))
    broker.wait_line("zrpc broker ready")
    worker = spawn(*zrpc_cli("worker", "run", "workers.echo:Echo", "--broker", backend, "--name", "w-json"))
    worker.wait_line("zrpc worker ready")

    def joined():
        return [e for e in json_lines(broker.errors) if "joined" in e.get("msg", "")]

    entry = wait_for(joined, message="a worker joined line")[0]
    assert entry["logger"] == "zrpc.broker" and entry["level"] == "INFO"
    assert entry["peer"].endswith(":w-json") and entry["service"] == "echo.Echo"
