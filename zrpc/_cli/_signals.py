"""Stop signals (SIGINT, SIGTERM) as something the main thread waits for, with no lock involved.

A Python signal handler runs in the main thread between two bytecodes, wherever that thread is,
including inside ``threading.Event.wait`` just after it took the Event's lock back: a handler
that calls ``Event.set()`` then waits for a lock its own thread holds, for ever. `zrpc worker run`
did that, and hung on SIGTERM once in six tries when the signal came as a 0.5 s wait ended.

Here the handler only appends to a list, and the wake-up comes from the C-level handler, which
writes each signal's number to a pipe (``signal.set_wakeup_fd``) that ``wait`` selects on.
"""
from __future__ import annotations

import os
import select
import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class SignalWait:
    """While inside ``with``, ``signals`` are recorded, not acted on; ``wait`` returns the first.

    Outside the main thread (where Python cannot handle signals) nothing is installed and
    ``wait`` only waits out its timeout.
    """

    def __init__(self, signals=STOP_SIGNALS):
        self._signals = tuple(signals)
        self.received: list[int] = []
        self.count = 0  # every one of ``signals`` received, repeats included (see wait_for_another)
        self._read_fd = self._write_fd = -1
        self._previous_handlers: dict[int, object] = {}
        self._previous_wakeup_fd: int | None = None

    def __enter__(self) -> "SignalWait":
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)  # set_wakeup_fd requires it: a handler never blocks
        if threading.current_thread() is threading.main_thread():
            self._previous_wakeup_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
            self._previous_handlers = {s: signal.signal(s, self._record) for s in self._signals}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        if self._previous_wakeup_fd is not None:
            signal.set_wakeup_fd(self._previous_wakeup_fd)
        os.close(self._read_fd)
        os.close(self._write_fd)

    def _record(self, signum, frame) -> None:
        if signum not in self.received:  # no lock: see the module's docstring
            self.received.append(signum)

    def wait(self, timeout: float) -> int | None:
        """The first signal received, waiting up to ``timeout`` seconds for one; else None."""
        if not self.received:
            select.select([self._read_fd], [], [], timeout)
        # Also when the handler recorded it first: its number is in the pipe already (written by
        # the C handler), and ``count`` must hold it before a wait_for_another.
        self._read_pipe()
        return self.received[0] if self.received else None

    def wait_for_another(self, seen: int, timeout: float) -> bool:
        """Whether more than ``seen`` signals came (``count`` then), waiting up to ``timeout``."""
        if self.count <= seen:
            select.select([self._read_fd], [], [], timeout)
            self._read_pipe()
        return self.count > seen

    def _read_pipe(self) -> None:
        # The pipe holds each signal's number, written before the Python handler runs. Several,
        # other signals too: see what is ours, never wait on an empty pipe.
        for number in _read_available(self._read_fd):
            if number in self._signals:
                self.count += 1
                if number not in self.received:
                    self.received.append(number)


def _read_available(fd: int) -> bytes:
    try:
        return os.read(fd, 512)
    except BlockingIOError:  # the handler's own entry was read by an earlier wait
        return b""
