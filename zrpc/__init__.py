"""zrpc: typed protobuf RPC through a ZeroMQ broker."""
from ._errors import Error
from ._status import StatusCode

__all__ = ["Error", "StatusCode"]
__version__ = "0.1.0"
