"""The pool that runs plain handlers: few threads for fast calls, more as soon as calls stall."""
from __future__ import annotations

import threading

import pytest

from zrpc._worker._pool import HandlerPool

from .conftest import wait_for


class Recorder:
    """Collects what the pool hands back, and which threads ran what."""

    def __init__(self):
        self.lock = threading.Lock()
        self.answers: dict[int, object] = {}
        self.threads: set[str] = set()

    def deliver(self, done: list) -> None:
        with self.lock:
            for call, answer in done:
                self.answers[call] = answer


def test_fast_calls_are_run_by_one_thread():
    recorder = Recorder()

    def run(call: int) -> int:
        recorder.threads.add(threading.current_thread().name)
        return call * 2

    pool = HandlerPool(16, run, recorder.deliver)
    try:
        for call in range(200):
            pool.submit(call)
        wait_for(lambda: len(recorder.answers) == 200, 10, message="200 answers")
        assert recorder.answers == {call: call * 2 for call in range(200)}
        # Nobody called rebalance(): no call waited long enough to need a second thread.
        assert len(recorder.threads) == 1
    finally:
        pool.close(wait=True, timeout=5)


def test_an_answer_is_handed_back_before_the_same_thread_runs_a_call_that_blocks():
    """A thread that held finished answers to hand them back together held them while it ran
    the next call: behind a handler that hung, an answered call timed out at its client."""
    recorder = Recorder()
    second_queued, release = threading.Event(), threading.Event()

    def run(call: int) -> int:
        if call == 1:
            assert second_queued.wait(10), "the second call was never queued"
        else:  # the thread took call 2 right after call 1: it blocks
            assert release.wait(10), "never released"
        return call

    pool = HandlerPool(4, run, recorder.deliver)
    try:
        pool.submit(1)
        pool.submit(2)
        second_queued.set()
        wait_for(lambda: 1 in recorder.answers, 5, message="the answer of call 1 while call 2 blocks")
        assert 2 not in recorder.answers
        release.set()
        wait_for(lambda: 2 in recorder.answers, 5, message="the answer of call 2")
    finally:
        release.set()
        pool.close(wait=True, timeout=5)


def test_calls_stalled_behind_blocking_handlers_get_threads_of_their_own():
    recorder = Recorder()
    release = threading.Event()
    running = threading.Semaphore(0)

    def run(call: int) -> int:
        running.release()
        assert release.wait(10), "never released"
        return call

    pool = HandlerPool(4, run, recorder.deliver)
    try:
        for call in range(6):
            pool.submit(call)
        assert running.acquire(timeout=5)  # one thread took the first call and blocks in it

        def four_running() -> bool:
            pool.rebalance()  # what the worker's loop does each STALL while calls wait
            return pool.queued == 2

        wait_for(four_running, 10, message="four calls running at once")
        for _ in range(3):
            assert running.acquire(timeout=5)
        assert not running.acquire(timeout=0.05)  # the pool's size bounds it: the fifth waits
        release.set()
        wait_for(lambda: len(recorder.answers) == 6, 10, message="all six answered")
    finally:
        release.set()
        pool.close(wait=True, timeout=5)


def test_close_returns_the_calls_that_never_started():
    recorder = Recorder()
    release = threading.Event()
    started = threading.Event()

    def run(call: int) -> int:
        started.set()
        release.wait(10)
        return call

    pool = HandlerPool(1, run, recorder.deliver)
    for call in range(3):
        pool.submit(call)
    assert started.wait(5)
    assert pool.close(wait=False) == [1, 2]
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit(3)
    release.set()
    pool.close(wait=True, timeout=5)
    assert recorder.answers == {0: 0}


def test_a_pool_needs_a_thread():
    with pytest.raises(ValueError, match="at least one thread"):
        HandlerPool(0, lambda call: call, lambda done: None)
