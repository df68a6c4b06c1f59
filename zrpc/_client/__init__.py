"""zrpc clients: blocking (:class:`Client`) and asyncio (:class:`AsyncClient`) over one core."""
from ._async import AsyncClient
from ._breaker import CircuitBreaker
from ._retry import RetryPolicy
from ._stub import Stub
from ._sync import Client

__all__ = ["AsyncClient", "CircuitBreaker", "Client", "RetryPolicy", "Stub"]
