"""TLS for amqps:// connections: one verifying ``ssl.SSLContext`` built from the broker config.

Verification is always on (certificate chain and hostname) and TLS 1.2 is the floor: a pupil
sends its credentials over this connection, often across networks its owner does not control.
There is deliberately no switch to turn verification off; a private CA is one config key away.
"""

from __future__ import annotations

import ssl

import pika

from shared.config import BrokerConfig
from shared.errors import ConfigError

MINIMUM_TLS_VERSION = ssl.TLSVersion.TLSv1_2


def tls_context(config: BrokerConfig) -> ssl.SSLContext:
    """A client context that verifies the broker against ``tls_ca_file`` (or the system CAs).

    Raises :class:`ConfigError` naming the field when a configured file cannot be loaded.
    """
    try:
        context = ssl.create_default_context(
            cafile=str(config.tls_ca_file) if config.tls_ca_file else None
        )
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"config field 'broker.tls_ca_file': cannot load {config.tls_ca_file}: {_reason(exc)}"
        ) from None
    context.minimum_version = MINIMUM_TLS_VERSION
    if config.tls_key_file and not config.tls_cert_file:
        raise ConfigError("config field 'broker.tls_key_file': set broker.tls_cert_file too")
    if config.tls_cert_file:
        try:
            context.load_cert_chain(
                str(config.tls_cert_file),
                str(config.tls_key_file) if config.tls_key_file else None,
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"config field 'broker.tls_cert_file': cannot load {config.tls_cert_file} "
                f"(key {config.tls_key_file}): {_reason(exc)}"
            ) from None
    return context


def ssl_options(config: BrokerConfig, host: str) -> pika.SSLOptions:
    """pika's TLS settings: our context, and the name the broker's certificate must carry."""
    return pika.SSLOptions(tls_context(config), config.tls_server_hostname or host)


def uses_tls_settings(config: BrokerConfig) -> bool:
    """True if any TLS key is set (they only make sense with an amqps:// URL)."""
    return any(
        value is not None
        for value in (
            config.tls_ca_file,
            config.tls_cert_file,
            config.tls_key_file,
            config.tls_server_hostname,
        )
    )


def _reason(exc: BaseException) -> str:
    # ssl errors carry (errno, text); keep the text on one line.
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return " ".join(text.split())
