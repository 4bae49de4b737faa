"""What a service needs from a broker: publishers and consumers. RabbitMQ or memory (tests)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from shared.broker.consumer import ConsumeOptions, Consumer
from shared.broker.hooks import ConsumerHooks
from shared.broker.publisher import Publisher
from shared.broker.settlement import Handler
from shared.config import BrokerConfig
from shared.topology import Topology

if TYPE_CHECKING:
    from shared.health import Dependency

# Declares what a publisher or consumer needs on a fresh channel (Topology.declare_*).
Declare = Callable[[Any], object]


class MessagePublisher(Protocol):
    """Publishes and returns once the broker has the message (:class:`Publisher`)."""

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        message_id: str,
        headers: Mapping[str, Any] | None = None,
        mandatory: bool = True,
        **props: Any,
    ) -> None: ...

    def pump(self) -> None: ...

    def close(self) -> None: ...


class MessageConsumer(Protocol):
    """Consumes until stopped (:class:`Consumer`); ``connected`` is set while it consumes."""

    connected: threading.Event

    def run(self, stop: threading.Event) -> None: ...


class Broker(Protocol):
    """Makes a service's publishers and consumers: :class:`RabbitBroker` or the stub."""

    def publisher(
        self, declare: Declare | None = None, stop: threading.Event | None = None
    ) -> MessagePublisher: ...

    def consumer(
        self,
        topology: Topology,
        queues: list[str],
        handler: Handler,
        declare: Declare,
        hooks: ConsumerHooks | None = None,
        pause_while: Sequence[Dependency] = (),
        options: ConsumeOptions | None = None,
    ) -> MessageConsumer: ...


class RabbitBroker:
    """Publishers and consumers on RabbitMQ, each with its own connection.

    Consumers use ``consumer_config`` if given (the master's wider prefetch window), publishers
    and otherwise consumers ``config``.
    """

    def __init__(self, config: BrokerConfig, consumer_config: BrokerConfig | None = None) -> None:
        self.config = config
        self.consumer_config = consumer_config or config

    def publisher(
        self, declare: Declare | None = None, stop: threading.Event | None = None
    ) -> Publisher:
        """A confirming publisher (it connects on its first publish)."""
        return Publisher(self.config, declare, stop)

    def consumer(
        self,
        topology: Topology,
        queues: list[str],
        handler: Handler,
        declare: Declare,
        hooks: ConsumerHooks | None = None,
        pause_while: Sequence[Dependency] = (),
        options: ConsumeOptions | None = None,
    ) -> Consumer:
        """A consumer of ``queues`` (it connects in ``run``)."""
        return Consumer(
            self.consumer_config, topology, queues, handler, declare, hooks, pause_while, options
        )
