"""Telling a broker that answers nothing from one that is slow.

A broker whose loop is stuck (a deadlock, a long pause, a host starved of CPU) keeps its
connections: libzmq's I/O thread accepts them and answers ZMTP heartbeats on its own, so the
client sees nothing wrong. A client of several brokers would go on sending that one its share
of the calls, each to wait out its deadline. So the client watches each link: once it has sent a
call over it and heard nothing back for PROBE_AFTER seconds, it sends that broker a Health call,
which a broker answers from its own loop whatever its workers are doing (a slow handler makes no
silence). If nothing comes in PROBE_TIMEOUT more seconds, the link is *silent*: new calls go to
the other brokers while one of them can take them (with one broker there is nowhere else to go),
and a Health call goes every REPROBE seconds, until anything comes from the link or its
connection closes. The core then moves the idempotent calls sent over it to another link, as
retries; the others stay: they may have run, and the broker may yet answer them.

This is gRPC's outlier ejection reduced to what one client can see: no error rates, only
whether a broker answers at all.
"""
from __future__ import annotations

import math

PROBE_AFTER = 1.0  # seconds a link may stay silent after a send before it is probed
PROBE_TIMEOUT = 1.0  # seconds a probe has to be answered before the link counts as silent
REPROBE = 2.0  # seconds between probes of a silent link


class SilenceWatch:
    """Per link: since when it has owed an answer, when it was probed, and whether it is silent.

    The core calls :meth:`sent` for each REQUEST, :meth:`heard` for each message and
    :meth:`reset` when a connection opens or closes, and :meth:`advance` once ``due`` has come.
    """

    def __init__(self, links: int):
        self._owed_since: list[float | None] = [None] * links  # the first send since last heard
        self._probed_at: list[float | None] = [None] * links
        self.silent = [False] * links
        self.silent_links = 0
        self._owing = 0  # links that owe an answer
        self.due = math.inf  # when advance() next has something to do; inf while none owes

    def sent(self, link: int, now: float) -> None:
        if self._owed_since[link] is None:
            self._owed_since[link] = now
            self._owing += 1
            if now + PROBE_AFTER < self.due:
                self.due = now + PROBE_AFTER

    def heard(self, link: int) -> bool:
        """A message came from ``link``; True when that ends its silence."""
        if self._owed_since[link] is not None:
            self._owing -= 1
            if not self._owing:
                self.due = math.inf
        self._owed_since[link] = self._probed_at[link] = None
        if self.silent[link]:
            self.silent[link] = False
            self.silent_links -= 1
            return True
        return False

    def reset(self, link: int) -> None:
        """``link``'s connection opened or closed: a new connection owes nothing yet."""
        self.heard(link)

    def silent_for(self, link: int, now: float) -> float | None:
        """How long ``link`` has owed an answer, when it is silent; None when it is not."""
        since = self._owed_since[link]
        return now - since if self.silent[link] and since is not None else None

    def advance(self, now: float) -> tuple[list[int], list[int]]:
        """(links to probe now, links that just fell silent)."""
        if now < self.due:
            return [], []
        probes, silenced = [], []
        due = math.inf
        for link, since in enumerate(self._owed_since):
            if since is None:
                continue
            probed = self._probed_at[link]
            if probed is None:
                at = since + PROBE_AFTER
            elif self.silent[link]:
                at = probed + REPROBE
            else:
                at = probed + PROBE_TIMEOUT
                if now >= at:
                    self.silent[link] = True
                    self.silent_links += 1
                    silenced.append(link)
                    at = probed + REPROBE
            if now >= at:
                self._probed_at[link] = now
                probes.append(link)
                at = now + (REPROBE if self.silent[link] else PROBE_TIMEOUT)
            due = min(due, at)
        self.due = due
        return probes, silenced
