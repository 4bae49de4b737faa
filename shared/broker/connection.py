"""Connections to RabbitMQ on pika: retries with capped backoff, URL redaction, properties.

A service's first connection gets ``broker.connect_attempts`` tries (fail fast on a wrong URL);
once it has been connected, a lost broker is waited for until the service stops
(docs/decisions.md, section 18). pika exceptions never leave this package: they become
:class:`shared.errors.BrokerError` kinds.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import ssl
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import pika
import pika.exceptions as pex
from pika.adapters.blocking_connection import BlockingConnection

from shared.config import BrokerConfig
from shared.errors import BrokerError, ConfigError, ConnectionClosed
from shared.tls import ssl_options, uses_tls_settings

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/json"
# OSError, not only ConnectionError: pika re-raises the last error of its connection workflow
# as it is, and for a host that does not resolve that is socket.gaierror. A Pi on WiFi loses DNS
# routinely; that is an unreachable broker like any other, never a crash.
CONNECTION_ERRORS = (pex.AMQPConnectionError, pex.ConnectionWrongStateError, OSError)
CHANNEL_ERRORS = (pex.AMQPChannelError, pex.ChannelWrongStateError)


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
        except CONNECTION_ERRORS as exc:
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


def purge(config: BrokerConfig, queue_name: str) -> int:
    """Empty a queue; returns how many messages were dropped."""
    connection = connect(config)
    try:
        result = connection.channel().queue_purge(queue_name)
        return int(result.method.message_count)
    finally:
        connection.close()
