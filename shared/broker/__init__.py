"""RabbitMQ on pika: connections, a confirming publisher, a consumer with a typed contract.

One module per concept: :mod:`~shared.broker.connection` (connect with capped backoff),
:mod:`~shared.broker.publisher`, :mod:`~shared.broker.settlement` (a delivery and its fate, with
a reason code), :mod:`~shared.broker.hooks`, :mod:`~shared.broker.worker` (the handler's thread,
for every broker), :mod:`~shared.broker.consumer` (RabbitMQ's I/O thread),
:mod:`~shared.broker.base` (what a service asks a broker for) and :mod:`~shared.broker.stub`
(the same in memory, for tests). pika exceptions never leave this package: they become
:class:`shared.errors.BrokerError` kinds.
"""

from shared.broker.base import Broker, MessageConsumer, RabbitBroker
from shared.broker.connection import (
    backoff_delays,
    broker_user,
    close_quietly,
    connect,
    connection_parameters,
    properties,
    purge,
    redact,
)
from shared.broker.consumer import ConsumeOptions, Consumer, Subscription
from shared.broker.hooks import ConsumerHooks
from shared.broker.publisher import Publisher, WindowedPublisher
from shared.broker.settlement import (
    Action,
    Delivery,
    Handler,
    PendingWrites,
    Requeue,
    Settlement,
    settlement_for,
)

__all__ = [
    "Action",
    "Broker",
    "ConsumeOptions",
    "Consumer",
    "ConsumerHooks",
    "Delivery",
    "Handler",
    "MessageConsumer",
    "PendingWrites",
    "Publisher",
    "RabbitBroker",
    "Requeue",
    "Settlement",
    "Subscription",
    "WindowedPublisher",
    "backoff_delays",
    "broker_user",
    "close_quietly",
    "connect",
    "connection_parameters",
    "properties",
    "purge",
    "redact",
    "settlement_for",
]
