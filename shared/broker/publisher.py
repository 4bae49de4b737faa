"""A confirming publisher: ``publish`` returns once the broker has the message.

One lock serialises every use of its connection, so a worker thread and a keepalive thread may
share one publisher (the one exception to pika's rule of one connection per thread).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

import pika.exceptions as pex
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from shared.broker.connection import (
    CHANNEL_ERRORS,
    CONNECTION_ERRORS,
    broker_user,
    close_quietly,
    connect,
    properties,
)
from shared.config import BrokerConfig
from shared.errors import ConnectionClosed, PublishNotConfirmed

log = logging.getLogger(__name__)

# A publish that fails on a dead connection is retried on a new one this many times.
MAX_PUBLISH_ATTEMPTS = 5


class Publisher:
    """Publishes persistent messages with publisher confirms, reconnecting when needed.

    ``publish`` returns only after the broker confirmed the message, so a caller that acks its
    own input afterwards never loses what it produced. The first connection gets
    ``broker.connect_attempts`` tries; once connected, a lost broker is waited for until ``stop``
    is set (see :func:`connect`).
    """

    def __init__(
        self,
        config: BrokerConfig,
        declare: Callable[[BlockingChannel], object] | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self._config = config
        self._declare = declare
        self._stop = stop
        # Every message carries the broker user it was sent as. RabbitMQ refuses a user_id that
        # differs from the connection's user, so a receiver can trust it to say who sent what.
        self._user_id = broker_user(config.url)
        self._lock = threading.Lock()
        self._connection: BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._connected_once = False

    def _ensure_channel(self) -> BlockingChannel:
        if self._channel is not None and self._channel.is_open:
            return self._channel
        self._drop()
        self._connection = connect(self._config, self._stop, until_stopped=self._connected_once)
        self._connected_once = True
        channel = self._connection.channel()
        channel.confirm_delivery()
        if self._declare is not None:
            self._declare(channel)
        self._channel = channel
        return channel

    def _drop(self) -> None:
        # Forget the channel and the connection so that the next attempt opens new ones of each.
        connection, self._connection, self._channel = self._connection, None, None
        close_quietly(connection)

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        message_id: str,
        headers: Mapping[str, Any] | None = None,
        mandatory: bool = True,
        **props: Any,
    ) -> None:
        """Publish and wait for the broker's confirm; retry on a fresh connection if it drops.

        Raises PublishNotConfirmed when the broker nacks or (with ``mandatory``) no queue is bound,
        and ConnectionClosed when every attempt failed or ``stop`` was set while reconnecting.
        """
        last_error: Exception | None = None
        with self._lock:
            for _ in range(MAX_PUBLISH_ATTEMPTS):
                try:
                    channel = self._ensure_channel()
                    channel.basic_publish(
                        exchange,
                        routing_key,
                        body,
                        properties(message_id, headers, **{"user_id": self._user_id, **props}),
                        mandatory=mandatory,
                    )
                    return
                except pex.UnroutableError:
                    raise PublishNotConfirmed(
                        f"no queue is bound to exchange '{exchange}' with key '{routing_key}'"
                    ) from None
                except pex.NackError:
                    raise PublishNotConfirmed(
                        f"broker refused message {message_id} on exchange '{exchange}'"
                    ) from None
                except (*CONNECTION_ERRORS, *CHANNEL_ERRORS) as exc:
                    last_error = exc
                    log.warning("publish to %s failed (%r); reconnecting", exchange, exc)
                    self._drop()
        raise ConnectionClosed(f"could not publish to '{exchange}': {last_error!r}")

    def pump(self) -> None:
        """Let the idle connection answer heartbeats; a dead connection is dropped quietly."""
        with self._lock:
            if self._connection is None:
                return
            try:
                self._connection.process_data_events(0)
            except (*CONNECTION_ERRORS, *CHANNEL_ERRORS):
                self._drop()

    def close(self) -> None:
        """Close the connection, if any."""
        with self._lock:
            self._drop()
