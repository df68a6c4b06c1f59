"""The worker runtime: serves zrpc Services to one or more brokers."""
from ._runtime import NotABrokerBackend, Worker

__all__ = ["NotABrokerBackend", "Worker"]
