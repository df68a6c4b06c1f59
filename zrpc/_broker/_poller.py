"""The broker loop's wait: its zmq sockets watched through their ZMQ_FDs, one poll() a wait.

zmq.Poller (zmq_poll) asks every socket for its ZMQ_EVENTS before it sleeps and again after it
wakes, and libzmq answers each ask of an idle socket with two system calls (getpid(), its fork
check, and a poll() of the socket's command pipe). For the broker's five sockets (clients,
workers, the wake-up pipe, two connection monitors) strace counted 33 poll() and 37 getpid()
calls per call at one call in flight, where each wake-up handles one message.

Here the kernel watches the five FDs and a socket is asked only when its FD signalled or the loop
used it since its last ask. A ZMQ_FD is edge-triggered: libzmq takes its signal when it reads the
socket's command pipe, which any send or receive may do, so a socket the loop sent to, or stopped
reading before it was empty, must be asked again before the loop sleeps (``used``). A socket
left alone keeps its FD readable until it is asked, so none is missed.
"""
from __future__ import annotations

import select

import zmq

from .._frames import readable


class SocketPoller:
    """Which of the registered sockets hold a message; ``poll`` is the loop's only wait."""

    def __init__(self) -> None:
        self._poll = select.poll()
        self._by_fd: dict[int, zmq.Socket] = {}
        self._due: set[zmq.Socket] = set()  # to ask before the next wait (see used)

    def register(self, socket: zmq.Socket) -> None:
        fd = socket.FD
        self._by_fd[fd] = socket
        self._poll.register(fd, select.POLLIN)
        self._due.add(socket)  # a message may wait already: its signal may have been taken

    def used(self, socket: zmq.Socket) -> None:
        """``socket`` was sent to, or read without a last empty look: ask it before sleeping."""
        self._due.add(socket)

    def poll(self, timeout_ms: int) -> set[zmq.Socket]:
        """The sockets holding a message; waits up to ``timeout_ms`` for one (0: looks only)."""
        ready = set()
        if self._due:
            due, self._due = self._due, set()
            for socket in due:
                if readable(socket):
                    ready.add(socket)
            if ready:
                timeout_ms = 0  # still look at the FDs: a monitor must not wait for a lull
        for fd, _ in self._poll.poll(timeout_ms):
            socket = self._by_fd[fd]
            if socket not in ready and readable(socket):  # asking takes the FD's signal
                ready.add(socket)
        return ready
