"""Reading a RabbitMQ stream over AMQP 0-9-1: offsets, and where a stream begins and ends.

A stream keeps its messages after they are acked; each consumer says where to start with the
``x-stream-offset`` consume argument ("first", "next", or a number) and every delivery carries its
offset in the header of the same name. Acks are flow control only (with the prefetch, they open
the window); nack and reject are not implemented for streams: RabbitMQ closes the *connection*
(540 NOT_IMPLEMENTED) — and pika rejects the deliveries it holds unseen when a consumer is
cancelled, so a stream consumer is only ever stopped by closing its connection.

Offsets count messages plus a little of the stream's own bookkeeping: they grow by one per
message with an occasional gap, so a difference of offsets is an upper bound of a count of
lessons (docs/stream.md).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import pika.exceptions as pex

from shared.broker.connection import CHANNEL_ERRORS, CONNECTION_ERRORS, close_quietly, connect
from shared.config import BrokerConfig
from shared.errors import BrokerError

OFFSET_HEADER = "x-stream-offset"
FIRST = "first"
# A probe takes the deliveries of the stream's last chunk to find its last offset: up to this
# many (a chunk holds the messages the broker wrote together; a master publishing one lesson at
# a time writes chunks of one).
LAST_CHUNK_PREFETCH = 2_000
# How long a probe waits for a stream's first or last chunk, and for the deliveries to stop.
PROBE_TIMEOUT_S = 1.5
PROBE_QUIET_S = 0.2


@dataclass(frozen=True)
class StreamBounds:
    """The first retained and the last written offset of a stream; both None while it is empty."""

    first: int | None
    last: int | None


def delivery_offset(headers: dict[str, Any]) -> int | None:
    """The stream offset a delivery's headers carry, or None (not from a stream)."""
    value = headers.get(OFFSET_HEADER)
    return int(value) if isinstance(value, int) else None


def stream_bounds(
    config: BrokerConfig, stream: str, timeout_s: float = PROBE_TIMEOUT_S
) -> StreamBounds:
    """Ask the broker where ``stream`` begins (retention) and ends (its head), on a connection
    of its own.

    RabbitMQ 3.x tells an AMQP 0-9-1 client neither (a stream's queue.declare-ok counts 0
    messages), so the probe attaches two short-lived consumers: one at "first" taking one
    delivery, one at "last" taking the deliveries of the last chunk. Raises BrokerError when the
    broker cannot be reached or refuses.
    """
    connection = connect(config.model_copy(update={"connect_attempts": 1}))
    try:
        channel = connection.channel()
        first = _offsets(connection, channel, stream, FIRST, 1, timeout_s)
        last = _offsets(connection, channel, stream, "last", LAST_CHUNK_PREFETCH, timeout_s)
    except pex.ChannelClosedByBroker as exc:
        raise BrokerError(f"cannot read the stream '{stream}': {exc.reply_text}") from None
    except (*CONNECTION_ERRORS, *CHANNEL_ERRORS) as exc:
        raise BrokerError(f"lost the broker while probing the stream '{stream}': {exc!r}") from None
    finally:
        close_quietly(connection)
    return StreamBounds(min(first, default=None), max(last, default=None))


def _offsets(
    connection: Any, channel: Any, stream: str, start: str, prefetch: int, timeout_s: float
) -> list[int]:
    """The offsets one consumer starting at ``start`` gets until deliveries stop."""
    offsets: list[int] = []

    def on_message(ch: Any, method: Any, props: Any, _body: bytes) -> None:
        offset = delivery_offset(dict(props.headers or {}))
        if offset is not None:
            offsets.append(offset)
        if prefetch > 1:
            ch.basic_ack(method.delivery_tag)  # keep the window open to the chunk's end

    channel.basic_qos(prefetch_count=prefetch)
    tag = channel.basic_consume(stream, on_message, arguments={OFFSET_HEADER: start})
    deadline = time.monotonic() + timeout_s
    seen, quiet_since = 0, time.monotonic()
    while time.monotonic() < deadline:
        connection.process_data_events(time_limit=0.05)
        if len(offsets) != seen:
            seen, quiet_since = len(offsets), time.monotonic()
        elif offsets and (prefetch == 1 or time.monotonic() - quiet_since > PROBE_QUIET_S):
            break
    # Nothing is held unseen once the deliveries stopped, so the cancel rejects nothing.
    with contextlib.suppress(*CHANNEL_ERRORS):
        channel.basic_cancel(tag)
    return offsets
