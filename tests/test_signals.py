"""SignalWait: how `zrpc worker run` and `zrpc status` wait for SIGTERM and SIGINT.

Each case runs in a child process of its own: it installs signal handlers and sends signals.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

_PRELUDE = """
import os, random, signal, threading, time
from zrpc._cli._signals import SignalWait

def wait_for_signal(waiter, slice_seconds=0.05, within=5.0):
    give_up = time.monotonic() + within
    while (signum := waiter.wait(slice_seconds)) is None:
        assert time.monotonic() < give_up, "no signal seen within %gs" % within
    return signum
"""


def _run(body: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    script = _PRELUDE + textwrap.dedent(body)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return done


def test_a_signal_landing_on_another_thread_wakes_the_main_thread_at_once():
    # A kill from outside may be delivered to any thread that does not block it: Python runs
    # the handler in the main thread only at its next bytecode, which a thread blocked in a
    # wait never reaches. The C handler's byte in the wake-up pipe must end the wait.
    done = _run("""
        parked = threading.Event()
        receiver = threading.Thread(target=parked.wait, daemon=True)
        receiver.start()
        with SignalWait() as waiter:
            threading.Timer(0.2, signal.pthread_kill, (receiver.ident, signal.SIGTERM)).start()
            began = time.monotonic()
            signum = waiter.wait(30.0)
            print(signum, round(time.monotonic() - began, 3))
    """)
    signum, waited = done.stdout.split()
    assert int(signum) == signal.SIGTERM
    assert float(waited) < 25.0  # woken by the signal, not by the 30 s timeout


def test_signals_at_random_moments_are_each_seen_and_handlers_come_back():
    done = _run("""
        parked = threading.Event()
        receiver = threading.Thread(target=parked.wait, daemon=True)
        receiver.start()
        rng = random.Random(20261203)
        seen = []
        for round_ in range(200):
            with SignalWait() as waiter:
                # Alternate the main thread and a parked one as the thread the signal lands on.
                target = threading.main_thread().ident if round_ % 2 else receiver.ident
                sender = threading.Timer(rng.uniform(0, 0.003), signal.pthread_kill, (target, signal.SIGINT))
                sender.start()
                seen.append(wait_for_signal(waiter, slice_seconds=rng.choice([0.0001, 0.001, 0.01])))
                sender.join()
        assert seen == [signal.SIGINT] * 200, seen
        # Outside, the previous handlers are back: Python's own for SIGINT, the default for SIGTERM.
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        assert signal.set_wakeup_fd(-1) == -1
        print("ok")
    """)
    assert done.stdout.strip() == "ok"


def test_only_the_signals_asked_for_are_taken():
    done = _run("""
        with SignalWait((signal.SIGINT,)) as waiter:
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
            signal.signal(signal.SIGUSR1, lambda *_: None)  # handled by someone else: not ours
            os.kill(os.getpid(), signal.SIGUSR1)
            assert waiter.wait(0.05) is None
            os.kill(os.getpid(), signal.SIGINT)
            assert wait_for_signal(waiter) == signal.SIGINT
            assert waiter.wait(0) == signal.SIGINT  # the first one stays the answer
        print("ok")
    """)
    assert done.stdout.strip() == "ok"


def test_outside_the_main_thread_nothing_is_installed_and_wait_times_out():
    done = _run("""
        result = []
        def in_thread():
            with SignalWait() as waiter:
                result.append((waiter.wait(0.01), signal.getsignal(signal.SIGTERM)))
        thread = threading.Thread(target=in_thread)
        thread.start()
        thread.join(10)
        assert result == [(None, signal.SIG_DFL)], result
        print("ok")
    """)
    assert done.stdout.strip() == "ok"
