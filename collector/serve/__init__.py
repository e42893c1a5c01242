"""`collector serve`: the appliance behind a Network or Gateway Load Balancer."""

from collector.serve.config import ConfigError, ServeConfig, load
from collector.serve.supervisor import StartupError, serve

__all__ = ["ConfigError", "ServeConfig", "StartupError", "load", "serve"]
