"""The RabbitMQ consumer: an I/O thread that keeps the connection alive, a worker that handles."""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pika
import pika.exceptions as pex
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from shared.broker.connection import (
    CHANNEL_ERRORS,
    CONNECTION_ERRORS,
    backoff_delays,
    close_quietly,
    connect,
    properties,
)
from shared.broker.hooks import ConsumerHooks
from shared.broker.settlement import Action, Delivery, Handler, Settlement
from shared.broker.stream import OFFSET_HEADER
from shared.broker.worker import Settled, Worker
from shared.config import BrokerConfig
from shared.errors import ConnectionClosed, QueueInUse, one_line
from shared.topology import ORIGIN_QUEUE_HEADER, REASON_HEADER, Topology

if TYPE_CHECKING:
    from shared.health import Dependency

log = logging.getLogger(__name__)

# How long the consumer's I/O loop sleeps between checks of the stop flag and the worker.
POLL_INTERVAL_S = 0.2
# AMQP reply code of a refused operation (permissions, or a queue in exclusive use).
ACCESS_REFUSED = 403


@dataclass(frozen=True)
class ConsumeOptions:
    """How a consumer holds its queues."""

    # RabbitMQ's prefetch is per consumer: consuming N queues holds up to N x prefetch
    # deliveries. Shared (`global`) makes it one window for the whole channel, so a node
    # consuming six job queues holds one job, not six (classic queues only: quorum queues
    # refuse a global prefetch).
    shared_prefetch: bool = False
    # Exclusive: the broker refuses a second consumer on our queues (a pupil's lesson queue:
    # one process per node id). Refused, we retry for ``in_use_wait_s`` (the consumer in the
    # way may be our own predecessor's, on a connection the broker has not seen die yet),
    # then raise QueueInUse.
    exclusive: bool = False
    in_use_wait_s: float = 0.0


@dataclass(frozen=True)
class Subscription:
    """What a consumer consumes, what it calls, and how: one service's side of a consumer."""

    topology: Topology
    queues: list[str]
    handler: Handler
    declare: Callable[[Any], object]  # declares what it consumes on each new channel
    hooks: ConsumerHooks = field(default_factory=ConsumerHooks)
    pause_while: Sequence[Dependency] = ()
    options: ConsumeOptions = field(default_factory=ConsumeOptions)
    # Set for a stream (the lesson stream): called on the I/O thread at every (re)subscribe, it
    # returns where to start (an offset, or "first"). Its value is the consume's
    # ``x-stream-offset``; ``exclusive`` does not apply (streams have no exclusive consumers).
    stream_start: Callable[[], int | str] | None = None


class _QueueInUse(Exception):
    """basic.consume was refused: another consumer holds the queue exclusively (or we asked for
    exclusivity on a queue that has a consumer)."""

    def __init__(self, queue: str, reply_text: str) -> None:
        super().__init__(reply_text)
        self.queue = queue
        self.reply_text = reply_text


class _ConsumerLost(Exception):
    """The connection is up but our channel or a consumer on it is gone: start afresh."""


def _check_consuming(channel: BlockingChannel, consumers: int) -> None:
    """Raise _ConsumerLost if the broker closed ``channel`` or cancelled one of its consumers.

    pika's ``connection.process_data_events`` does not raise when the broker closes one channel
    of a live connection, so without this check a consumer whose channel RabbitMQ closed (e.g.
    for exceeding ``consumer_timeout`` with an unacked delivery, 406 PRECONDITION_FAILED) would
    sit on a healthy connection receiving nothing, forever. A consumer cancelled by the broker
    (``basic.cancel``: its queue was deleted, or a newer RabbitMQ's consumer timeout) is treated
    the same way.
    """
    if channel.is_closed:
        # pika keeps the broker's reply (code and text) only on a private attribute; it is worth
        # reading for the log line, and its absence costs nothing.
        reason = getattr(channel, "_closing_reason", None)
        raise _ConsumerLost(f"the broker closed the consumer channel: {reason!r}")
    if len(channel.consumer_tags) < consumers:
        raise _ConsumerLost("the broker cancelled a consumer")


