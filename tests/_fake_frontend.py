"""A stand-in for the broker's frontend, for client tests: a ROUTER in a thread.

It records every request header (and when it came) and every CANCEL, and answers each request
as the subclass's ``answer`` says; the answers to one REQUEST leave in one REPLY (spec §4).
"""
from __future__ import annotations

import threading
import time

import zmq

from zrpc import _protocol

WAIT = 10.0  # bound on waiting for the frontend's thread or for what it sees


class FakeFrontend:
    thread_name = "fake-frontend"

    def __init__(self, endpoint: str | None = None):
        self.context = zmq.Context()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.linger = 0
        if endpoint is None:
            port = self.router.bind_to_random_port("tcp://127.0.0.1")
            endpoint = f"tcp://127.0.0.1:{port}"
        else:
            self.router.bind(endpoint)
        self.endpoint = endpoint
        self.requests: list = []  # RequestHeader, in arrival order
        self.times: list[float] = []  # when each arrived (time.monotonic)
        self.request_messages = 0
        self.cancels: list[int] = []
        self.cancel_deadlines: list[bool] = []  # each CANCEL's `deadline` flag (spec §8)
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.thread_name)
        self._thread.start()

    def answer(self, header, payload: bytes) -> tuple[bytes, bytes] | None:
        """The (reply header, payload) for one request, or None to never answer it."""
        raise NotImplementedError

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(20):  # the interval at which stop() is noticed
                continue
            peer, *frames = self.router.recv_multipart()
            command, body = _protocol.split(frames, _protocol.CLIENT_COMMANDS)
            if command == _protocol.CANCEL:
                cancel = _protocol.decode_cancel(body)
                with self._changed:
                    self.cancel_deadlines.append(cancel.deadline)
                    self.cancels.extend(cancel.request_ids)
                    self._changed.notify_all()
                continue
            with self._changed:
                self.request_messages += 1
            answers = []
            for raw_header, payload in _protocol.pairs(body):
                header = _protocol.decode_request_header(raw_header)
                answer = self.answer(header, payload)
                with self._changed:
                    self.requests.append(header)
                    self.times.append(time.monotonic())
                    self._changed.notify_all()
                if answer is not None:
                    answers.append(answer)
            if answers:
                self.router.send_multipart([peer, *_protocol.reply_message(answers)])

    def count(self, method: str | None = None) -> int:
        with self._changed:
            return sum(1 for h in self.requests if method is None or h.method == method)

    def wait_for(self, predicate, timeout: float = WAIT) -> None:
        with self._changed:
            assert self._changed.wait_for(predicate, timeout), "the fake frontend never saw it"

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(WAIT)
        assert not self._thread.is_alive()
        self.router.close()
        self.context.term()
