"""The broker's records: calls, workers and services. Plain data; the engine owns the rules."""
from __future__ import annotations

import collections
import dataclasses
import enum
import itertools

from .. import wire_pb2


class CallState(enum.Enum):
    QUEUED = "queued"
    DISPATCHED = "dispatched"
    DONE = "done"  # answered, cancelled or failed: nothing more is sent to the client


_QUEUED = CallState.QUEUED


@dataclasses.dataclass(slots=True, eq=False)
class Call:
    """One client request, from arrival until its single answer."""

    client: bytes
    client_request_id: int
    header: wire_pb2.RequestHeader | None  # None once answered, as payload is then b""
    # The header's names, read once: a protobuf attribute read costs more than a slot's.
    service: str
    method: str
    payload: bytes
    timeout_ms: int  # the client's deadline_ms (spec §5)
    deadline: float
    enqueued_at: float
    dispatched_at: float = 0.0  # when it last went to a worker: queue wait vs service time
    state: CallState = CallState.QUEUED
    dispatch_id: int = 0
    worker: "WorkerState | None" = None
    attempt: int = 0
    reads_batches: bool = False  # its client reads REPLY_BATCH (spec §4c)
    # Whose turn it waits for in its queue (§12): its client's CURVE key (z85) when the broker
    # has keys, so that one key's many connections take one turn; else its connection.
    tenant: bytes | str = b""


class _ClientCalls:
    """One client's calls waiting in one queue, in arrival order (a call given back first)."""

    __slots__ = ("client", "calls", "gone")

    def __init__(self, client: bytes | str) -> None:
        self.client = client  # the calls' tenant
        self.calls: collections.deque[Call] = collections.deque()
        self.gone = 0  # entries of calls no longer waiting

    def waiting(self) -> int:
        return len(self.calls) - self.gone

    def front(self) -> Call | None:
        calls = self.calls
        while calls and calls[0].state is not _QUEUED:
            calls.popleft()
            self.gone -= 1
        return calls[0] if calls else None

    def pop_newest(self) -> Call:
        calls = self.calls
        call = calls.pop()
        while call.state is not _QUEUED:
            self.gone -= 1
            call = calls.pop()
        return call


