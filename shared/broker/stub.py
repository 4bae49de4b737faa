"""RabbitMQ in memory, for fast tests of the services (as Dramatiq's ``StubBroker``).

:class:`StubChannel` keeps exchanges, queues and bindings as a :class:`~shared.topology.Topology`
declares them, routes what is published (fanout, direct, topic, the default exchange) and records
every frame. :class:`StubBroker` makes publishers and consumers on it. A stub consumer runs the
same :class:`~shared.broker.worker.Worker` and sends its settlements with the same
:func:`~shared.broker.consumer.send_settlements` as the real one; only the transport differs, and
:meth:`StubConsumer.drain` runs it on the calling thread, so a test needs no threads and no sleeps.
"""

from __future__ import annotations

import inspect
import itertools
import json
import queue
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
from pika.adapters.blocking_connection import BlockingChannel

from shared.broker.connection import properties
from shared.broker.consumer import Subscription, send_settlements
from shared.broker.publisher import (
    DEFAULT_CONFIRM_WINDOW,
    Publisher,
    WindowedPublisher,
    _Unconfirmed,
)
from shared.broker.settlement import Delivery
from shared.broker.worker import Worker
from shared.config import BrokerConfig

# AMQP reply codes the stub answers with, as RabbitMQ would.
NOT_FOUND = 404
PRECONDITION_FAILED = 406
# A drain stops after this many deliveries: a message that is requeued forever must not hang a test.
MAX_DRAIN_DELIVERIES = 10_000


