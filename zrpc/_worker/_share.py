"""One capacity shared by the brokers a worker serves (spec §7b).

Each broker dispatches to a worker up to the capacity its READY announced. A worker serving two
brokers would then hold up to twice its capacity, the excess waiting inside it where neither
broker's queue shows it (and where another worker, free, cannot take it). So, whenever the calls
it holds change, the worker tells each broker what it may hold there now: its capacity less what
the other brokers hold. Each broker's view of the worker's free slots is then the worker's own.
Two brokers may still both fill the last free slot before they hear of it: that call waits in
the worker, as before, but only for as long as one message takes.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from .. import _protocol as p


# An increase waits this long (seconds): a slot freed by one broker's call goes back to that
# broker first. Its reply tells it of the slot, and a busy broker sends its next call within a
# round trip; told to the others at once, they would fill the same slot too (a new-user tester
# saw a worker of concurrency 2 hold 4 calls under load from two brokers).
REFILL_WINDOW = 0.01


class CapacityShare:
    """Tell each of ``links`` (BrokerLink) what it may hold: ``capacity`` less what the others hold.

    ``held()`` is how many calls the worker holds in all (running or waiting for a slot, the
    orphans of a forgotten registration included: they still take their slots); a link's own
    are its ``in_flight``. ``changed()`` is cheap: decreases are told once per loop turn,
    increases REFILL_WINDOW later, if the slot is still free then.
    """

    def __init__(self, capacity: int, held: Callable[[], int], links: Sequence, loop: asyncio.AbstractEventLoop):
        self.capacity = capacity
        self._held = held
        self._links = links
        self._loop = loop
        self._scheduled = False
        self._growth_due = None  # the timer of the increases waiting out REFILL_WINDOW
        self.updates_sent = 0

    def changed(self) -> None:
        """The calls held changed (or a link registered again): tell the brokers this loop turn."""
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._tell)

    def _tell(self) -> None:
        self._scheduled = False
        if self._offer(grow=False) and self._growth_due is None:
            self._growth_due = self._loop.call_later(REFILL_WINDOW, self._grow)

    def _grow(self) -> None:
        self._growth_due = None
        self._offer(grow=True)

    def _offer(self, grow: bool) -> bool:
        """Send each link its offer where it fell (and where it rose, if ``grow``); True when a
        rise was left for later."""
        held = self._held()
        later = False
        for link in self._links:
            # What the others hold: ours may be fewer than the slots they take (orphans).
            offer = max(0, self.capacity - (held - len(link.in_flight)))
            told = self.capacity if link.offered is None else link.offered  # None: READY's
            if offer > told and not grow:
                later = True
            # Recorded only once sent: one dropped (a full queue) is offered again next time.
            elif offer != told and link.send(p.capacity_message(offer)):
                link.offered = offer
                self.updates_sent += 1
        return later
