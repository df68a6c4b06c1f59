"""A message flood: ``python -m tests._message_flooder ENDPOINT ROUNDS COUNT`` connects a DEALER,
sends COUNT small messages as fast as the socket takes them (a CANCEL for an id nobody holds, the
cheapest message for a broker to handle), disconnects, and does that ROUNDS times. Each round
lasts 5 s at most. Prints ``sent N`` when done.

Three of these at once fill a broker's receive queue for a connection (its input stops at the
high-water mark) and then drop the connection: the pattern that made libzmq abort a broker
that used ZMTP heartbeats (see test_faults_more).
"""
from __future__ import annotations

import sys
import time

import zmq

MESSAGE = [b"ZRPC1", b"\x06", b"\x0a\x01\x07"]  # CANCEL{request_ids: [7]}
ROUND_SECONDS = 5.0


def main() -> None:
    endpoint, rounds, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    total = 0
    for _ in range(rounds):
        context = zmq.Context()
        socket = context.socket(zmq.DEALER)
        socket.linger = 0
        socket.rcvhwm = 1
        socket.connect(endpoint)
        ends_at = time.monotonic() + ROUND_SECONDS
        sent = 0
        while sent < count and time.monotonic() < ends_at:
            try:
                socket.send_multipart(MESSAGE, zmq.NOBLOCK)
                sent += 1
            except zmq.Again:  # the queue is full: let the I/O thread move some
                time.sleep(0.0005)
        socket.close()
        context.term()
        total += sent
    print(f"sent {total}", flush=True)


if __name__ == "__main__":
    main()