def _bind(method: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Arguments of a call as pika's own BlockingChannel method would receive them."""
    bound = inspect.signature(method).bind(None, *args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def _topic_matches(pattern: str, key: str) -> bool:
    """AMQP topic matching: ``*`` is exactly one word, ``#`` zero or more."""
    return _words_match(pattern.split("."), key.split("."))


def _words_match(pattern: list[str], words: list[str]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_words_match(rest, words[i:]) for i in range(len(words) + 1))
    return bool(words) and head in ("*", words[0]) and _words_match(rest, words[1:])


@dataclass
class StubMessage:
    """A message in a stub queue."""

    body: bytes
    properties: pika.BasicProperties
    redelivered: bool = False


class StubChannel:
    """An AMQP channel in memory: declarations, routing, queues, acks; every frame recorded.

    ``exchanges``, ``queues`` and ``bindings`` hold what was declared, in one shape whatever the
    declaring call looked like, so two declarations can be compared (tests/deploy compares the
    topology with the deploy definitions this way). ``frames`` lists what a broker would see:
    ``("publish", exchange, routing_key, body)``, ``("ack", tag, multiple)``,
    ``("nack", tag, requeue)``.
    """

    is_open = True
    is_closed = False

    def __init__(self) -> None:
        self.exchanges: dict[str, dict[str, Any]] = {}
        self.queues: dict[str, dict[str, Any]] = {}
        self.bindings: set[tuple[str, str, str, str]] = set()
        self.messages: dict[str, deque[StubMessage]] = {}
        self.frames: list[tuple[Any, ...]] = []
        self._unacked: dict[int, tuple[str, StubMessage]] = {}
        self._tags = itertools.count(1)

    # -- declarations ------------------------------------------------------------------------

    @staticmethod
    def _record(table: dict[str, dict[str, Any]], name: str, props: dict[str, Any]) -> None:
        # Redeclaring with other properties is what the broker answers with PRECONDITION_FAILED.
        if table.setdefault(name, props) != props:
            raise pex.ChannelClosedByBroker(PRECONDITION_FAILED, f"{name} declared two ways")

    @staticmethod
    def _check_exists(table: Mapping[str, Any], name: str) -> None:
        if name not in table:
            raise pex.ChannelClosedByBroker(NOT_FOUND, f"NOT_FOUND - no '{name}'")

    def exchange_declare(self, *args: Any, **kwargs: Any) -> None:
        a = _bind(BlockingChannel.exchange_declare, args, kwargs)
        if a["passive"]:
            self._check_exists(self.exchanges, a["exchange"])
            return
        kind = a["exchange_type"]
        self._record(
            self.exchanges,
            a["exchange"],
            {
                "type": str(getattr(kind, "value", kind)),
                "durable": a["durable"],
                "auto_delete": a["auto_delete"],
                "internal": a["internal"],
                "arguments": dict(a["arguments"] or {}),
            },
        )

    def queue_declare(self, *args: Any, **kwargs: Any) -> None:
        a = _bind(BlockingChannel.queue_declare, args, kwargs)
        if a["passive"]:
            self._check_exists(self.queues, a["queue"])
            return
        self._record(
            self.queues,
            a["queue"],
            {
                "durable": a["durable"],
                "exclusive": a["exclusive"],
                "auto_delete": a["auto_delete"],
                "arguments": dict(a["arguments"] or {}),
            },
        )
        self.messages.setdefault(a["queue"], deque())

    def queue_bind(self, *args: Any, **kwargs: Any) -> None:
        a = _bind(BlockingChannel.queue_bind, args, kwargs)
        # pika binds with the queue's name when no routing key is given.
        key = a["queue"] if a["routing_key"] is None else a["routing_key"]
        arguments = json.dumps(a["arguments"] or {}, sort_keys=True)
        self.bindings.add((a["exchange"], a["queue"], key, arguments))

    def confirm_delivery(self) -> None:
        """Every stub publish is confirmed (or raises) at once."""

    def basic_qos(self, *args: Any, **kwargs: Any) -> None:
        """A stub consumer takes what is queued; prefetch does not apply."""

    # -- messages ----------------------------------------------------------------------------

    def _route(self, exchange: str, routing_key: str) -> list[str]:
        if exchange == "":
            return [routing_key] if routing_key in self.messages else []
        self._check_exists(self.exchanges, exchange)
        kind = self.exchanges[exchange]["type"]
        return sorted(
            queue
            for bound, queue, key, _ in self.bindings
            if bound == exchange
            and (
                kind == "fanout"
                or (kind == "direct" and key == routing_key)
                or (kind == "topic" and _topic_matches(key, routing_key))
            )
        )

    def basic_publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: pika.BasicProperties | None = None,
        mandatory: bool = False,
    ) -> None:
        """Route ``body`` to every bound queue; unroutable and ``mandatory`` raises, as pika's."""
        self.frames.append(("publish", exchange, routing_key, body))
        queues = self._route(exchange, routing_key)
        if not queues and mandatory:
            raise pex.UnroutableError([])
        for name in queues:
            self.messages[name].append(StubMessage(body, properties or pika.BasicProperties()))

    def take(self, queue_name: str) -> tuple[int, StubMessage] | None:
        """Deliver the queue's next message (unacked until settled), or None if it is empty."""
        waiting = self.messages.get(queue_name)
        if not waiting:
            return None
        message = waiting.popleft()
        tag = next(self._tags)
        self._unacked[tag] = (queue_name, message)
        return tag, message

    def basic_ack(self, delivery_tag: int = 0, multiple: bool = False) -> None:
        self.frames.append(("ack", delivery_tag, multiple))
        for tag in [
            t for t in self._unacked if t == delivery_tag or (multiple and t < delivery_tag)
        ]:
            del self._unacked[tag]

    def basic_nack(
        self, delivery_tag: int = 0, multiple: bool = False, requeue: bool = True
    ) -> None:
        self.frames.append(("nack", delivery_tag, requeue))
        queue_name, message = self._unacked.pop(delivery_tag)
        if requeue:  # back to the head of its queue, as RabbitMQ does
            message.redelivered = True
            self.messages[queue_name].appendleft(message)

    def queue_purge(self, queue_name: str) -> None:
        self.messages[queue_name].clear()


class StubPublisher(Publisher):
    """The real :class:`~shared.broker.publisher.Publisher`, on a :class:`StubChannel`."""

    def __init__(
        self,
        channel: StubChannel,
        config: BrokerConfig,
        declare: Callable[[Any], object] | None = None,
    ) -> None:
        super().__init__(config, declare)
        self._stub = channel

    def _ensure_channel(self) -> BlockingChannel:
        # The stub channel stands for every channel the publisher would open.
        if self._channel is None:
            if self._declare is not None:
                self._declare(self._stub)
            self._channel = self._stub
        return self._channel


class StubWindowedPublisher(WindowedPublisher):
    """The real :class:`~shared.broker.publisher.WindowedPublisher`, on a :class:`StubChannel`.

    The stub broker confirms what is in flight whenever the publisher waits for events, unless
    ``hold_confirms`` is set: then nothing is confirmed (a test looks at what was marked done
    before any confirm came).
    """

    def __init__(
        self,
        channel: StubChannel,
        config: BrokerConfig,
        declare: Callable[[Any], object] | None = None,
        window: int = DEFAULT_CONFIRM_WINDOW,
    ) -> None:
        super().__init__(config, declare, window=window)
        self._stub = channel
        self.hold_confirms = False

    _ensure_channel = StubPublisher._ensure_channel  # the same one stub channel

    def _send(self, channel: BlockingChannel, message: _Unconfirmed) -> None:
        try:
            props = properties(message.message_id, message.headers, **message.props)
            self._stub.basic_publish(
                message.exchange, message.routing_key, message.body, props, message.mandatory
            )
        except pex.UnroutableError:
            self._returned.add(message.message_id)  # RabbitMQ returns it, then confirms it

    def _wait_for_events(self, timeout_s: float) -> None:
        if self.hold_confirms or not self._in_flight:
            time.sleep(min(timeout_s, 0.001))
            return
        last = max(self._in_flight)
        self._on_confirm(pika.frame.Method(1, pika.spec.Basic.Ack(last, multiple=True)))


class StubConsumer:
    """A consumer of stub queues: the real worker and settling, run by :meth:`drain`."""

    def __init__(self, channel: StubChannel, subscription: Subscription) -> None:
        self._channel = channel
        self._subscription = subscription
        self._stop = threading.Event()
        # No backoff: a stub requeue is redelivered by the next round of the drain.
        self._worker = Worker(subscription.handler, self._stop, 0.0, subscription.pause_while)
        self.connected = threading.Event()
        self.connected.set()

    def drain(self) -> int:
        """Deliver until every queue of this consumer is empty; returns how many deliveries."""
        delivered = 0
        while delivered < MAX_DRAIN_DELIVERIES:
            work: queue.Queue[Delivery | None] = queue.Queue()
            for name in self._subscription.queues:
                while (taken := self._channel.take(name)) is not None:
                    work.put(_delivery(name, *taken))
                    delivered += 1
            if work.empty():
                break
            work.put(None)
            self._worker.run(work, lambda _delivery: True, self._send)
        return delivered

    def _send(self, done: list[Any]) -> None:
        subscription = self._subscription
        send_settlements(self._channel, subscription.topology, done, subscription.hooks)

    def run(self, stop: threading.Event) -> None:
        """Drain and tick until ``stop`` is set (a service's ``run`` on the stub)."""
        while not stop.is_set():
            self.drain()
            self._subscription.hooks.on_tick()
            stop.wait(0.01)


def _delivery(queue_name: str, tag: int, message: StubMessage) -> Delivery:
    props = message.properties
    return Delivery(
        queue=queue_name,
        body=message.body,
        message_id=props.message_id,
        headers=dict(props.headers or {}),
        redelivered=message.redelivered,
        delivery_tag=tag,
        generation=0,
        properties=props,
    )


class StubBroker:
    """A whole broker in memory; ``channel`` holds its queues, bindings and frames.

    Publishers send as the user of ``config.url``, as a real broker connection does.
    """

    def __init__(self, config: BrokerConfig | None = None) -> None:
        self.channel = StubChannel()
        self.config = config or BrokerConfig()

    def publisher(
        self, declare: Callable[[Any], object] | None = None, stop: threading.Event | None = None
    ) -> StubPublisher:
        """A publisher on this broker; ``declare`` runs on its channel before the first publish."""
        return StubPublisher(self.channel, self.config, declare)

    def windowed_publisher(
        self,
        declare: Callable[[Any], object] | None = None,
        stop: threading.Event | None = None,
        window: int = DEFAULT_CONFIRM_WINDOW,
    ) -> StubWindowedPublisher:
        """A windowed publisher on this broker; the stub confirms as soon as it is asked to."""
        return StubWindowedPublisher(self.channel, self.config, declare, window)

    def consumer(self, subscription: Subscription) -> StubConsumer:
        """A consumer of ``subscription``, after its ``declare`` ran on this broker's channel."""
        subscription.declare(self.channel)
        return StubConsumer(self.channel, subscription)

    def queued(self, queue_name: str) -> list[StubMessage]:
        """The messages waiting in a queue (e.g. ``topology.dead_queue``), oldest first."""
        return list(self.channel.messages.get(queue_name, ()))
