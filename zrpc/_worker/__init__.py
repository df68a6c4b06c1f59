"""The worker runtime: serves zrpc Services to one or more brokers."""
from ._runtime import Worker

__all__ = ["Worker"]