class CallQueue:
    """A service's waiting calls: its clients take turns, one call each, and each client's
    calls go in arrival order (a call given back by its worker, §11, before its client's others).

    A plain FIFO let one client that queued 10,000 calls hold every other client's next call
    behind all of them; with turns, a client's call waits for at most one call of each client
    ahead of it. A client is its CURVE key when the broker has keys, else its connection
    (Call.tenant).

    A call answered while it waits (cancelled, expired) leaves in O(1): it is only counted out
    (``discard``), and its entry goes when it reaches its client's front, when none of its
    client's calls waits any more, or when such entries are half the queue's (deque.remove()
    was O(n): one client cancelling 5,000 calls held the broker's thread for a second). Counted
    per client only, entries of 64 cancelled calls per connection held their payloads: an
    adversarial tester's 100 connections kept 6.4 GB. Length and iteration count only the
    calls still waiting.

    Once the queue has been full, its clients are also kept by how many calls each has waiting
    (``_holders``), so that a full queue finds the biggest holder (push_out) in O(1): a scan of
    every client per call let many connections holding a call or two each make each arriving
    call cost O(clients) (review). Kept only until the queue is down to half what it held then:
    it costs each call in and out about 0.4 us, and a queue that never fills needs none of it.
    """

    __slots__ = ("_by_client", "_turns", "_size", "_gone", "_emptied", "_holders", "_most", "_kept_from")

    def __init__(self) -> None:
        self._by_client: dict[bytes | str, _ClientCalls] = {}  # by tenant
        self._turns: collections.deque[_ClientCalls] = collections.deque()  # whose turn first
        self._size = 0
        self._gone = 0  # entries of calls no longer waiting, in every client's line
        self._emptied = 0  # lines emptied away from the front since the empty ones were dropped
        # calls waiting -> the clients with that many (a dict as an ordered set: ties go to the
        # client that reached the count first, the same on every run), the largest such count,
        # and the queue's length when they were counted; None while not kept.
        self._holders: dict[int, dict[_ClientCalls, None]] | None = None
        self._most = 0
        self._kept_from = 0

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def __iter__(self):
        return (call for waiting in self._turns for call in waiting.calls if call.state is _QUEUED)

    # -- how many each client holds, while kept: every change of a client's count goes through these

    def _count_holders(self) -> None:
        holders: dict[int, dict[_ClientCalls, None]] = {}
        for waiting in self._turns:
            if (count := waiting.waiting()):
                holders.setdefault(count, {})[waiting] = None
        self._holders, self._most, self._kept_from = holders, max(holders, default=0), self._size

    def _grew(self, waiting: _ClientCalls) -> None:
        """``waiting`` has one call more than before."""
        count = waiting.waiting()
        holders = self._holders
        if count > 1:
            del holders[count - 1][waiting]
        level = holders.get(count)
        if level is None:
            level = holders[count] = {}
        level[waiting] = None
        if count > self._most:
            self._most = count

    def _shrank(self, waiting: _ClientCalls, before: int) -> None:
        """``waiting`` had ``before`` calls (one or more); it has fewer now."""
        holders = self._holders
        del holders[before][waiting]
        count = waiting.waiting()
        if count:
            level = holders.get(count)
            if level is None:
                level = holders[count] = {}
            level[waiting] = None
        if before == self._most and not holders[before]:
            self._most = before - 1  # one call went: ``waiting`` holds that many now
        if 2 * self._size < self._kept_from:
            self._holders = None

    def _new_client(self, client: bytes | str, first: bool) -> _ClientCalls:
        waiting = self._by_client[client] = _ClientCalls(client)
        if first:
            self._turns.appendleft(waiting)
        else:
            self._turns.append(waiting)
        return waiting

    def _forget(self, waiting: _ClientCalls) -> None:
        """``waiting`` has no entry left (so no call waiting) and has left the turns."""
        del self._by_client[waiting.client]

    # -- in and out

    def append(self, call: Call) -> None:
        waiting = self._by_client.get(call.tenant) or self._new_client(call.tenant, first=False)
        waiting.calls.append(call)
        self._size += 1
        if self._holders is not None:
            self._grew(waiting)

    def appendleft(self, call: Call) -> None:
        """A call given back (its worker never ran it): first among its client's calls, and
        its client's turn next if it had none waiting."""
        waiting = self._by_client.get(call.tenant) or self._new_client(call.tenant, first=True)
        waiting.calls.appendleft(call)
        self._size += 1
        if self._holders is not None:
            self._grew(waiting)

    def extendleft(self, calls) -> None:
        for call in calls:
            self.appendleft(call)

    def head(self) -> Call | None:
        """The call whose turn it is, left in place (None when none waits)."""
        # _ClientCalls.front() inlined here and in popleft: they run for every queued call.
        turns = self._turns
        while turns:
            waiting = turns[0]
            calls = waiting.calls
            while calls:
                call = calls[0]
                if call.state is _QUEUED:
                    return call
                calls.popleft()
                waiting.gone -= 1
                self._gone -= 1
            self._forget(turns.popleft())
        return None

    def popleft(self) -> Call:
        """Take the call whose turn it is (IndexError when none waits); its client's turn ends."""
        turns = self._turns
        while turns:
            waiting = turns[0]
            calls = waiting.calls
            while calls:
                call = calls.popleft()
                if call.state is _QUEUED:
                    self._size -= 1
                    if self._holders is not None:
                        self._shrank(waiting, len(calls) + 1 - waiting.gone)
                    if not calls:
                        self._forget(turns.popleft())
                    elif len(turns) > 1:
                        turns.rotate(-1)
                    return call
                waiting.gone -= 1
                self._gone -= 1
            self._forget(turns.popleft())
        raise IndexError("pop from an empty CallQueue")

    def discard(self, call: Call) -> None:
        """``call``, waiting here, was answered (its state is no longer QUEUED): count it out."""
        self._size -= 1
        waiting = self._by_client[call.tenant]
        waiting.gone += 1
        if self._holders is not None:
            self._shrank(waiting, waiting.waiting() + 1)
        calls = waiting.calls
        if waiting.gone == len(calls):  # none of its client's calls waits: let them all go now
            self._gone -= waiting.gone - 1
            calls.clear()
            waiting.gone = 0
            self._line_emptied()
        else:
            self._gone += 1
            if self._gone > 64 and self._gone > self._size:
                self._compact()

    def _compact(self) -> None:
        """Drop the entries of every call no longer waiting (O(entries), at most as often as
        one in two entries is such: O(1) for each)."""
        for waiting in self._turns:
            if waiting.gone:
                waiting.calls = collections.deque(c for c in waiting.calls if c.state is _QUEUED)
                waiting.gone = 0
        self._gone = 0
        self._drop_empty()

    def _line_emptied(self) -> None:
        """A client's line emptied away from the front of the turns: its record goes when its
        turn comes, or with the other empty ones once they may be half the turns."""
        self._emptied += 1
        if self._emptied > 64 and 2 * self._emptied > len(self._turns):
            self._drop_empty()

    def behind_head(self, depth: int):
        """(position, call) of the waiting calls among the ``depth`` entries that follow the
        head in turn order: each client's first call, then each one's second, and so on."""
        if self.head() is None:
            return
        clients = list(itertools.islice(self._turns, depth + 1))  # the head's client too
        seen = 0
        for index in range(depth):
            any_left = False
            for waiting in clients:
                calls = waiting.calls
                if index >= len(calls):
                    continue
                any_left = True
                if index == 0 and waiting is clients[0]:
                    continue  # the head
                call = calls[index]
                if call.state is _QUEUED:
                    yield (waiting, index), call
                seen += 1
                if seen >= depth:
                    return
            if not any_left:
                return

    def take(self, position) -> Call:
        """Take the call at ``position`` (one ``behind_head`` gave, before any other change)."""
        waiting, index = position
        before = waiting.waiting()
        call = waiting.calls[index]
        del waiting.calls[index]
        self._size -= 1
        if self._holders is not None:
            self._shrank(waiting, before)
        if not waiting.calls:
            self._line_emptied()
        return call

    def push_out(self, client: bytes | str) -> Call | None:
        """The queue is full and ``client`` (a tenant) sends a call: take the newest call of
        the client with the most waiting, if that one has at least two more than ``client``
        (so that turns would serve ``client`` sooner); None when no client holds that many more."""
        if self._holders is None:
            self._count_holders()
        mine = self._by_client.get(client)
        if self._most < (mine.waiting() if mine is not None else 0) + 2:
            return None
        biggest = next(iter(self._holders[self._most]))
        gone = biggest.gone
        call = biggest.pop_newest()
        self._gone -= gone - biggest.gone
        self._size -= 1
        self._shrank(biggest, self._most)
        return call

    def take_enqueued_by(self, cutoff: float) -> list[Call]:
        """Take the calls at the front of each client's line that came in at or before
        ``cutoff``, oldest first. A line is in arrival order but for calls given back, which
        came in before the calls behind them as a rule."""
        taken = []
        for waiting in self._turns:
            gone = waiting.gone
            while (call := waiting.front()) is not None and call.enqueued_at <= cutoff:
                taken.append(waiting.calls.popleft())
            self._gone -= gone - waiting.gone
        if taken:
            self._size -= len(taken)
            self._holders = None  # counted again if it fills
            self._drop_empty()
            taken.sort(key=_enqueued_at)
        return taken

    def remove_if(self, condition) -> list[Call]:
        """Take every waiting call for which ``condition(call)`` holds (one pass)."""
        taken = []
        for waiting in self._turns:
            kept = collections.deque()
            for call in waiting.calls:
                if call.state is _QUEUED:
                    (taken if condition(call) else kept).append(call)
            waiting.calls, waiting.gone = kept, 0
        self._size -= len(taken)
        self._gone = 0
        self._holders = None  # counted again if it fills
        self._drop_empty()
        return taken

    def _drop_empty(self) -> None:
        for waiting in [w for w in self._turns if not w.calls]:
            self._forget(waiting)
        self._turns = collections.deque(w for w in self._turns if w.calls)
        self._emptied = 0


