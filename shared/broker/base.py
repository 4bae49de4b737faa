"""What a service needs from a broker: publishers and consumers. RabbitMQ or memory (tests)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

from shared.broker.consumer import Consumer, Subscription
from shared.broker.publisher import DEFAULT_CONFIRM_WINDOW, Publisher, WindowedPublisher
from shared.config import BrokerConfig

# Declares what a publisher needs on a fresh channel (Topology.declare_*).
Declare = Callable[[Any], object]


class MessageConsumer(Protocol):
    """Consumes until stopped (:class:`Consumer`); ``connected`` is set while it consumes."""

    connected: threading.Event

    def run(self, stop: threading.Event) -> None: ...


class Broker(Protocol):
    """Makes a service's publishers and consumers: :class:`RabbitBroker` or the stub."""

    def publisher(
        self, declare: Declare | None = None, stop: threading.Event | None = None
    ) -> Publisher: ...

    def windowed_publisher(
        self,
        declare: Declare | None = None,
        stop: threading.Event | None = None,
        window: int = DEFAULT_CONFIRM_WINDOW,
    ) -> WindowedPublisher: ...

    def consumer(self, subscription: Subscription) -> MessageConsumer: ...


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

    def windowed_publisher(
        self,
        declare: Declare | None = None,
        stop: threading.Event | None = None,
        window: int = DEFAULT_CONFIRM_WINDOW,
    ) -> WindowedPublisher:
        """A publisher with up to ``window`` confirms in flight (it connects on first use)."""
        return WindowedPublisher(self.config, declare, stop, window)

    def consumer(self, subscription: Subscription) -> Consumer:
        """A consumer of ``subscription`` (it connects in ``run``)."""
        s = subscription
        return Consumer(
            self.consumer_config, s.topology, s.queues, s.handler, s.declare, s.hooks,
            s.pause_while, s.options, s.stream_start,
        )  # fmt: skip
