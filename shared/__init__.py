"""Code both sides of distill-swarm import: messages, broker, backends, adapter, config."""

from importlib.metadata import PackageNotFoundError, version

from distill_swarm.origin import check_installation

check_installation()  # another installation's `master` or `pupil_node` fails here, in one line

try:
    __version__ = version("distill-swarm")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