def _enqueued_at(call: Call) -> float:
    return call.enqueued_at


@dataclasses.dataclass(slots=True, eq=False)
class DescriptorSet:
    """A FileDescriptorSet that live workers sent in READY, held once however many sent it."""

    raw: bytes
    # service -> (the file defining it, serialized: its definition's key; its method names)
    services: dict[str, tuple[bytes, frozenset[str]]]
    users: int = 0  # live workers that sent it


NO_DESCRIPTORS = DescriptorSet(b"", {})
NO_DEFINITION = (b"", frozenset())  # a service a worker sent no descriptors for: any method goes


@dataclasses.dataclass(slots=True, eq=False)
class WorkerState:
    """A registered worker connection (one ROUTER routing id)."""

    identity: bytes
    name: str
    services: tuple[str, ...]
    capacity: int  # calls it may hold from us now: its READY's, or less while other brokers hold some (§7b)
    heartbeat: float  # seconds, as the worker announced
    expires_at: float
    next_heartbeat_at: float
    joined_at: float
    last_seen: float
    # dispatch id -> the call it carries, or None once the call was answered without this
    # worker (deadline, cancel): the slot stays taken until the worker replies (spec §8).
    in_flight: dict[int, "Call | None"] = dataclasses.field(default_factory=dict)
    held_by_answered: int = 0  # the None entries of in_flight, counted (ListServices reads it)
    last_dispatch_seq: int = 0
    draining: bool = False
    batches: bool = False  # it reads REQUEST_BATCH (its READY says so, spec §4b)
    peer_key: str | None = None  # its CURVE public key (z85) when the broker runs CURVE
    announced_capacity: int = 0  # its READY's capacity: what a heartbeat may offer at most (§7b)
    # Bumped whenever its free capacity or last_dispatch_seq changes, or it stops taking calls:
    # entries of a service's free_index with an older version are stale.
    version: int = 0
    descriptors: DescriptorSet = NO_DESCRIPTORS  # its READY's, shared with the workers that sent the same

    @property
    def free(self) -> int:
        return 0 if self.draining else self.capacity - len(self.in_flight)


