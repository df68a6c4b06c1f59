"""Status codes: the canonical set gRPC uses, with the same numbers, so users know them."""
from __future__ import annotations

import enum


class StatusCode(enum.IntEnum):
    """The outcome of a call, carried in every reply header."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16

    @classmethod
    def from_wire(cls, value: int) -> "StatusCode":
        """Decode a code from a header; a number we do not know becomes UNKNOWN."""
        try:
            return cls(value)
        except ValueError:
            return cls.UNKNOWN
