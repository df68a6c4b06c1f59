"""The zrpc wire protocol: frame layout, commands and header codecs. No I/O here.

Every rule cited as (spec §N) is written out in PROTOCOL.md beside this file.
Frames are ``bytes`` (or any bytes-like object); payload frames are never decoded here.
"""
from __future__ import annotations

from typing import Iterable, Sequence

from . import wire_pb2
from ._status import StatusCode

# (spec §1) The first frame of every message: protocol name and version.
TAG = b"ZRPC1"

# (spec §11) The reply detail of a call refused as its worker or broker drains: it never ran,
# so it may be sent again (the broker re-queues it; a client may send it to another broker).
RETRY_DETAIL = "zrpc-retry"
DRAINING = {RETRY_DETAIL: "draining"}
# (spec §5) The metadata a client's retry carries: its attempt's number, from 2.
ATTEMPT_METADATA = "zrpc-attempt"
# (spec §10) The reply detail of a call a broker refused before any worker had it (no live
# worker, a full queue, a limit): it never ran either, so a client may send it again,
# idempotent or not, if its retry policy retries that code.
NOT_RUN = {RETRY_DETAIL: "not-run"}
# A call's deadline passed while it waited for a worker of a service that has none alive.
UNSERVED_DETAIL = "zrpc-no-live-worker"
# The reason of the DISCONNECT a broker sends each worker as it stops (spec §11).
BROKER_STOPPING = "broker stopping"
# The reason of the DISCONNECT that answers a message from a worker the broker does not know (§11).
UNKNOWN_WORKER = "unknown worker: send READY"

# (spec §2) The second frame: one command byte.
READY = b"\x01"
REQUEST = b"\x02"
REPLY = b"\x03"
HEARTBEAT = b"\x04"
DISCONNECT = b"\x05"
CANCEL = b"\x06"
# (spec §4b) Many calls in one frame, between a broker and a worker that announced it.
REQUEST_BATCH = b"\x07"
REPLY_BATCH = b"\x08"

COMMAND_NAMES = {
    READY: "READY",
    REQUEST: "REQUEST",
    REPLY: "REPLY",
    HEARTBEAT: "HEARTBEAT",
    DISCONNECT: "DISCONNECT",
    CANCEL: "CANCEL",
    REQUEST_BATCH: "REQUEST_BATCH",
    REPLY_BATCH: "REPLY_BATCH",
}

# (spec §3) Which commands each side may send.
CLIENT_COMMANDS = frozenset({REQUEST, REQUEST_BATCH, CANCEL})
WORKER_COMMANDS = frozenset({READY, REPLY, REPLY_BATCH, HEARTBEAT, DISCONNECT})

# Frames at least this long are moved without a copy by our peers: received as a view of the
# zmq message and sent from it. Smaller ones are copied into bytes, which is cheaper for them
# (pyzmq copies small frames anyway).
ZERO_COPY_BYTES = 65_536
# (spec §4b) A call travels in a batch only when its header and payload together are shorter
# than this: a large payload keeps a frame of its own, moved without a copy (packing it would
# copy it twice), and every call fits a batch frame (MAX_BATCH_BYTES).
BATCH_CALL_BYTES = ZERO_COPY_BYTES
# (spec §4b) A batch frame holds at most this many bytes, and larger ones are refused before they
# are decoded: a frame of tiny entries costs about 10 ns a byte to decode (9.9 ms for 1 MiB), so
# this bounds what one message can cost its receiver (near 2.5 ms), as max_frames does for pairs.
MAX_BATCH_BYTES = 256 * 1024
BATCH_ENTRY_OVERHEAD = 8  # two tags and two lengths of up to 3 bytes each
# (spec §9) The most calls our peers put in one message (a client's requests, a worker's replies
# of one loop turn), and so the lowest frame limit a broker may set: tag, command and 2 per call.
MAX_CALLS_PER_MESSAGE = 256
MIN_FRAMES_LIMIT = 2 + 2 * MAX_CALLS_PER_MESSAGE
# (spec §9) A header longer than this is refused without being decoded: real ones are tens of
# bytes with their metadata or error message, and decoding costs up to ~10 ns a byte.
MAX_HEADER_BYTES = 65_536
# (spec §9) The headers of one REQUEST together: a broker decodes each, and 64 KiB of map
# entries take it about 0.5 ms, so a REQUEST of 1,000 such headers held its loop 0.5 s (an
# adversarial tester's). zrpc's clients put at most 1 MiB of calls, headers included, in a
# REQUEST (a larger call goes alone); one header more leaves room for older ones, which did not
# count the last call's header.
MAX_REQUEST_HEADER_BYTES = (1 << 20) + MAX_HEADER_BYTES
# (spec §9) The default bound on one call or reply (header + payload), the broker's
# max_message_bytes; clients check their payloads against their own copy of it.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# The largest max_message_bytes a broker or worker accepts (1 TiB): ZeroMQ's own limit, set 1 MiB
# above it, is a signed 64-bit number, and no message of that size fits in memory anyway.
MAX_MESSAGE_BYTES_LIMIT = 1 << 40

