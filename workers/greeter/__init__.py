"""The classic greeter: ``zrpc worker run workers.greeter:Greeter``."""
from .service import Greeter

__all__ = ["Greeter"]
