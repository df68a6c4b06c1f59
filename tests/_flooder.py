"""A connection flood: ``python -m tests._flooder HOST PORT N`` opens N plain TCP connections
(no ZeroMQ handshake, nothing sent) and holds them until SIGTERM, then closes them and exits.

A SYN that finds the listener's accept queue full is dropped, and the kernel retries it only
after 1 s, 3 s, 7 s...: fired all at once, how many connections reach the broker in a few
seconds is luck (measured: 900 to 1,600 of 3,000). So connections go in batches, each sent only
once the broker's accept queue (read from /proc/net/tcp) has room for it; every wait is bounded.
Prints ``opened N reached M`` when done (M: handshakes completed, whatever the broker did next).
Runs as its own process so that its descriptors count against its own limit (raised to the hard
limit), not the test's. Lives 60 s at most when nobody stops it.
"""
from __future__ import annotations

import resource
import select
import signal
import socket
import sys
import threading
import time

BACKLOG = 100  # libzmq's listen backlog (ZMQ_BACKLOG default)
BATCH = 50
WAIT = 2.0  # seconds, at most, for one batch to complete and to be taken off the queue


def accept_queue(port: int) -> int:
    """Connections waiting in the accept queue of the IPv4 listener on ``port``."""
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                return int(fields[4].split(":")[1], 16)  # rx_queue of a listener: its accept queue
    return 0


def main() -> None:
    host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # taken below, synchronously
    held: list[socket.socket] = []
    reached = 0
    while len(held) < count:
        deadline = time.monotonic() + WAIT
        while accept_queue(port) > BACKLOG - BATCH and time.monotonic() < deadline:
            threading.Event().wait(0.001)  # a bounded poll interval, not synchronisation
        poller = select.poll()
        batch = min(BATCH, count - len(held))
        for _ in range(batch):
            connection = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            connection.setblocking(False)
            connection.connect_ex((host, port))  # EINPROGRESS: the kernel completes it
            poller.register(connection, select.POLLOUT)
            held.append(connection)
        deadline = time.monotonic() + WAIT
        while batch and time.monotonic() < deadline:
            for fd, _ in poller.poll(max(1, int((deadline - time.monotonic()) * 1000))):
                poller.unregister(fd)
                batch -= 1
                reached += 1
    print(f"opened {len(held)} reached {reached}", flush=True)
    signal.sigtimedwait({signal.SIGTERM}, 60.0)
    for connection in held:
        connection.close()
    print("closed", flush=True)


if __name__ == "__main__":
    main()
