"""Deleting one swarm's namespace: the demo, the tests and the benchmarks clean up after a run."""

from __future__ import annotations

from collections.abc import Iterable

from shared.broker import connect
from shared.config import BrokerConfig
from shared.errors import BrokerError
from shared.topology import Topology


def delete_namespace(
    config: BrokerConfig, node_ids: Iterable[str] = (), extra_queues: Iterable[str] = ()
) -> None:
    """Delete every exchange and queue of ``config.namespace``, ``node_ids``' lesson queues and
    ``extra_queues``.

    A broker that cannot be reached holds nothing to clean up, so that is no error (the caller
    sets how hard to try with ``config.connect_attempts``); a failure while deleting is.
    """
    try:
        connection = connect(config)
    except BrokerError:
        return
    try:
        channel = connection.channel()
        for queue in extra_queues:
            channel.queue_delete(queue)
        Topology(config.namespace).delete_all(channel, tuple(node_ids))
    finally:
        connection.close()