RequestHeader = wire_pb2.RequestHeader
ReplyHeader = wire_pb2.ReplyHeader
Ready = wire_pb2.Ready
Cancel = wire_pb2.Cancel
Disconnect = wire_pb2.Disconnect
Heartbeat = wire_pb2.Heartbeat
RequestBatch = wire_pb2.RequestBatch  # the typed form, for peers and tests that read batches


class ProtocolError(Exception):
    """A message that breaks the spec. ``reason`` is a short, stable label (for metrics)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


def split(frames: Sequence[bytes], allowed: frozenset[bytes]) -> tuple[bytes, Sequence[bytes]]:
    """Check the tag and command (spec §1-3); return ``(command, body_frames)``."""
    if len(frames) < 2:
        raise ProtocolError("too_few_frames", f"message has {len(frames)} frame(s); at least 2 needed")
    if frames[0] != TAG:
        raise ProtocolError("bad_tag", f"first frame must be the protocol tag {TAG!r}")
    command = bytes(frames[1])
    if command not in allowed:
        name = COMMAND_NAMES.get(command)
        if name is None:
            raise ProtocolError("bad_command", f"unknown command byte {command!r}")
        raise ProtocolError("bad_command", f"command {name} is not allowed from this peer")
    return command, frames[2:]


def pairs(body: Sequence[bytes]) -> list[tuple[bytes, bytes]]:
    """Split a REQUEST/REPLY body into (header, payload) pairs (spec §4: one or more pairs)."""
    n = len(body)
    if n == 0 or n % 2:
        raise ProtocolError("bad_frame_count", f"expected (header, payload) pairs, got {n} frame(s)")
    return [(body[i], body[i + 1]) for i in range(0, n, 2)]


def batch_pairs(body: Sequence[bytes], max_calls: int | None = None) -> list[tuple[bytes, bytes]]:
    """The (encoded header, payload) pairs of a REQUEST_BATCH or REPLY_BATCH body (spec §4b).

    Headers stay encoded: the caller decodes each one as if it had arrived alone in a pair, so
    one bad header costs only its own call (and a header is decoded at the depth its sender
    checked it at: inside a RequestBatch it would sit one nesting level deeper).
    """
    if len(body) != 1:
        raise ProtocolError("bad_frame_count", f"a batch carries exactly 1 frame, got {len(body)}")
    frame = body[0]
    if len(frame) > MAX_BATCH_BYTES:  # refused before decoding: that is the cost it bounds
        raise ProtocolError("too_large", f"batch frame is {len(frame)} bytes (limit {MAX_BATCH_BYTES})")
    try:
        batch = wire_pb2.EncodedBatch.FromString(frame)
    except Exception as exc:  # protobuf raises DecodeError, or others on some inputs
        raise ProtocolError("bad_batch", f"undecodable batch: {exc}") from None
    headers, payloads = batch.headers, batch.payloads
    count = len(headers)
    if count == 0 or count != len(payloads):
        raise ProtocolError("bad_batch", f"batch has {count} header(s) and {len(payloads)} payload(s)")
    if max_calls is not None and count > max_calls:
        raise ProtocolError("too_many_calls", f"batch carries {count} calls (limit {max_calls})")
    return list(zip(headers, payloads))


def readable_batch_headers(body: Sequence[bytes]) -> list[bytes]:
    """The encoded headers of a batch refused as bad input (headers and payloads of different
    counts, too many calls), as far as they can be read, so that each call can be answered
    (§9); none when its frame cannot be read, or is over MAX_BATCH_BYTES. Never raises."""
    if len(body) != 1 or len(body[0]) > MAX_BATCH_BYTES:
        return []
    try:
        return list(wire_pb2.EncodedBatch.FromString(body[0]).headers)
    except Exception:  # protobuf raises DecodeError, or others on some inputs
        return []


def batch_messages(command: bytes, headers: list[bytes], payloads: list[bytes], max_calls: int) -> list[list[bytes]]:
    """REQUEST_BATCH or REPLY_BATCH messages (``command``) carrying encoded headers and their
    payloads (spec §4b): as few as fit ``max_calls`` calls and MAX_BATCH_BYTES bytes each
    (none for no calls). Each call must be under BATCH_CALL_BYTES."""
    if max_calls < 1:
        raise ValueError(f"max_calls must be at least 1, got {max_calls}")
    if not headers:
        return []
    count = len(headers)
    if count <= max_calls and (sum(map(len, headers)) + sum(map(len, payloads)) + BATCH_ENTRY_OVERHEAD * count
                               <= MAX_BATCH_BYTES):  # the usual case, summed in C: one message
        return [batch_message(command, headers, payloads)]
    messages = []
    start, size = 0, 0
    for i in range(len(headers)):
        # An entry costs its bytes plus a tag and a length each for header and payload.
        entry = len(headers[i]) + len(payloads[i]) + BATCH_ENTRY_OVERHEAD
        if i > start and (i - start == max_calls or size + entry > MAX_BATCH_BYTES):
            messages.append(batch_message(command, headers[start:i], payloads[start:i]))
            start, size = i, 0
        size += entry
    messages.append(batch_message(command, headers[start:], payloads[start:]))
    return messages


def batch_message(command: bytes, headers: list[bytes], payloads: list[bytes]) -> list[bytes]:
    """One REQUEST_BATCH or REPLY_BATCH (``command``) of encoded headers and their payloads."""
    return [TAG, command, wire_pb2.EncodedBatch(headers=headers, payloads=payloads).SerializeToString()]


def _decode(message_type, raw: bytes, what: str):
    try:
        return message_type.FromString(raw)
    except Exception as exc:  # protobuf raises DecodeError, or others on some inputs
        raise ProtocolError("bad_header", f"undecodable {what}: {exc}") from None


def decode_request_header(raw: bytes) -> wire_pb2.RequestHeader:
    """Decode and validate a request header (spec §5)."""
    header = _decode(RequestHeader, raw, "request header")
    if not header.service or not header.method:
        raise ProtocolError("bad_header", "request header needs both service and method")
    return header


def request_id_of(raw_header: bytes) -> int:
    """The request id of a header that may not be valid, or 0 when it cannot be read.

    Read without decoding the rest: field 1 (request_id, in both header types) is the first one
    protobuf writes, so this costs the same for a huge header as for a small one.
    """
    if len(raw_header) < 2 or raw_header[0] != 0x08:  # field 1, varint
        return 0
    value, shift = 0, 0
    for i in range(1, min(len(raw_header), 11)):
        byte = raw_header[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            # A tenth byte may carry bits past 64: protobuf drops them, and so must we (an id
            # over uint64 would make the reply header that answers it unencodable).
            return value & _UINT64_MAX
        shift += 7
    return 0


def decode_reply_header(raw: bytes) -> wire_pb2.ReplyHeader:
    """Decode a reply header (spec §6)."""
    return _decode(ReplyHeader, raw, "reply header")


def decode_ready(body: Sequence[bytes]) -> wire_pb2.Ready:
    """Decode and validate a worker's READY body (spec §7)."""
    if len(body) != 1:
        raise ProtocolError("bad_frame_count", f"READY carries exactly 1 frame, got {len(body)}")
    ready = _decode(Ready, body[0], "READY")
    if not ready.services:
        raise ProtocolError("bad_ready", "READY names no service")
    if ready.capacity == 0:
        raise ProtocolError("bad_ready", "READY announces capacity 0")
    if ready.heartbeat_ms == 0:
        raise ProtocolError("bad_ready", "READY announces heartbeat interval 0")
    return ready


