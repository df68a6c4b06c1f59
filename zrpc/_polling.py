"""busy_poll, which the broker and the worker share: its bounds, and handing the core over."""
from __future__ import annotations

import os

MAX_BUSY_POLL = 1.0  # seconds; longer only keeps a core busy longer after the last call

# Between looks a polling loop lets a process that waits for its core run (the worker or client
# it waits for, on a small host). POSIX only: elsewhere the loop just looks again.
yield_core = getattr(os, "sched_yield", lambda: None)


def busy_poll_problem(value: object) -> str | None:
    """Why ``value`` cannot be a busy_poll window, or None when it can."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"busy_poll must be a number of seconds, not {value!r}"
    if not 0 <= value <= MAX_BUSY_POLL:  # NaN fails this too
        return f"busy_poll must be between 0 and {MAX_BUSY_POLL:g} second (0: off), not {value!r}"
    return None