def _describe(exc: Exception) -> str:
    return str(exc) if isinstance(exc, _ConsumerLost) else repr(exc)


class Consumer:
    """Consumes queues with manual acks: an I/O thread (the caller's) and one worker thread.

    The contract, for a handler ``handler(delivery) -> Settlement | None`` on the worker thread:
    - returns None or ``Settlement.ack(pending)``: acked. An ack carrying ``pending`` writes is
      sent only after ``pending.commit()`` returned; acks handed over together share one commit.
      If the commit raises, they are requeued instead (code ``not_durable``);
    - returns ``Settlement.requeue(code, text)`` or ``Settlement.dead_letter(code, text)``: so;
    - raises: settled by the exception's ``code`` (shared.errors.ReasonCode):
      - a dead-letter code (``DecodeError`` and kin): republished to ``<ns>.dead`` with ``text``
        in the ``x-distill-swarm-reason`` header (confirmed), then acked;
      - an outage (``DependencyDown``) of a dependency in ``pause_while``: the delivery is held
        unacked and no handler runs until the dependency's probe succeeds; then the handler
        runs again on the same delivery;
      - ``Requeue``, a broker error, an unprobed outage: requeued after a backoff that starts
        afresh after each success;
      - anything else (``handler_error``): requeued once, dead-lettered on the redelivery.
    - a body over ``MAX_MESSAGE_BYTES`` is dead-lettered (``too_large``) unseen.
    Settlements go out in delivery order on the I/O thread; a run of acks is one multiple ack.
    Fast handlers' settlements are batched (up to ``SETTLE_BATCH_MAX``) while deliveries wait.
    Hooks (:class:`ConsumerHooks`): ``on_tick`` and ``on_rejected``, both on the I/O thread.
    ``connected`` is set while a channel consumes. A lost connection is reconnected with
    backoff; deliveries of the lost channel are left for the broker to redeliver. On stop, the
    last hand-over is still sent, so the work in hand is not redone after a restart.

    A stream (``stream_start`` given: the lesson stream) consumes from ``stream_start()`` at
    every subscribe and is never nacked (RabbitMQ closes the connection for it). A requeue
    abandons the channel at once, before any later delivery is handled, and the consumer
    resubscribes from ``stream_start()``. A dead-letter republish that is refused is logged and
    acked (docs/stream.md).
    """

    def __init__(
        self,
        config: BrokerConfig,
        topology: Topology,
        queues: list[str],
        handler: Handler,
        declare: Callable[[BlockingChannel], object],
        hooks: ConsumerHooks | None = None,
        pause_while: Sequence[Dependency] = (),
        options: ConsumeOptions | None = None,
        stream_start: Callable[[], int | str] | None = None,
    ) -> None:
        self._config = config
        hooks, options = hooks or ConsumerHooks(), options or ConsumeOptions()
        self._sub = Subscription(
            topology, queues, handler, declare, hooks, pause_while, options, stream_start
        )
        # A stream cannot requeue (nack closes the connection): a requeue abandons the channel's
        # generation instead, and the consumer resubscribes from ``stream_start()``.
        self._abandoned = -1
        self._work: queue.Queue[Delivery | None] = queue.Queue()
        self._generation = 0
        self._connection: BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._in_use_since: float | None = None
        self._in_use_delays: Iterator[float] | None = None
        self._connected_once = False
        self.connected = threading.Event()

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set, reconnecting with backoff when the broker goes away.

        Raises ConnectionClosed only if the *first* connection fails ``broker.connect_attempts``
        times; after that, the broker is waited for until ``stop`` is set.
        """
        handler = Worker(self._sub.handler, stop, self._config.max_backoff_s, self._sub.pause_while)
        worker = threading.Thread(
            target=handler.run,
            args=(self._work, self._current, self._schedule_settle),
            name="consumer-worker",
            daemon=True,
        )
        worker.start()
        try:
            while not stop.is_set():
                try:
                    self._consume_until_closed(stop)
                except ConnectionClosed:
                    if stop.is_set():
                        break  # stopped while waiting for the broker: a clean exit
                    raise
                except _QueueInUse as exc:
                    self.connected.clear()
                    self._generation += 1
                    self._wait_while_in_use(exc, stop)
                except (*CONNECTION_ERRORS, *CHANNEL_ERRORS, _ConsumerLost) as exc:
                    self.connected.clear()
                    self._generation += 1  # deliveries of the old channel can no longer be acked
                    log.warning("lost the broker connection (%s); reconnecting", _describe(exc))
        finally:
            self.connected.clear()
            self._work.put(None)
            worker.join(timeout=60)
            self._flush_settlements()
            self._close()

    def _current(self, delivery: Delivery) -> bool:
        return delivery.generation == self._generation != self._abandoned

    def _flush_settlements(self) -> None:
        # The worker's last ack waits as a callback for the I/O loop, which has stopped: run it,
        # so that a clean stop after the lesson in hand does not leave that lesson to be redone
        # (replayed from the journal) after the restart.
        connection = self._connection
        if connection is not None and connection.is_open:
            with contextlib.suppress(*CONNECTION_ERRORS, *CHANNEL_ERRORS):
                connection.process_data_events(time_limit=0)

    def _consume_until_closed(self, stop: threading.Event) -> None:
        self._close()
        self._connection = connect(self._config, stop, until_stopped=self._connected_once)
        self._connected_once = True
        channel = self._connection.channel()
        channel.confirm_delivery()  # dead-letter publishes are confirmed before the ack
        self._sub.declare(channel)
        channel.basic_qos(
            prefetch_count=self._config.prefetch, global_qos=self._sub.options.shared_prefetch
        )
        stream_start = self._sub.stream_start
        for name in self._sub.queues:
            try:
                channel.basic_consume(
                    name,
                    functools.partial(self._on_message, name),
                    auto_ack=False,
                    exclusive=self._sub.options.exclusive and stream_start is None,
                    arguments=None if stream_start is None else {OFFSET_HEADER: stream_start()},
                )
            except pex.ChannelClosedByBroker as exc:
                # RabbitMQ refuses a consumer on a queue that has an exclusive one, and an
                # exclusive one on a queue that has any, with 403 "... in exclusive use".
                if exc.reply_code == ACCESS_REFUSED and "exclusive use" in str(exc.reply_text):
                    raise _QueueInUse(name, str(exc.reply_text)) from None
                raise
        self._in_use_since = None
        self._channel = channel
        self.connected.set()
        log.info("consuming %s", ", ".join(self._sub.queues))
        next_tick = time.monotonic()
        while not stop.is_set():
            self._connection.process_data_events(time_limit=POLL_INTERVAL_S)
            _check_consuming(channel, len(self._sub.queues))
            if self._abandoned == self._generation:
                raise _ConsumerLost("a stream delivery was requeued: resubscribing from its offset")
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + self._sub.hooks.tick_interval_s
                self._sub.hooks.on_tick()

    def _close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        close_quietly(connection)

    def _wait_while_in_use(self, exc: _QueueInUse, stop: threading.Event) -> None:
        """Back off while another consumer holds our queue; raise QueueInUse once
        ``in_use_wait_s`` has passed since the first refusal."""
        now = time.monotonic()
        if self._in_use_since is None:
            self._in_use_since = now
            self._in_use_delays = backoff_delays(self._config.max_backoff_s)
        assert self._in_use_delays is not None
        left_s = self._sub.options.in_use_wait_s - (now - self._in_use_since)
        if left_s <= 0:
            self._close()
            raise QueueInUse(
                f"queue '{exc.queue}' is in use by another consumer (RabbitMQ: {exc.reply_text}); "
                f"still so after {now - self._in_use_since:.0f}s"
            )
        delay_s = min(next(self._in_use_delays), left_s)
        log.warning(
            "queue '%s' is in use by another consumer; retrying in %.1fs (giving up in %.0fs)",
            exc.queue,
            delay_s,
            left_s,
        )
        stop.wait(delay_s)

    def _on_message(
        self,
        queue_name: str,
        channel: BlockingChannel,
        method: Any,
        props: pika.BasicProperties,
        body: bytes,
    ) -> None:
        self._work.put(
            Delivery(
                queue=queue_name,
                body=body,
                message_id=props.message_id,
                headers=dict(props.headers or {}),
                redelivered=bool(method.redelivered),
                delivery_tag=method.delivery_tag,
                generation=self._generation,
                properties=props,
            )
        )

    def _schedule_settle(self, done: Settled) -> None:
        """Worker thread: hand ``done`` to the I/O thread, which alone may use the channel."""
        connection = self._connection
        if connection is None:
            return
        if self._sub.stream_start is not None and any(s.action is Action.REQUEUE for _, s in done):
            # Before the worker takes the next delivery: none after the requeued one may be
            # handled, or its offset, committed, would skip the requeued lesson.
            self._abandoned = self._generation
            return
        # If the connection died meanwhile, the broker redelivers the message: nothing to do.
        with contextlib.suppress(*CONNECTION_ERRORS):
            connection.add_callback_threadsafe(functools.partial(self._settle_all, done))

    def _settle_all(self, done: Settled) -> None:
        """I/O thread: send ``done`` on the current channel (see :func:`send_settlements`)."""
        channel = self._channel
        if channel is None or not channel.is_open:
            return  # the broker redelivers whatever was not settled
        current = [(d, s) for d, s in done if self._current(d)]
        stream = self._sub.stream_start is not None
        send_settlements(channel, self._sub.topology, current, self._sub.hooks, stream)


def send_settlements(
    channel: BlockingChannel,
    topology: Topology,
    done: Settled,
    hooks: ConsumerHooks,
    stream: bool = False,
) -> None:
    """Settle handled deliveries on ``channel`` in the order they arrived.

    A run of consecutive acks goes out as one ``multiple`` ack of its last delivery tag. That
    acks nothing else: the one worker handles deliveries in tag order, so every earlier delivery
    of this channel was settled already (by an earlier batch or earlier in this one), and a
    requeue or dead-letter in between is sent, in order, before the next run.
    """
    last_ack: Delivery | None = None
    for delivery, settlement in done:
        if settlement.action is Action.ACK:
            last_ack = delivery
            continue
        if last_ack is not None:
            channel.basic_ack(last_ack.delivery_tag, multiple=True)
            last_ack = None
        if settlement.action is Action.REQUEUE:
            channel.basic_nack(delivery.delivery_tag, requeue=True)
        else:
            _dead_letter(channel, topology, delivery, settlement, stream)
            hooks.on_rejected(delivery, settlement)
    if last_ack is not None:
        channel.basic_ack(last_ack.delivery_tag, multiple=True)


def _dead_letter(
    channel: BlockingChannel,
    topology: Topology,
    delivery: Delivery,
    settlement: Settlement,
    stream: bool = False,
) -> None:
    """Republish ``delivery`` to the dead exchange with the reason, then ack it.

    From a stream (which cannot dead-letter, and where a nack closes the connection) a refused
    republish is logged and the delivery acked all the same: the lesson stays in the stream.
    """
    reason = one_line(settlement.text)  # it may quote the message itself, or any exception's text
    log.warning(
        "dead-lettering message %s from %s (%s): %s",
        delivery.message_id,
        delivery.queue,
        settlement.code,
        reason,
    )
    headers = {
        **delivery.headers,
        REASON_HEADER: reason[:1000],
        ORIGIN_QUEUE_HEADER: delivery.queue,
    }
    try:
        channel.basic_publish(
            topology.dead_exchange,
            "",
            delivery.body,
            properties(delivery.message_id or "", headers),
        )
    except (pex.UnroutableError, pex.NackError):
        if stream:
            log.error("the dead-letter exchange refused message %s", delivery.message_id)
            channel.basic_ack(delivery.delivery_tag)
            return
        # Let RabbitMQ's own DLX take it (no reason header, but nothing is lost).
        channel.basic_nack(delivery.delivery_tag, requeue=False)
    else:
        channel.basic_ack(delivery.delivery_tag)