def decode_cancel(body: Sequence[bytes]) -> wire_pb2.Cancel:
    """Decode a CANCEL body (spec §8)."""
    if len(body) != 1:
        raise ProtocolError("bad_frame_count", f"CANCEL carries exactly 1 frame, got {len(body)}")
    return _decode(Cancel, body[0], "CANCEL")


def request_message(pairs_: Iterable[tuple[bytes, bytes]]) -> list[bytes]:
    """Frames of a REQUEST carrying encoded (header, payload) pairs."""
    frames = [TAG, REQUEST]
    for header, payload in pairs_:
        frames.append(header)
        frames.append(payload)
    return frames


def reply_message(pairs_: Iterable[tuple[bytes, bytes]]) -> list[bytes]:
    """Frames of a REPLY carrying encoded (header, payload) pairs."""
    frames = [TAG, REPLY]
    for header, payload in pairs_:
        frames.append(header)
        frames.append(payload)
    return frames


def encode_reply_header(
    request_id: int, code: int = StatusCode.OK, message: str = "", details: dict[str, str] | None = None
) -> bytes:
    """Encode a reply header; the OK case is the hot path and stays minimal."""
    header = ReplyHeader(request_id=request_id, code=int(code), message=message)
    if details:
        header.details.update(details)
    return header.SerializeToString()


