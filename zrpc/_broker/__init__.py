"""The broker: engine (pure logic), built-in service, configuration and socket loop."""
from ._config import BrokerConfig, load_config_file
from ._engine import BrokerEngine
from ._loop import Broker

__all__ = ["Broker", "BrokerConfig", "BrokerEngine", "load_config_file"]
