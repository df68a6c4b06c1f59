"""The broker's records: calls, workers and services. Plain data; the engine owns the rules."""
from __future__ import annotations

import collections
import dataclasses
import enum

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
    header: wire_pb2.RequestHeader
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


class CallQueue:
    """A service's waiting calls, oldest first.

    A call answered while it waits (cancelled, expired) leaves in O(1): it is only counted out
    (``discard``), and its entry goes when it reaches the front, or when such entries are half
    the deque. deque.remove() was O(n): one client cancelling 5,000 calls queued behind 5,000
    others held the broker's thread for a second (review). Length and iteration count only the
    calls still waiting (state QUEUED).
    """

    __slots__ = ("_calls", "_gone")

    def __init__(self, calls=()) -> None:
        self._calls: collections.deque[Call] = collections.deque(calls)
        self._gone = 0  # entries of calls no longer waiting

    def __len__(self) -> int:
        return len(self._calls) - self._gone

    def __bool__(self) -> bool:
        return len(self._calls) > self._gone

    def __iter__(self):
        return (call for call in self._calls if call.state is _QUEUED)

    def append(self, call: Call) -> None:
        self._calls.append(call)

    def appendleft(self, call: Call) -> None:
        self._calls.appendleft(call)

    def extendleft(self, calls) -> None:
        self._calls.extendleft(calls)

    def head(self) -> Call | None:
        """The oldest waiting call, left in place (None when none waits)."""
        calls = self._calls
        while calls and calls[0].state is not _QUEUED:
            calls.popleft()
            self._gone -= 1
        return calls[0] if calls else None

    def popleft(self) -> Call:
        """Take the oldest waiting call (IndexError when none waits)."""
        calls = self._calls
        call = calls.popleft()
        while call.state is not _QUEUED:
            self._gone -= 1
            call = calls.popleft()
        return call

    def discard(self, call: Call) -> None:
        """``call``, waiting here, was answered (its state is no longer QUEUED): count it out."""
        self._gone += 1
        calls = self._calls
        if self._gone > 64 and 2 * self._gone > len(calls):
            self._calls = collections.deque(c for c in calls if c.state is _QUEUED)
            self._gone = 0

    def behind_head(self, depth: int):
        """(position, call) of the waiting calls among the ``depth`` entries after the head."""
        calls = self._calls
        for index in range(1, min(len(calls), depth)):
            call = calls[index]
            if call.state is _QUEUED:
                yield index, call

    def take(self, index: int) -> Call:
        """Take the call at ``index`` (a position ``behind_head`` gave, before any other change)."""
        call = self._calls[index]
        del self._calls[index]
        return call

    def remove_if(self, condition) -> list[Call]:
        """Take every waiting call for which ``condition(call)`` holds, in order (one pass)."""
        taken, kept = [], collections.deque()
        for call in self._calls:
            if call.state is not _QUEUED:
                continue
            (taken if condition(call) else kept).append(call)
        self._calls, self._gone = kept, 0
        return taken


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
