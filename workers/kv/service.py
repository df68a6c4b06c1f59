"""kv.KeyValue: a thread-safe in-memory store with versions and compare-and-set.

Every write takes the next revision of the whole store, and an entry's version is the revision of
its last write: versions never repeat, so a compare-and-set cannot be fooled by a key deleted and
created again. Limits come from the constructor, or from the environment when the CLI builds the
service with no arguments (``ZRPC_KV_MAX_VALUE_BYTES``, ``ZRPC_KV_MAX_KEY_BYTES``, ``ZRPC_KV_MAX_KEYS``).
"""
from __future__ import annotations

import bisect
import os
import threading

import zrpc

from . import kv_pb2

DEFAULT_LIST_LIMIT = 100
MAX_LIST_LIMIT = 1000


def _setting(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return value


class KeyValue(zrpc.Service):
    """Keys are non-empty strings; values are bytes."""

    descriptor = kv_pb2.DESCRIPTOR.services_by_name["KeyValue"]

    def __init__(self, max_value_bytes: int | None = None, max_key_bytes: int | None = None,
                 max_keys: int | None = None):
        self.max_value_bytes = max_value_bytes or _setting("ZRPC_KV_MAX_VALUE_BYTES", 1 << 20)
        self.max_key_bytes = max_key_bytes or _setting("ZRPC_KV_MAX_KEY_BYTES", 1024)
        self.max_keys = max_keys or _setting("ZRPC_KV_MAX_KEYS", 1_000_000)
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[bytes, int]] = {}  # key -> (value, version)
        self._sorted_keys: list[str] = []  # for List: prefix scans in key order
        self._revision = 0

    # ------------------------------------------------------------------ rpcs

    def Get(self, request: kv_pb2.GetRequest, context) -> kv_pb2.GetReply:
        self._check_key(request.key)
        with self._lock:
            found = self._entries.get(request.key)
        if found is None:
            raise zrpc.Error(zrpc.StatusCode.NOT_FOUND, f"no key {request.key!r}")
        return kv_pb2.GetReply(entry=kv_pb2.Entry(key=request.key, value=found[0], version=found[1]))

    def Put(self, request: kv_pb2.PutRequest, context) -> kv_pb2.PutReply:
        self._check_key(request.key)
        self._check_value(request.value)
        with self._lock:
            found = self._entries.get(request.key)
            if found is not None and found[0] == request.value:
                return kv_pb2.PutReply(version=found[1])  # a retried Put changes nothing
            return kv_pb2.PutReply(version=self._write(request.key, request.value, found is None))

    def Delete(self, request: kv_pb2.DeleteRequest, context) -> kv_pb2.DeleteReply:
        self._check_key(request.key)
        with self._lock:
            found = self._entries.pop(request.key, None)
            if found is None:
                return kv_pb2.DeleteReply(deleted=False)
            del self._sorted_keys[bisect.bisect_left(self._sorted_keys, request.key)]
        return kv_pb2.DeleteReply(deleted=True, version=found[1])

    def List(self, request: kv_pb2.ListRequest, context) -> kv_pb2.ListReply:
        limit = min(request.limit or DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT)
        prefix = request.prefix
        reply = kv_pb2.ListReply()
        with self._lock:
            keys = self._sorted_keys
            if request.start_after and request.start_after >= prefix:
                index = bisect.bisect_right(keys, request.start_after)
            else:
                index = bisect.bisect_left(keys, prefix)
            while index < len(keys) and keys[index].startswith(prefix):
                if len(reply.entries) == limit:
                    reply.next_start_after = reply.entries[-1].key
                    break
                key = keys[index]
                value, version = self._entries[key]
                reply.entries.add(key=key, value=value, version=version)
                index += 1
        return reply

    def CompareAndSet(self, request: kv_pb2.CompareAndSetRequest, context) -> kv_pb2.PutReply:
        self._check_key(request.key)
        self._check_value(request.value)
        with self._lock:
            found = self._entries.get(request.key)
            current = 0 if found is None else found[1]
            if current != request.expected_version:
                wanted = "to be absent" if request.expected_version == 0 else f"at version {request.expected_version}"
                has = "is absent" if found is None else f"is at version {current}"
                raise zrpc.Error(zrpc.StatusCode.FAILED_PRECONDITION,
                                 f"key {request.key!r} {has}; expected it {wanted}",
                                 {"current_version": str(current)})
            return kv_pb2.PutReply(version=self._write(request.key, request.value, found is None))

    # ------------------------------------------------------------------ helpers

    def _write(self, key: str, value: bytes, new: bool) -> int:
        """Store under the lock; returns the new version."""
        if new:
            if len(self._entries) >= self.max_keys:
                raise zrpc.Error(zrpc.StatusCode.RESOURCE_EXHAUSTED,
                                 f"the store holds {len(self._entries)} keys (limit {self.max_keys})")
            bisect.insort(self._sorted_keys, key)
        self._revision += 1
        self._entries[key] = (value, self._revision)
        return self._revision

    def _check_key(self, key: str) -> None:
        if not key:
            raise zrpc.Error(zrpc.StatusCode.INVALID_ARGUMENT, "key must not be empty")
        size = len(key.encode())
        if size > self.max_key_bytes:
            raise zrpc.Error(zrpc.StatusCode.INVALID_ARGUMENT,
                             f"key is {size} bytes; the limit is {self.max_key_bytes}")

    def _check_value(self, value: bytes) -> None:
        if len(value) > self.max_value_bytes:
            raise zrpc.Error(zrpc.StatusCode.INVALID_ARGUMENT,
                             f"value is {len(value)} bytes; the limit is {self.max_value_bytes}")
