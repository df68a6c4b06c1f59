"""zrpc: typed protobuf RPC through a ZeroMQ broker.

The public API is re-exported here; every implementation module is private (``zrpc._x``).
``zrpc.testing`` holds helpers for testing services.
"""
from ._allocator import tune_allocator
from ._broker import Broker, BrokerConfig
from ._client import AsyncClient, CircuitBreaker, Client, RetryPolicy
from ._errors import Error
from ._service import Context, Service, nonblocking
from ._status import StatusCode
from ._worker import NotABrokerBackend, Worker

__all__ = [
    "AsyncClient",
    "Broker",
    "BrokerConfig",
    "CircuitBreaker",
    "Client",
    "Context",
    "Error",
    "NotABrokerBackend",
    "RetryPolicy",
    "Service",
    "StatusCode",
    "Worker",
    "nonblocking",
    "tune_allocator",
]
__version__ = "0.1.0"
