"""The threads that run plain (``def``) handlers, waking as few as the work needs.

A thread woken for one call costs a futex wake and a GIL hand-off each way (~30 µs on the
2-core benchmark machine), more than an echo handler itself. So calls wait in one queue and a
woken thread runs them one after another until the queue is empty; a second thread is woken
only when the first call in the queue has waited ``STALL`` seconds (a handler that blocks, or
a long one), which the loop checks with ``rebalance()`` while calls wait. Up to ``size``
threads run at once: the worker's concurrency, as before.

Measured with a fake broker sending 32 echo requests in one message to one worker: turnaround
p50 779 µs with one ``ThreadPoolExecutor.submit`` per call, 583 µs with this pool, 495 µs when
run inline on the loop (which would block heartbeats and other calls: not an option).
"""
from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Any

# How long the oldest queued call may wait before another thread is woken for it. The loop's
# timers resolve milliseconds (epoll), so less would only look more precise.
STALL = 0.001


class HandlerPool:
    """Runs ``run(call)`` for each submitted call on up to ``size`` threads; hands the answers to
    ``deliver([(call, answer)])`` (from a pool thread) as each call ends."""

    def __init__(self, size: int, run: Callable[[Any], Any], deliver: Callable[[list], None],
                 clock: Callable[[], float] = time.monotonic, name: str = "zrpc-handler"):
        if size < 1:
            raise ValueError("a handler pool needs at least one thread")
        self.size = size
        self._run = run
        self._deliver = deliver
        self._clock = clock
        self._name = name
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: collections.deque = collections.deque()  # (call, queued at)
        self._threads: list[threading.Thread] = []
        self._active = 0  # threads awake (running a call or about to take one), or asked to wake
        self._closed = False

    @property
    def queued(self) -> int:
        """Calls waiting for a thread."""
        return len(self._queue)

    def submit(self, call: Any) -> None:
        """Queue a call; wakes a thread only if none is awake to take it."""
        with self._lock:
            if self._closed:
                raise RuntimeError("handler pool is closed")
            self._queue.append((call, self._clock()))
            if self._active == 0:
                self._add_threads(1)

    def rebalance(self) -> float | None:
        """Wake a thread per call that waited ``STALL`` or more; the seconds until the next look
        is due, or None when nothing waits. The worker's loop calls this while calls are queued."""
        with self._lock:
            if not self._queue:
                return None
            now = self._clock()
            stalled = 0
            for _, queued_at in self._queue:
                if now - queued_at < STALL:
                    break
                stalled += 1
            if stalled:
                self._add_threads(stalled)
            return STALL

    def close(self, wait: bool, timeout: float | None = None) -> list:
        """Stop taking calls; the threads finish the call they run, then end. Returns the calls that
        never started. With ``wait``, joins the threads (up to ``timeout`` seconds)."""
        with self._lock:
            self._closed = True
            left = [call for call, _ in self._queue]
            self._queue.clear()
            self._wake.notify_all()
            threads = list(self._threads)
        if wait:
            give_up_at = None if timeout is None else time.monotonic() + timeout
            for thread in threads:
                thread.join(None if give_up_at is None else max(0.0, give_up_at - time.monotonic()))
        return left

    # ------------------------------------------------------------------ threads

    def _add_threads(self, count: int) -> None:
        """(lock held) Wake up to ``count`` sleeping threads, starting new ones up to ``size``."""
        sleeping = len(self._threads) - self._active
        wake = min(count, sleeping)
        if wake:
            self._active += wake
            self._wake.notify(wake)
        for _ in range(min(count - wake, self.size - len(self._threads))):
            self._active += 1
            # Daemon: a handler that never returns must not keep the process alive after its drain.
            thread = threading.Thread(target=self._serve, name=f"{self._name}-{len(self._threads)}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._active -= 1
                    if self._closed:
                        return
                    self._wake.wait()  # whoever woke us counted us active again
                    if self._closed:
                        return
                    continue
                call, _ = self._queue.popleft()
            # Hand each answer back before taking the next call: the next handler may block, and
            # an answer held for it waited with it (a stalled handler held a finished call's
            # reply until its deadline). ``deliver`` batches the loop's wake-ups itself.
            self._deliver([(call, self._run(call))])
