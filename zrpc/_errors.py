"""The one exception zrpc raises for a failed call.

    Exception
    └── Error            (.code: StatusCode, .message: str, .details: dict)

A handler raises ``Error(StatusCode.X, "msg")`` to give its caller that code; a client call that
fails raises ``Error`` with the code the broker, the worker or the client itself decided.
"""
from __future__ import annotations

from ._status import StatusCode


class Error(Exception):
    """A call failed with a status code, a message and optional string details."""

    def __init__(self, code: StatusCode, message: str = "", details: dict[str, str] | None = None):
        self.code = StatusCode(code)
        if self.code == StatusCode.OK:  # a handler raising it would answer OK with no reply
            raise ValueError("zrpc.Error needs a failure code: OK is not an error (return the reply instead)")
        # Strings on the wire: a handler's Error(..., {"attempts": 3}) means "3", and one that
        # could not be encoded would leave its call unanswered.
        self.message = _text(message)
        self.details = {_text(key): _text(value) for key, value in (details or {}).items()}
        super().__init__(f"{self.code.name}: {message}" if message else self.code.name)

    def __reduce__(self):  # keep code and message when pickled (concurrent.futures, multiprocessing)
        return (type(self), (self.code, self.message, self.details))


def _text(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    return str(value)
