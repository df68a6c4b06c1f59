"""The deadlines of the calls a broker holds, earliest first (spec §12), cheaply.

Most calls arrive with a deadline no earlier than the last one added (clients use the same few
timeouts), so those go to a FIFO: O(1) in and out. The others go to a heap. An answered call's
entry is not looked for: it is dropped when it reaches the front, or by ``compact`` (the owner
calls it when entries outnumber the calls held, so one call held long cannot keep every later
one alive behind it).
"""
from __future__ import annotations

import collections
import heapq
import itertools

from ._state import Call, CallState

_DONE = CallState.DONE
_NEVER = float("inf")


class Deadlines:
    __slots__ = ("_fifo", "_heap", "_seq")

    def __init__(self) -> None:
        self._fifo: collections.deque[tuple[float, Call]] = collections.deque()
        self._heap: list[tuple[float, int, Call]] = []
        self._seq = itertools.count()  # the heap's tie-break: calls do not compare

    def __len__(self) -> int:
        """Entries, answered calls' included until they are dropped."""
        return len(self._fifo) + len(self._heap)

    def add(self, call: Call) -> None:
        fifo = self._fifo
        if not fifo or call.deadline >= fifo[-1][0]:
            fifo.append((call.deadline, call))
        else:
            heapq.heappush(self._heap, (call.deadline, next(self._seq), call))

    def earliest(self) -> float:
        """The earliest deadline of a call not answered yet (inf when none)."""
        fifo, heap = self._fifo, self._heap
        while fifo and fifo[0][1].state is _DONE:
            fifo.popleft()
        while heap and heap[0][2].state is _DONE:
            heapq.heappop(heap)
        first = fifo[0][0] if fifo else _NEVER
        return heap[0][0] if heap and heap[0][0] < first else first

    def pop_due(self, now: float) -> Call | None:
        """Remove and return a call not answered yet whose deadline is at or before ``now``,
        earliest first; None when there is none."""
        if self.earliest() > now:
            return None
        fifo, heap = self._fifo, self._heap
        if heap and (not fifo or heap[0][0] < fifo[0][0]):
            return heapq.heappop(heap)[2]
        return fifo.popleft()[1]

    def compact(self) -> None:
        """Drop every answered call's entry (O(entries))."""
        self._fifo = collections.deque(entry for entry in self._fifo if entry[1].state is not _DONE)
        self._heap = [entry for entry in self._heap if entry[2].state is not _DONE]
        heapq.heapify(self._heap)
