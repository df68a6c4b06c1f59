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
    are its ``in_flight``. ``changed()`` is cheap: falls are told once per loop turn, rises
    REFILL_WINDOW later, as far as they held through the whole window.
    """

    def __init__(self, capacity: int, held: Callable[[], int], links: Sequence, loop: asyncio.AbstractEventLoop):
        self.capacity = capacity
        self._held = held
        self._links = links
        self._loop = loop
        self._scheduled = False
        self._growth_due = None  # the timer of the rises waiting out REFILL_WINDOW
        # Per link, the lowest offer since the window opened: a rise is told only as far as it
        # held for the whole window (a slot freed and refilled meanwhile is not the other's).
        self._floors: list[int] = []
        self.updates_sent = 0

    def changed(self) -> None:
        """The calls held changed (or a link registered again): tell the brokers this loop turn."""
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._tell)

    def close(self) -> None:
        """The worker stops: no rise is told after it."""
        if self._growth_due is not None:
            self._growth_due.cancel()
            self._growth_due = None

    def _tell(self) -> None:
        self._scheduled = False
        offers = self._offers()
        rising = False
        for link, offer in zip(self._links, offers):
            told = _told(self.capacity, link)
            if offer < told:
                self._send(link, offer)
            elif offer > told:
                rising = True
        if self._growth_due is not None:  # a window is open: a rise must hold through all of it
            self._floors = [min(floor, offer) for floor, offer in zip(self._floors, offers)]
        elif rising:
            self._open_window(offers)

    def _grow(self) -> None:
        self._growth_due = None
        offers = self._offers()
        rising = False
        for link, offer, floor in zip(self._links, offers, self._floors):
            told = _told(self.capacity, link)
            if offer < told:  # (a fall whose send was dropped)
                self._send(link, offer)
            elif min(offer, floor) > told:  # a rise, as far as it held for the whole window
                self._send(link, min(offer, floor))
            if offer > _told(self.capacity, link):
                rising = True
        if rising:  # rises that have not held a whole window yet: another one
            self._open_window(offers)

    def _open_window(self, offers: list[int]) -> None:
        self._floors = list(offers)
        self._growth_due = self._loop.call_later(REFILL_WINDOW, self._grow)

    def _offers(self) -> list[int]:
        """What each link may hold now: the capacity less what the others hold (what a link
        itself holds may be fewer than the slots its calls take: orphans)."""
        held = self._held()
        return [max(0, self.capacity - (held - len(link.in_flight))) for link in self._links]

    def _send(self, link, offer: int) -> None:
        # Recorded only once sent: one dropped (a full queue) is offered again next time.
        if link.send(p.capacity_message(offer)):
            link.offered = offer
            self.updates_sent += 1


def _told(capacity: int, link) -> int:
    """What ``link``'s broker was last told it may hold (None: our READY's capacity)."""
    return capacity if link.offered is None else link.offered
