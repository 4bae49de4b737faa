"""Confirming publishers: one confirm at a time (:class:`Publisher`) or a window of them.

:class:`Publisher`'s ``publish`` returns once the broker has the message. One lock serialises
every use of its connection, so a worker thread and a keepalive thread may share one publisher
(the one exception to pika's rule of one connection per thread). :class:`WindowedPublisher`
keeps many confirms in flight and tells the caller, message by message, when each arrived.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions as pex
import pika.frame
import pika.spec
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


class _PublishingConnection:
    """What both publishers keep of their connection: one channel, reopened when lost."""

    def __init__(
        self,
        config: BrokerConfig,
        declare: Callable[[BlockingChannel], object] | None,
        stop: threading.Event | None,
    ) -> None:
        self._config = config
        self._declare = declare
        self._stop = stop
        # Every message carries the broker user it was sent as. RabbitMQ refuses a user_id that
        # differs from the connection's user, so a receiver can trust it to say who sent what.
        self._user_id = broker_user(config.url)
        self._connection: BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._connected_once = False

    def _new_channel(self) -> BlockingChannel:
        """A channel on a new connection (the old one dropped): the first connection gets
        ``broker.connect_attempts`` tries, later ones wait for the broker until ``stop``."""
        self._drop()
        self._connection = connect(self._config, self._stop, until_stopped=self._connected_once)
        self._connected_once = True
        return self._connection.channel()

    def _drop(self) -> None:
        # Forget the channel and the connection so that the next attempt opens new ones of each.
        connection, self._connection, self._channel = self._connection, None, None
        close_quietly(connection)


class Publisher(_PublishingConnection):
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
        super().__init__(config, declare, stop)
        self._lock = threading.Lock()

    def _ensure_channel(self) -> BlockingChannel:
        if self._channel is not None and self._channel.is_open:
            return self._channel
        channel = self._new_channel()
        channel.confirm_delivery()
        if self._declare is not None:
            self._declare(channel)
        self._channel = channel
        return channel

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


# Messages a WindowedPublisher keeps unconfirmed by default: raw pika reached 10x the
# confirm-each rate with 100 in flight (bench/throughput.py), and 100 lessons of 10 KB are 1 MB
# of memory at most.
DEFAULT_CONFIRM_WINDOW = 100
# One wait for confirms: pika's blocking adapter returns from a timed wait only when the time is
# up (confirms taken by our own callback do not end it), so the slices are short: the window
# refills within 2 ms of a confirm, and ``stop`` is checked as often.
CONFIRM_POLL_S = 0.002
# A nacked message goes again after this long times its attempts so far: a nack means the broker
# could not take it (a full queue that rejects publishes, an internal error), and an immediate
# retry would spend every attempt within milliseconds.
NACK_RETRY_BASE_S = 0.2


@dataclass
class _Unconfirmed:
    """A message published (or about to be) and not yet confirmed, with what to do then."""

    exchange: str
    routing_key: str
    body: bytes
    message_id: str
    headers: Mapping[str, Any] | None
    mandatory: bool
    props: dict[str, Any]
    on_confirmed: Callable[[], None] | None
    attempts: int = 0
    not_before: float = 0.0  # monotonic time before which it is not sent again (after a nack)


class WindowedPublisher(_PublishingConnection):
    """Publishes persistent messages with up to ``window`` publisher confirms in flight.

    Where :class:`Publisher` waits for each confirm before the next publish (one broker round
    trip per message), this one keeps sending while confirms come back, as RabbitMQ's own
    guidance on throughput recommends. The guarantee is the same once :meth:`flush` returns:
    - ``on_confirmed`` of a message runs only after the broker confirmed *that* message, on the
      caller's thread (inside a later :meth:`publish` or :meth:`flush`), in publishing order;
      a caller marks the message done there (the master marks a lesson published) and nowhere
      else, so nothing is marked before its confirm;
    - a nacked message, and every unconfirmed one when the connection is lost, is published
      again (on a new connection if needed), up to ``MAX_PUBLISH_ATTEMPTS`` times each. A
      republished message may reach its queue twice (at-least-once: consumers dedupe by id);
    - an unroutable ``mandatory`` message raises :class:`PublishNotConfirmed` from the call
      that learns of it; the messages confirmed before it still get their callbacks.

    One thread only (no lock): pika's blocking adapter runs the confirm callbacks inside this
    object's own calls. The adapter offers confirms only one publish at a time, so the channel's
    confirm mode is switched on through its underlying asynchronous channel (``_impl``), the one
    place this module reaches past pika's public blocking API (docs/decisions.md §33).
    """

    def __init__(
        self,
        config: BrokerConfig,
        declare: Callable[[BlockingChannel], object] | None = None,
        stop: threading.Event | None = None,
        window: int = DEFAULT_CONFIRM_WINDOW,
    ) -> None:
        if window < 1:
            raise ValueError("a confirm window holds at least one message")
        super().__init__(config, declare, stop)
        self._window = window
        # Delivery tag -> message, oldest first (dicts keep insertion order).
        self._in_flight: dict[int, _Unconfirmed] = {}
        self._next_tag = 1
        self._resend: deque[_Unconfirmed] = deque()  # nacked or lost: to publish again
        self._confirmed: deque[_Unconfirmed] = deque()  # confirmed, callback not yet run
        self._returned: set[str] = set()  # message ids the broker returned as unroutable
        self._failure: PublishNotConfirmed | None = None
        self.republished = 0  # messages sent again after a nack or a lost connection

    @property
    def unconfirmed(self) -> int:
        """Messages published or queued for publishing whose confirm has not arrived yet."""
        return len(self._in_flight) + len(self._resend)

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        message_id: str,
        on_confirmed: Callable[[], None] | None = None,
        headers: Mapping[str, Any] | None = None,
        mandatory: bool = True,
        **props: Any,
    ) -> None:
        """Send a message, waiting only while ``window`` messages are unconfirmed.

        Raises PublishNotConfirmed (unroutable, or nacked on every attempt) and ConnectionClosed
        (the broker is gone and ``stop`` was set, or every reconnect failed).
        """
        message = _Unconfirmed(
            exchange, routing_key, body, message_id, headers, mandatory, props, on_confirmed
        )
        self._resend.append(message)
        self._pump(lambda: self.unconfirmed < self._window)

    def flush(self) -> None:
        """Wait until every message published so far is confirmed and its callback has run."""
        self._pump(lambda: self.unconfirmed == 0)

    def poll(self) -> None:
        """Take the confirms that have arrived (and answer heartbeats), without waiting; run
        their callbacks.

        For a caller that waits on something else meanwhile (the master on its model server)
        and polls every few tens of milliseconds: lessons are marked published as their
        confirms arrive, and an idle connection stays up.
        """
        if self._connection is None and not self._resend:
            return
        try:
            self._wait_for_events(0)
        except (*CONNECTION_ERRORS, *CHANNEL_ERRORS) as exc:
            self._lost(exc)
        self._pump(lambda: True)

    def close(self) -> None:
        """Close the connection; messages still unconfirmed are forgotten (not marked done)."""
        self._drop()

    # -- the loop ----------------------------------------------------------------------------

    def _pump(self, done: Callable[[], bool]) -> None:
        """Send what waits, take confirms and run their callbacks until ``done()``."""
        attempts = 0
        while True:
            try:
                self._send_waiting()
                self._run_callbacks()
                if done():
                    return
                if self._stop is not None and self._stop.is_set():
                    raise ConnectionClosed("stopped with messages still unconfirmed")
                self._wait_for_events(CONFIRM_POLL_S)
                attempts = 0
            except (*CONNECTION_ERRORS, *CHANNEL_ERRORS) as exc:
                attempts += 1
                if attempts >= MAX_PUBLISH_ATTEMPTS:
                    raise ConnectionClosed(f"could not publish: {exc!r}") from None
                self._lost(exc)

    def _lost(self, exc: Exception) -> None:
        log.warning(
            "publishing lost the broker (%r); %d unconfirmed messages go again",
            exc,
            len(self._in_flight),
        )
        self._requeue_in_flight()
        self._drop()

    def _send_waiting(self) -> None:
        while self._resend and len(self._in_flight) < self._window:
            if self._resend[0].not_before > time.monotonic():
                return  # the oldest waits after a nack; the rest wait behind it, in order
            channel = self._ensure_channel()
            message = self._resend[0]
            if message.attempts >= MAX_PUBLISH_ATTEMPTS:
                raise PublishNotConfirmed(
                    f"broker refused message {message.message_id} on exchange "
                    f"'{message.exchange}' {message.attempts} times"
                )
            # In flight before it is sent: its confirm may come back during the send itself, and
            # a send that fails puts it back with every other unconfirmed message.
            self._resend.popleft()
            message.attempts += 1
            self._in_flight[self._next_tag] = message
            self._next_tag += 1
            self._send(channel, message)

    def _send(self, channel: BlockingChannel, message: _Unconfirmed) -> None:
        # Buffered, not written yet: the blocking channel's basic_publish would write each message
        # and poll the socket on its own; these go out together at the next wait for events
        # (a full window, poll, flush), as raw pika's asynchronous publishing does.
        props = {"user_id": self._user_id, **message.props}
        channel._impl.basic_publish(
            message.exchange,
            message.routing_key,
            message.body,
            properties(message.message_id, message.headers, **props),
            mandatory=message.mandatory,
        )

    def _wait_for_events(self, timeout_s: float) -> None:
        """Let pika read what the broker sent (confirms, returns) for up to ``timeout_s``."""
        if self._connection is None:  # lost with nothing unconfirmed: reconnect when needed
            time.sleep(timeout_s)
            return
        self._connection.process_data_events(timeout_s)

    def _run_callbacks(self) -> None:
        while self._confirmed:
            message = self._confirmed.popleft()
            if message.on_confirmed is not None:
                message.on_confirmed()
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure

    # -- pika callbacks (run inside process_data_events / basic_publish, on this thread) -----

    def _on_confirm(self, frame: pika.frame.Method) -> None:
        method = frame.method
        tag = method.delivery_tag
        tags = [t for t in self._in_flight if t <= tag] if method.multiple else [tag]
        nacked = isinstance(method, pika.spec.Basic.Nack)
        again: list[_Unconfirmed] = []
        for t in tags:
            message = self._in_flight.pop(t, None)
            if message is None:
                continue
            if nacked:
                log.warning("broker nacked message %s; publishing it again", message.message_id)
                message.not_before = time.monotonic() + NACK_RETRY_BASE_S * message.attempts
                self.republished += 1
                again.append(message)
            elif message.message_id in self._returned:
                self._returned.discard(message.message_id)
                self._failure = self._failure or PublishNotConfirmed(
                    f"no queue is bound to exchange '{message.exchange}' with key "
                    f"'{message.routing_key}'"
                )
            else:
                self._confirmed.append(message)
        # Older than anything not sent yet: they go first, in their order.
        self._resend.extendleft(reversed(again))

    def _on_return(
        self, _channel: Any, _method: Any, props: pika.BasicProperties, _body: bytes
    ) -> None:
        # The broker returns an unroutable mandatory message before it confirms it.
        if props.message_id is not None:
            self._returned.add(props.message_id)

    # -- connection --------------------------------------------------------------------------

    def _ensure_channel(self) -> BlockingChannel:
        if self._channel is not None and self._channel.is_open:
            return self._channel
        self._requeue_in_flight()
        channel = self._new_channel()
        if self._declare is not None:
            self._declare(channel)
        selected: list[object] = []
        impl = channel._impl  # see the class docstring
        impl.add_on_return_callback(self._on_return)
        impl.confirm_delivery(ack_nack_callback=self._on_confirm, callback=selected.append)
        while not selected:
            channel.connection.process_data_events(CONFIRM_POLL_S)
        self._channel = channel
        self._next_tag = 1  # delivery tags count per channel, from 1
        return channel

    def _requeue_in_flight(self) -> None:
        # Unconfirmed messages of a lost channel go again, before anything newer, in order.
        lost = list(self._in_flight.values())
        self.republished += len(lost)
        self._in_flight.clear()
        self._resend.extendleft(reversed(lost))
        self._returned.clear()
