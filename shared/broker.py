"""RabbitMQ on pika: connections that retry with capped backoff, a confirming publisher, a consumer.

Connecting: a service's first connection gets ``broker.connect_attempts`` tries (fail fast on a
wrong URL); once it has been connected, a lost broker is waited for until the service stops
(docs/decisions.md, section 18).

Threading follows pika's rule of one connection per thread, with one exception made safe by a
lock: the :class:`Publisher` serialises every use of its connection, so a worker thread and a
keepalive thread may share it. The :class:`Consumer` keeps its connection on the thread that calls
:meth:`Consumer.run` (so heartbeats keep flowing while a lesson takes minutes) and hands deliveries
to one worker thread; the worker's ack travels back through ``add_callback_threadsafe``.

pika exceptions never leave this module: they become :class:`shared.errors.BrokerError` kinds.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import random
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pika
import pika.exceptions as pex
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from shared.config import BrokerConfig
from shared.errors import (
    BrokerError,
    ConfigError,
    ConnectionClosed,
    DecodeError,
    DependencyDown,
    DistillSwarmError,
    PublishNotConfirmed,
    QueueInUse,
    one_line,
)
from shared.messages import MAX_MESSAGE_BYTES
from shared.tls import ssl_options, uses_tls_settings
from shared.topology import ORIGIN_QUEUE_HEADER, REASON_HEADER, Topology

if TYPE_CHECKING:
    from shared.health import Dependency

log = logging.getLogger(__name__)

# How long the consumer's I/O loop sleeps between checks of the stop flag and the worker.
POLL_INTERVAL_S = 0.2
# A publish that fails on a dead connection is retried on a new one this many times.
MAX_PUBLISH_ATTEMPTS = 5
# While more deliveries wait, the outcomes of handlers faster than this go to the I/O thread
# together, at most this many at a time: one wake-up and one multiple-ack frame instead of one
# each (the master ingesting reports; docs/performance.md). A slower handler's outcome (a
# pupil's lesson) is handed over at once, as is the last one before the queue runs dry.
SETTLE_BATCH_FAST_S = 0.005
SETTLE_BATCH_MAX = 64
CONTENT_TYPE = "application/json"

# AMQP reply code of a refused operation (permissions, or a queue in exclusive use).
ACCESS_REFUSED = 403
# OSError, not only ConnectionError: pika re-raises the last error of its connection workflow
# as it is, and for a host that does not resolve that is socket.gaierror. A Pi on WiFi loses DNS
# routinely; that is an unreachable broker like any other, never a crash.
_CONNECTION_ERRORS = (pex.AMQPConnectionError, pex.ConnectionWrongStateError, OSError)
_CHANNEL_ERRORS = (pex.AMQPChannelError, pex.ChannelWrongStateError)


def backoff_delays(max_backoff_s: float, base_s: float = 0.5) -> Iterator[float]:
    """Exponential backoff with full jitter, capped at ``max_backoff_s`` (an endless iterator)."""
    attempt = 0
    while True:
        cap = min(max_backoff_s, base_s * (2**attempt))
        yield random.uniform(cap / 2, cap)
        attempt += 1


# scheme://user:PASSWORD@ up to the *last* "@": a raw "@" in a password is hidden too, and an "@"
# later in the URL can only make us hide more than needed, never less.
_USERINFO_PASSWORD = re.compile(r"^(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:@/]*:).*@")


def redact(url: str) -> str:
    """The URL with its password replaced by ``***``, safe to log; works on any string.

    Text-based on purpose: parsing could fail on the very URL that is wrong, and a percent-encoded
    password differs from the decoded one a parser returns.
    """
    return _USERINFO_PASSWORD.sub(r"\g<head>***@", url, count=1)


def broker_user(url: str) -> str | None:
    """The user name a URL authenticates as, or None (no credentials, or not parseable)."""
    try:
        credentials = pika.URLParameters(url).credentials
    except ValueError:
        return None
    username = getattr(credentials, "username", None)
    return username or None


def connection_parameters(config: BrokerConfig) -> pika.URLParameters:
    """pika's parameters for ``config.url``; an amqps:// URL gets our verifying TLS context."""
    try:
        params = pika.URLParameters(config.url)
    except ValueError as exc:
        raise ConfigError(f"config field 'broker.url' ({redact(config.url)}): {exc}") from None
    if params.ssl_options is not None:
        params.ssl_options = ssl_options(config, params.host)
    elif uses_tls_settings(config):
        # Somebody believes this connection is encrypted; it would not be.
        raise ConfigError(
            f"config field 'broker.url': broker.tls_* is set but {redact(config.url)} is not "
            "amqps://"
        )
    return params


