"""Code both sides of distill-swarm import: messages, broker, backends, adapter, config."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("distill-swarm")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
