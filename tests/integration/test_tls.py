"""amqps end to end: a private RabbitMQ with a TLS listener and a throwaway CA made by openssl.

What a user would notice: lessons and reports travel over TLS (the broker itself says the
connections are TLS); a broker certificate that does not verify (wrong CA, wrong name) stops
the service at once with one line that names the URL and never the password; a client
certificate is sent when configured and checked by the broker.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Iterator
from dataclasses import astuple, dataclass
from pathlib import Path

import pytest
from pika.adapters.blocking_connection import BlockingChannel

from distill_swarm.local_broker import LocalBroker
from master.access import pupil_permissions
from shared.broker import Consumer, Delivery, Publisher, connect, redact
from shared.config import BrokerConfig, LessonsConfig, Settings
from shared.errors import BrokerError
from shared.jobs import OFFLOADABLE
from shared.messages import Embedding, Hello, Lesson, Report, decode, encode
from shared.topology import Topology
from tests.support.private_broker import require_rabbitmq_server, skip_or_fail, wait_for
from tests.support.tls import Certs, make_ca, make_certs, make_client_cert

pytestmark = pytest.mark.broker

USER, PASSWORD = "tls-user", "tls-secret-pw-42"


@dataclass
class TlsBroker:
    broker: LocalBroker
    certs: Certs
    directory: Path
    url: str  # amqps:// with USER's credentials

    def config(self, **tls: object) -> BrokerConfig:
        """Broker settings for this node; ``tls`` overrides the tls_* keys (CA by default)."""
        settings: dict[str, object] = {"tls_ca_file": self.certs.ca, **tls}
        return BrokerConfig.model_validate(
            {"url": self.url, "namespace": "tls", "connect_attempts": 3, "max_backoff_s": 0.2}
            | settings
        )


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    require_rabbitmq_server()
    if shutil.which("openssl") is None:
        skip_or_fail("the openssl command is not installed")
    directory = tmp_path_factory.mktemp("tls")
    certs = make_certs(directory)
    with LocalBroker(tls=(certs.ca, certs.server_cert, certs.server_key)) as broker:
        for args in (
            ("add_user", USER, PASSWORD),
            ("set_permissions", "-p", "/", USER, ".*", ".*", ".*"),
        ):
            result = broker.ctl(*args)
            assert result.returncode == 0, result.stderr
        assert broker.tls_port is not None
        url = f"amqps://{USER}:{PASSWORD}@127.0.0.1:{broker.tls_port}/%2F"
        yield TlsBroker(broker, certs, directory, url)


def lesson() -> Lesson:
    return Lesson(
        lesson_id="l-tls", task="t", prompt="p", goal_text="g", master_model="m",
        master_answer="an answer", reference=Embedding(model="e", dim=2, values=[0.6, 0.8]),
        split="eval",
    )  # fmt: skip


def tls_connections(broker: LocalBroker) -> list[list[str]]:
    """(user, ssl, protocol) of every open connection, as the broker reports them."""
    result = broker.ctl("list_connections", "user", "ssl", "ssl_protocol", "--quiet")
    assert result.returncode == 0, result.stderr
    rows = [line.split("\t") for line in result.stdout.splitlines() if line.strip()]
    return [row for row in rows if row and row[0] == USER]


def test_a_lesson_round_trips_over_amqps(tls_broker: TlsBroker) -> None:
    config = tls_broker.config()
    topology = Topology("tls", job_kinds=OFFLOADABLE)
    received: list[Lesson] = []

    def handler(delivery: Delivery) -> None:
        message = decode(delivery.body, Lesson)
        received.append(message)

    def declare(channel: BlockingChannel) -> None:
        topology.declare_all(channel, ("a",))

    publisher = Publisher(config, declare)
    consumer = Consumer(config, topology, [topology.pupil_queue("a")], handler, declare=declare)
    stop = threading.Event()
    thread = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_for(consumer.connected.is_set)
        sent = lesson()
        publisher.publish(topology.lessons_exchange, "", encode(sent), sent.lesson_id)
        wait_for(lambda: len(received) == 1)
        assert received == [sent]
        connections = tls_connections(tls_broker.broker)
        assert len(connections) == 2  # the publisher's and the consumer's
        assert all(
            ssl == "true" and protocol.startswith("tlsv1.") for _, ssl, protocol in connections
        )
    finally:
        stop.set()
        thread.join(timeout=10)
        publisher.close()


def test_a_broker_certificate_from_another_ca_is_refused_at_once(
    tls_broker: TlsBroker, caplog: pytest.LogCaptureFixture
) -> None:
    other_ca, _ = make_ca(tls_broker.directory, "other-ca")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(BrokerError) as info:
        connect(tls_broker.config(tls_ca_file=other_ca))
    message = str(info.value)
    assert "\n" not in message
    assert redact(tls_broker.url) in message  # names the URL, password as ***
    assert "certificate verify failed" in message
    assert PASSWORD not in message
    assert all(PASSWORD not in record.getMessage() for record in caplog.records)
    # Not retried: a certificate that does not verify will not verify on the next attempt.
    assert not [r for r in caplog.records if "cannot reach RabbitMQ" in r.getMessage()]


def test_a_broker_certificate_for_another_name_is_refused(tls_broker: TlsBroker) -> None:
    with pytest.raises(BrokerError, match="Hostname mismatch") as info:
        connect(tls_broker.config(tls_server_hostname="broker.example"))
    assert PASSWORD not in str(info.value)


def test_a_client_certificate_is_sent_and_checked_by_the_broker(tls_broker: TlsBroker) -> None:
    certs, directory = tls_broker.certs, tls_broker.directory
    cert, key = make_client_cert(directory, certs.ca, certs.ca_key, "pi-7")
    connection = connect(tls_broker.config(tls_cert_file=cert, tls_key_file=key))
    try:
        result = tls_broker.broker.ctl("list_connections", "peer_cert_subject", "--quiet")
        assert "CN=pi-7" in result.stdout
    finally:
        connection.close()
    # A client certificate the broker's CA did not sign is refused by the broker.
    rogue_ca, rogue_key = make_ca(directory, "rogue-ca")
    cert, key = make_client_cert(directory, rogue_ca, rogue_key, "rogue")
    rogue = tls_broker.config(tls_cert_file=cert, tls_key_file=key, connect_attempts=1)
    with pytest.raises(BrokerError):
        connect(rogue).close()


@pytest.mark.models
def test_a_pupil_service_with_its_own_user_learns_over_amqps(
    tls_broker: TlsBroker, tmp_path: Path
) -> None:
    """The deployment the docs describe: amqps, a per-node user, declare_exchanges = false."""
    from pupil_node.node import PupilNode
    from pupil_node.service import PupilService
    from shared.backends import build_embedder, build_generator

    # What a master with default settings declares: the job queues and the lesson stream.
    topology = Topology("tls", job_kinds=OFFLOADABLE, lessons=LessonsConfig())
    permissions = pupil_permissions(topology, "pi-7")
    broker = tls_broker.broker
    for args in (
        ("add_user", "pi-7", "pi-7-secret"),
        ("set_permissions", "-p", "/", "pi-7", *astuple(permissions)),
    ):
        assert broker.ctl(*args).returncode == 0
    master = tls_broker.config()
    connection = connect(master)
    try:
        topology.declare_master(connection.channel())
    finally:
        connection.close()
    settings = Settings.model_validate(
        {
            "broker": {
                "url": tls_broker.url.replace(f"{USER}:{PASSWORD}", "pi-7:pi-7-secret"),
                "namespace": "tls", "declare_exchanges": False, "tls_ca_file": tls_broker.certs.ca,
            },
            "pupil": {
                "node_id": "pi-7", "state_dir": tmp_path / "state", "metrics_port": 0,
                "generator": {"max_tokens": 8, "temperature": 0.8},
                "adapter": {"steps_per_lesson": 2, "batch_size": 2},
                "guidance": {"eval_methods": []},
            },
        }
    )  # fmt: skip
    embedder = build_embedder("embedded", "all-minilm-l6-v2")
    generator = build_generator("embedded", "gemma3-270m", n_threads=2)
    node = PupilNode("pi-7", settings.pupil, generator, embedder)
    stop = threading.Event()
    service = PupilService(settings, node, stop)
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    publisher = Publisher(master)
    try:
        hello = decode(wait_for_message(master, topology.control_queue), Hello)
        assert hello.node.node_id == "pi-7"
        answer = "Paris is the capital of France."
        sent = Lesson(
            lesson_id="l-pi", task="qa", prompt="Capital of France?", goal_text="Capital?",
            master_model="m", master_answer=answer, split="train",
            reference=Embedding.from_array(embedder.model_name, embedder.embed([answer])[0]),
        )  # fmt: skip
        publisher.publish(topology.lessons_exchange, "", encode(sent), sent.lesson_id)
        report = decode(wait_for_message(master, topology.reports_queue, 120.0), Report)
        assert (report.lesson_id, report.node_id, report.error) == ("l-pi", "pi-7", None)
    finally:
        stop.set()
        thread.join(timeout=30)
        publisher.close()


def wait_for_message(config: BrokerConfig, queue: str, timeout_s: float = 30.0) -> bytes:
    """The body of the next message on ``queue`` (acked), waiting up to ``timeout_s``."""
    bodies: list[bytes] = []

    def poll() -> bool:
        connection = connect(config)
        try:
            method, _props, body = connection.channel().basic_get(queue, auto_ack=True)
        finally:
            connection.close()
        if method is not None:
            bodies.append(body)
        return bool(bodies)

    wait_for(poll, timeout_s)
    return bodies[0]