def connect(
    config: BrokerConfig, stop: threading.Event | None = None, *, until_stopped: bool = False
) -> BlockingConnection:
    """Open a connection, retrying with capped, jittered backoff.

    By default at most ``config.connect_attempts`` tries, then ConnectionClosed: a service that
    cannot reach the broker when it *starts* is most likely misconfigured, and says so at once.
    ``until_stopped=True`` is for a service that was connected before: losing the broker then is
    an outage (a restart, a network cut), so it keeps trying every ``config.max_backoff_s`` at most
    until the broker is back or ``stop`` is set (ConnectionClosed then too).

    Authentication and TLS failures are never retried: a wrong password or a certificate that does
    not verify does not get better with time.
    """
    params = connection_parameters(config)
    params.heartbeat = config.heartbeat_s
    params.blocked_connection_timeout = 300
    params.connection_attempts = 1
    delays = backoff_delays(config.max_backoff_s)
    limit = "until stopped" if until_stopped else str(config.connect_attempts)
    last_error: Exception | None = None
    attempt = 0
    while until_stopped or attempt < config.connect_attempts:
        attempt += 1
        if stop is not None and stop.is_set():
            raise ConnectionClosed(f"stopped while connecting to RabbitMQ at {redact(config.url)}")
        try:
            return pika.BlockingConnection(params)
        except (pex.ProbableAuthenticationError, pex.ProbableAccessDeniedError) as exc:
            raise BrokerError(
                f"RabbitMQ at {redact(config.url)} refused the credentials: {exc!r}"
            ) from None
        except ssl.SSLError as exc:
            reason = " ".join((exc.strerror or str(exc)).split())
            raise BrokerError(
                f"TLS with RabbitMQ at {redact(config.url)} failed: {reason}; check "
                "broker.tls_ca_file and broker.tls_server_hostname"
            ) from None
        except _CONNECTION_ERRORS as exc:
            last_error = exc
            if until_stopped or attempt < config.connect_attempts:
                delay = next(delays)
                log.warning(
                    "cannot reach RabbitMQ at %s (attempt %d/%s): %r; retrying in %.1fs",
                    redact(config.url),
                    attempt,
                    limit,
                    exc,
                    delay,
                )
                if stop is not None:
                    stop.wait(delay)
                else:
                    time.sleep(delay)
    raise ConnectionClosed(
        f"cannot reach RabbitMQ at {redact(config.url)} after {config.connect_attempts} "
        f"attempts: {last_error!r}"
    )


def close_quietly(connection: BlockingConnection | None) -> None:
    """Close a connection that may already be half dead, ignoring whatever that raises."""
    if connection is not None and connection.is_open:
        with contextlib.suppress(Exception):
            connection.close()


def properties(
    message_id: str, headers: Mapping[str, Any] | None = None, **extra: Any
) -> pika.BasicProperties:
    """Persistent JSON message properties."""
    return pika.BasicProperties(
        content_type=CONTENT_TYPE,
        delivery_mode=pika.DeliveryMode.Persistent,
        message_id=message_id,
        headers=dict(headers or {}),
        timestamp=int(time.time()),
        **extra,
    )


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
                except (*_CONNECTION_ERRORS, *_CHANNEL_ERRORS) as exc:
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
            except (*_CONNECTION_ERRORS, *_CHANNEL_ERRORS):
                self._drop()

    def close(self) -> None:
        """Close the connection, if any."""
        with self._lock:
            self._drop()


@dataclass
class Delivery:
    """One message handed to a handler."""

    queue: str
    body: bytes
    message_id: str | None
    headers: dict[str, Any]
    redelivered: bool
    delivery_tag: int
    generation: int
    properties: pika.BasicProperties = field(repr=False)


class Requeue(DistillSwarmError):
    """Raised by a handler that could not do its work now but may later (e.g. Ollama down)."""