@dataclasses.dataclass(slots=True, eq=False)
class Definition:
    """One definition of a service (§7): its methods, the FileDescriptorSet of the last worker
    that offered it, and how many live workers offer it."""

    methods: frozenset[str]
    descriptor_set: bytes
    users: int = 0


@dataclasses.dataclass(slots=True, eq=False)
class ServiceState:
    """A service name: the workers offering it now, and the calls waiting for one."""

    name: str
    offered: bool = False  # some worker offered it since the broker started
    # Its definition follows its live workers (§7): the newest one's descriptors, and the
    # methods any of them has. Kept while none is live (calls wait for one, clients describe it).
    methods: frozenset[str] = frozenset()
    file_descriptor_set: bytes = b""
    # The definitions its live workers offer, by the file that defines it: more than one while a
    # rollout is under way, and dispatch then looks at methods.
    definitions: dict[bytes, "Definition"] = dataclasses.field(default_factory=dict)
    workers: dict[bytes, WorkerState] = dataclasses.field(default_factory=dict)
    queue: CallQueue = dataclasses.field(default_factory=CallQueue)
    # When the service last lost its last live worker (None while it has one).
    no_worker_since: float | None = None
    dispatched: int = 0  # calls of this service held by workers now
    # With many workers, a heap of (-free, last_dispatch_seq, push number, version, worker):
    # its first valid entry is the worker §12 picks, found in O(log n) instead of a scan of
    # every worker (see BrokerEngine._indexed_best). None with few workers: the scan is cheaper.
    free_index: list | None = None

    def live_workers(self) -> int:
        """Workers that take new calls (not draining)."""
        return sum(1 for w in self.workers.values() if not w.draining)

    def has_live_worker(self) -> bool:
        """live_workers() > 0, stopping at the first (every tick asks, for every service)."""
        return any(not w.draining for w in self.workers.values())

    def note_if_unserved(self, now: float) -> None:
        """A worker left or began draining: with no live worker left, unavailable_wait counts
        from now (§10), unless it already counts."""
        if self.no_worker_since is None and not self.has_live_worker():
            self.no_worker_since = now
