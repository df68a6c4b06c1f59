"""An in-memory key-value store: ``zrpc worker run workers.kv:KeyValue``."""
from .service import KeyValue

__all__ = ["KeyValue"]