def encode_ok_reply_header(request_id: int) -> bytes:
    """``encode_reply_header(request_id)``, the hot path of every answered call.

    An OK reply header is field 1 alone (proto3 leaves zero fields out), so its bytes are the
    tag 0x08 and the id as a varint: written here in 0.08-0.22 us, against 0.40 through protobuf.
    """
    if 0 < request_id < 0x80:
        return _OK_HEADERS[request_id]
    if not 0x80 <= request_id <= _UINT64_MAX:  # protobuf's own answer: b"" for 0, an error otherwise
        return ReplyHeader(request_id=request_id).SerializeToString()
    out = bytearray(b"\x08")
    while request_id >= 0x80:
        out.append((request_id & 0x7F) | 0x80)
        request_id >>= 7
    out.append(request_id)
    return bytes(out)


_OK_HEADERS = [bytes((0x08, i)) for i in range(0x80)]
_UINT64_MAX = (1 << 64) - 1


def error_reply(request_id: int, code: StatusCode, message: str, details: dict[str, str] | None = None) -> list[bytes]:
    """A complete REPLY message carrying one error (empty payload)."""
    return [TAG, REPLY, encode_reply_header(request_id, code, message, details), b""]


def ready_message(ready: wire_pb2.Ready) -> list[bytes]:
    return [TAG, READY, ready.SerializeToString()]


def heartbeat_message() -> list[bytes]:
    return [TAG, HEARTBEAT]


def capacity_message(capacity: int) -> list[bytes]:
    """A worker's HEARTBEAT telling a broker what it may hold there now (spec §7b)."""
    return [TAG, HEARTBEAT, Heartbeat(capacity=capacity).SerializeToString()]


def decode_heartbeat_capacity(body: Sequence[bytes]) -> int | None:
    """The capacity a worker's HEARTBEAT offers (spec §7b), or None when it offers none."""
    if not body:
        return None
    if len(body) != 1:
        raise ProtocolError("bad_frame_count", f"HEARTBEAT carries at most 1 frame, got {len(body)}")
    heartbeat = _decode(Heartbeat, body[0], "HEARTBEAT")
    return heartbeat.capacity if heartbeat.HasField("capacity") else None


def disconnect_message(reason: str = "", drain: bool = False) -> list[bytes]:
    return [TAG, DISCONNECT, Disconnect(reason=reason, drain=drain).SerializeToString()]


def cancel_message(request_ids: Iterable[int], deadline: bool = False) -> list[bytes]:
    """A CANCEL (spec §8); ``deadline``: a client gave the calls up at their deadlines."""
    return [TAG, CANCEL, Cancel(request_ids=list(request_ids), deadline=deadline).SerializeToString()]


def decode_disconnect(body: Sequence[bytes]) -> str:
    """The reason a DISCONNECT gives (empty when it gives none or it cannot be read)."""
    return decode_disconnect_message(body).reason


def decode_disconnect_message(body: Sequence[bytes]) -> wire_pb2.Disconnect:
    """A DISCONNECT body; an absent or unreadable one reads as a plain DISCONNECT (spec §11)."""
    if not body:
        return Disconnect()
    try:
        return _decode(Disconnect, body[0], "DISCONNECT")
    except ProtocolError:
        return Disconnect()


def refused_draining(details) -> bool:
    """Do a reply's details (a dict or a protobuf map) say its call was refused by a draining
    broker or worker?"""
    return details.get(RETRY_DETAIL) == DRAINING[RETRY_DETAIL]


def refused_not_run(details) -> bool:
    """Do a reply's details say a broker refused its call before any worker had it (§10)?"""
    return details.get(RETRY_DETAIL) == NOT_RUN[RETRY_DETAIL]


def never_ran(details) -> bool:
    """Do a reply's details say its call never ran (refused draining, or before a worker had it)?"""
    return refused_draining(details) or refused_not_run(details)
