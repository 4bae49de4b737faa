"""Passwords never reach a log line or an error message; TLS settings are checked before use.

No broker needed: a URL pointing at a port nobody listens on makes `connect()` fail the way an
unreachable broker does (the wrong-password and bad-certificate paths run against real brokers in
tests/integration/test_access.py and test_tls.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from distill_swarm.local_broker import free_port
from shared.broker import connect, redact
from shared.config import BrokerConfig
from shared.errors import BrokerError, ConfigError

SECRET = "s3cr3t-Pa55"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"amqp://pi-7:{SECRET}@broker:5672/swarm", "amqp://pi-7:***@broker:5672/swarm"),
        # percent-encoded: the text in the URL differs from the password a parser returns
        ("amqps://pi-7:p%40ss%2Fw0rd@broker/swarm", "amqps://pi-7:***@broker/swarm"),
        # a raw "@" inside the password: everything up to the last "@" goes
        ("amqp://pi-7:p@ss@broker:5672/", "amqp://pi-7:***@broker:5672/"),
        ("amqp://pi-7:@broker/", "amqp://pi-7:***@broker/"),
        ("amqp://broker:5672/%2F", "amqp://broker:5672/%2F"),  # nothing to hide
        ("amqp://pi-7@broker/", "amqp://pi-7@broker/"),
        ("not a url at all", "not a url at all"),
    ],
)
def test_redact_hides_the_password_and_keeps_the_rest(url: str, expected: str) -> None:
    assert redact(url) == expected


def test_an_unreachable_broker_error_and_logs_never_show_the_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"amqp://pi-7:{SECRET}@127.0.0.1:{free_port()}/swarm"
    caplog.set_level(logging.DEBUG)  # pika's own debug records included
    with pytest.raises(BrokerError) as info:
        connect(BrokerConfig(url=url, connect_attempts=2, max_backoff_s=0.05))
    message = str(info.value)
    assert "pi-7:***@127.0.0.1" in message and "\n" not in message
    assert SECRET not in message
    assert caplog.records, "expected the retry to be logged"
    assert all(SECRET not in record.getMessage() for record in caplog.records)


def test_a_bad_url_is_a_config_error_without_the_password() -> None:
    with pytest.raises(ConfigError) as info:
        connect(BrokerConfig(url=f"redis://pi-7:{SECRET}@broker/", connect_attempts=1))
    assert "broker.url" in str(info.value) and SECRET not in str(info.value)


def test_tls_settings_with_a_plain_url_are_refused() -> None:
    config = BrokerConfig(url=f"amqp://pi-7:{SECRET}@broker/", tls_ca_file=Path("/ca.pem"))
    with pytest.raises(ConfigError, match="not amqps://") as info:
        connect(config)
    assert SECRET not in str(info.value)


def test_a_missing_ca_file_names_the_field(tmp_path: Path) -> None:
    config = BrokerConfig(url="amqps://pi-7:pw@broker/", tls_ca_file=tmp_path / "nope.pem")
    with pytest.raises(ConfigError, match=r"broker\.tls_ca_file.*nope\.pem"):
        connect(config)


def test_a_client_key_without_its_certificate_is_refused(tmp_path: Path) -> None:
    config = BrokerConfig(url="amqps://pi-7:pw@broker/", tls_key_file=tmp_path / "k.pem")
    with pytest.raises(ConfigError, match=r"broker\.tls_cert_file"):
        connect(config)