Handler = Callable[[Delivery], None]


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
    """Consumes one or more queues with manual acks; one worker thread runs the handler.

    The handler's outcome decides the message's fate:
    - returns normally: ack (the handler made its work durable first);
    - raises :class:`DecodeError`: the message is published to the dead-letter exchange with the
      reason in a header, then acked; the consumer keeps going;
    - raises :class:`Requeue` (or a broker error): nack with requeue after a backoff, which
      starts afresh after each success (an early run of requeues must not make every later one
      wait the maximum);
    - raises an outage (:class:`DependencyDown`, e.g. the model server is down) of a dependency in
      ``pause_while``: the dependency is marked down and the delivery is *kept*, unacked; the
      worker takes nothing else until the dependency's probe succeeds, then runs the handler on
      the same delivery again. An outage of a dependency nobody probes is requeued as above;
    - raises anything else: requeued once; if it fails again on redelivery it is dead-lettered,
      so one poison message cannot make a crash loop.
    """

    def __init__(
        self,
        config: BrokerConfig,
        topology: Topology,
        queues: list[str],
        handler: Handler,
        declare: Callable[[BlockingChannel], object],
        on_tick: Callable[[], None] | None = None,
        tick_interval_s: float = 5.0,
        on_dead_letter: Callable[[Delivery, str], None] | None = None,
        shared_prefetch: bool = False,
        before_settle: Callable[[], None] | None = None,
        pause_while: Sequence[Dependency] = (),
        exclusive: bool = False,
        in_use_wait_s: float = 0.0,
    ) -> None:
        self._config = config
        # Exclusive: the broker refuses a second consumer on our queues (a pupil's lesson queue:
        # one process per node id). Refused, we retry for ``in_use_wait_s`` (the consumer in the
        # way may be our own predecessor's, on a connection the broker has not seen die yet),
        # then raise QueueInUse.
        self._exclusive = exclusive
        self._in_use_wait_s = in_use_wait_s
        self._in_use_since: float | None = None
        self._in_use_delays: Iterator[float] | None = None
        # While any of these is down, no handler runs: the delivery in hand waits, unacked.
        self._pause_while = tuple(pause_while)
        self._stop = threading.Event()
        # Called on the worker thread before a batch of outcomes is settled: a handler that
        # defers its commits makes them durable here, so nothing is acked before it is stored.
        self._before_settle = before_settle
        # RabbitMQ's prefetch is per consumer: consuming N queues holds up to N x prefetch
        # deliveries. Shared (`global`) makes it one window for the whole channel, so a node
        # consuming six job queues holds one job, not six (classic queues only: quorum queues
        # refuse a global prefetch).
        self._shared_prefetch = shared_prefetch
        self._topology = topology
        self._queues = queues
        self._handler = handler
        self._declare = declare
        self._on_tick = on_tick
        self._tick_interval_s = tick_interval_s
        self._on_dead_letter = on_dead_letter
        self._work: queue.Queue[Delivery | None] = queue.Queue()
        self._generation = 0
        self._connection: BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        # Created at the first requeue after a success, so each run of requeues backs off from
        # the start (issue 11: one iterator per process made every later requeue wait the cap).
        self._requeue_delays: Iterator[float] | None = None
        self._connected_once = False
        self.connected = threading.Event()

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set, reconnecting with backoff when the broker goes away.

        Raises ConnectionClosed only if the *first* connection fails ``broker.connect_attempts``
        times; after that, the broker is waited for until ``stop`` is set.
        """
        self._stop = stop
        worker = threading.Thread(target=self._work_loop, name="consumer-worker", daemon=True)
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
                except (*_CONNECTION_ERRORS, *_CHANNEL_ERRORS, _ConsumerLost) as exc:
                    self.connected.clear()
                    self._generation += 1  # deliveries of the old channel can no longer be acked
                    log.warning("lost the broker connection (%s); reconnecting", _describe(exc))
        finally:
            self.connected.clear()
            self._work.put(None)
            worker.join(timeout=60)
            self._flush_settlements()
            self._close()

    def _flush_settlements(self) -> None:
        # The worker's last ack waits as a callback for the I/O loop, which has stopped: run it,
        # so that a clean stop after the lesson in hand does not leave that lesson to be redone
        # (replayed from the journal) after the restart.
        connection = self._connection
        if connection is not None and connection.is_open:
            with contextlib.suppress(*_CONNECTION_ERRORS, *_CHANNEL_ERRORS):
                connection.process_data_events(time_limit=0)

    def _consume_until_closed(self, stop: threading.Event) -> None:
        self._close()
        self._connection = connect(self._config, stop, until_stopped=self._connected_once)
        self._connected_once = True
        channel = self._connection.channel()
        channel.confirm_delivery()  # dead-letter publishes are confirmed before the ack
        self._declare(channel)
        channel.basic_qos(prefetch_count=self._config.prefetch, global_qos=self._shared_prefetch)
        for name in self._queues:
            try:
                channel.basic_consume(
                    name,
                    functools.partial(self._on_message, name),
                    auto_ack=False,
                    exclusive=self._exclusive,
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
        log.info("consuming %s", ", ".join(self._queues))
        next_tick = time.monotonic()
        while not stop.is_set():
            self._connection.process_data_events(time_limit=POLL_INTERVAL_S)
            _check_consuming(channel, len(self._queues))
            if self._on_tick is not None and time.monotonic() >= next_tick:
                next_tick = time.monotonic() + self._tick_interval_s
                self._on_tick()

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
        left_s = self._in_use_wait_s - (now - self._in_use_since)
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

    def _work_loop(self) -> None:
        done: list[tuple[Delivery, tuple[str, str]]] = []
        while (delivery := self._work.get()) is not None:
            if delivery.generation != self._generation:
                continue  # from a closed channel: the broker redelivers it
            if done and not self._dependencies_up():
                # Settle what is done before waiting out an outage, which may take minutes.
                self._schedule(functools.partial(self._settle_all, self._made_durable(done)))
                done = []
            started = time.monotonic()
            outcome = self._handle(delivery)
            if outcome is None:
                continue  # stopped, or the channel went away, while waiting: it is redelivered
            done.append((delivery, outcome))
            fast = time.monotonic() - started < SETTLE_BATCH_FAST_S
            if not (fast and len(done) < SETTLE_BATCH_MAX and not self._work.empty()):
                self._schedule(functools.partial(self._settle_all, self._made_durable(done)))
                done = []
        if done:
            self._schedule(functools.partial(self._settle_all, self._made_durable(done)))

    def _dependencies_up(self) -> bool:
        return all(dependency.up for dependency in self._pause_while)

    def _handle(self, delivery: Delivery) -> tuple[str, str] | None:
        """The handler's outcome, run once every dependency is up and again after an outage.

        None if ``stop`` was set, or the delivery's channel closed, while waiting: the delivery
        is then left unsettled and the broker hands it out again.
        """
        while True:
            for dependency in self._pause_while:
                if not dependency.wait_until_up(
                    self._stop, lambda: delivery.generation == self._generation
                ):
                    return None
            outcome = self._run_handler(delivery)
            if outcome[0] != "retry":
                return outcome

    def _requeue_after_backoff(self, delivery: Delivery, exc: Exception) -> tuple[str, str]:
        if self._requeue_delays is None:
            self._requeue_delays = backoff_delays(self._config.max_backoff_s)
        delay_s = next(self._requeue_delays)
        log.warning("message %s requeued in %.1f s: %s", delivery.message_id, delay_s, exc)
        self._stop.wait(delay_s)
        return ("requeue", str(exc))

    def _made_durable(
        self, done: list[tuple[Delivery, tuple[str, str]]]
    ) -> list[tuple[Delivery, tuple[str, str]]]:
        """Run ``before_settle`` (a commit); if it fails, requeue what was to be acked."""
        if self._before_settle is None:
            return done
        try:
            self._before_settle()
        except Exception as exc:
            log.exception("could not make a batch of %d messages durable; requeueing", len(done))
            requeue = ("requeue", f"could not make the work durable: {exc!r}")
            return [(d, requeue if outcome[0] == "ack" else outcome) for d, outcome in done]
        return done

    def _run_handler(self, delivery: Delivery) -> tuple[str, str]:
        if len(delivery.body) > MAX_MESSAGE_BYTES:
            # Refused before the handler sees it: an oversized body is never parsed at all.
            size = len(delivery.body)
            return ("dead", f"message is {size} bytes, over the {MAX_MESSAGE_BYTES}-byte limit")
        try:
            self._handler(delivery)
        except DecodeError as exc:
            return ("dead", str(exc))
        except (Requeue, BrokerError) as exc:
            return self._requeue_after_backoff(delivery, exc)
        except DependencyDown as exc:
            for dependency in self._pause_while:
                if dependency.is_outage(exc):
                    dependency.mark_down(exc)
                    return ("retry", str(exc))
            return self._requeue_after_backoff(delivery, exc)  # an outage nobody here probes
        except DistillSwarmError as exc:
            return self._poison_or_retry(delivery, exc)
        except Exception as exc:
            log.exception("handler failed on message %s", delivery.message_id)
            return self._poison_or_retry(delivery, exc)
        self._requeue_delays = None  # a success: the next requeue backs off from the start
        return ("ack", "")

    def _poison_or_retry(self, delivery: Delivery, exc: Exception) -> tuple[str, str]:
        reason = f"handler failed: {type(exc).__name__}: {exc}"
        return ("dead", reason) if delivery.redelivered else ("requeue", reason)

    def _schedule(self, callback: Callable[[], None]) -> None:
        connection = self._connection
        if connection is None:
            return
        # If the connection died meanwhile, the broker redelivers the message: nothing to do.
        with contextlib.suppress(*_CONNECTION_ERRORS):
            connection.add_callback_threadsafe(callback)

    def _settle_all(self, done: list[tuple[Delivery, tuple[str, str]]]) -> None:
        """Runs on the I/O thread: settle handled deliveries in the order they arrived.

        A run of consecutive acks goes out as one ``multiple`` ack of its last delivery tag.
        That acks nothing else: the one worker handles deliveries in tag order, so every earlier
        delivery of this channel was settled already (by an earlier batch or earlier in this
        one), and a requeue or dead-letter in between is sent, in order, before the next run.
        """
        channel = self._channel
        if channel is None or not channel.is_open:
            return  # the broker redelivers whatever was not settled
        last_ack: Delivery | None = None
        for delivery, outcome in done:
            if delivery.generation != self._generation:
                continue  # from a closed channel: the broker redelivers it
            if outcome[0] == "ack":
                last_ack = delivery
                continue
            if last_ack is not None:
                channel.basic_ack(last_ack.delivery_tag, multiple=True)
                last_ack = None
            self._settle(delivery, outcome)
        if last_ack is not None:
            channel.basic_ack(last_ack.delivery_tag, multiple=True)

    def _settle(self, delivery: Delivery, outcome: tuple[str, str]) -> None:
        """Runs on the I/O thread: ack, requeue or dead-letter one delivery."""
        channel = self._channel
        if channel is None or not channel.is_open or delivery.generation != self._generation:
            return
        action, reason = outcome
        if action == "ack":
            channel.basic_ack(delivery.delivery_tag)
        elif action == "requeue":
            channel.basic_nack(delivery.delivery_tag, requeue=True)
        else:
            self._dead_letter(channel, delivery, reason)

    def _dead_letter(self, channel: BlockingChannel, delivery: Delivery, reason: str) -> None:
        reason = one_line(reason)  # it may quote the message itself, or any exception's text
        log.warning(
            "dead-lettering message %s from %s: %s", delivery.message_id, delivery.queue, reason
        )
        headers = {
            **delivery.headers,
            REASON_HEADER: reason[:1000],
            ORIGIN_QUEUE_HEADER: delivery.queue,
        }
        try:
            channel.basic_publish(
                self._topology.dead_exchange,
                "",
                delivery.body,
                properties(delivery.message_id or "", headers),
            )
        except (pex.UnroutableError, pex.NackError):
            # Let RabbitMQ's own DLX take it (no reason header, but nothing is lost).
            channel.basic_nack(delivery.delivery_tag, requeue=False)
        else:
            channel.basic_ack(delivery.delivery_tag)
        # Either way the message was rejected, and the counters should say so.
        if self._on_dead_letter is not None:
            self._on_dead_letter(delivery, reason)


def purge(config: BrokerConfig, queue_name: str) -> int:
    """Empty a queue; returns how many messages were dropped."""
    connection = connect(config)
    try:
        result = connection.channel().queue_purge(queue_name)
        return int(result.method.message_count)
    finally:
        connection.close()
