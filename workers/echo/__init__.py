"""A service for benchmarks and tests: ``zrpc worker run workers.echo:Echo``."""
from .service import Echo

__all__ = ["Echo"]
