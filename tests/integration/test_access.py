"""Per-node users over the wire: a node can do its job and nothing that hurts the swarm.

A private RabbitMQ with the management plugin; the master (an admin) declares the topology;
`distill-swarm node add` creates `node-a` and `node-b` as a real subprocess. Every refusal below
is RabbitMQ's own ACCESS_REFUSED (reply code 403) for the permissions `node add` set.
"""

from __future__ import annotations

import functools
import logging
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pika
import pika.exceptions as pex
import pytest
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from distill_swarm.local_broker import LocalBroker
from master.access import PUPIL_TAG, ManagementAPI, add_node, pupil_permissions, remove_node
from master.identity import check_identity
from shared.broker import Consumer, Delivery, Publisher, connect
from shared.config import BrokerConfig
from shared.errors import BrokerError, DecodeError
from shared.jobs import OFFLOADABLE
from shared.messages import (
    MAX_MESSAGE_BYTES,
    Embedding,
    Heartbeat,
    JobResult,
    Lesson,
    NodeInfo,
    Report,
    Teach,
    decode,
    encode,
)
from shared.topology import ORIGIN_QUEUE_HEADER, REASON_HEADER, Topology
from tests.support.private_broker import add_admin, require_rabbitmq_server, wait_for

pytestmark = pytest.mark.broker

VHOST = "swarm"
ADMIN, ADMIN_PASSWORD = "admin", "admin-secret-7f3a"
NODE_A_PASSWORD = "node-a-secret-91c2"
TOPOLOGY = Topology("swarm", job_kinds=OFFLOADABLE)
ACCESS_REFUSED, NOT_FOUND = 403, 404


@dataclass
class Swarm:
    broker: LocalBroker
    api: ManagementAPI
    admin_url: str
    node_urls: dict[str, str]

    def config(self, node: str, declare_exchanges: bool = False) -> BrokerConfig:
        """A node's broker settings, as its operator would write them."""
        return BrokerConfig(
            url=self.node_urls[node],
            declare_exchanges=declare_exchanges,
            connect_attempts=2,
            max_backoff_s=0.2,
        )

    def admin(self) -> BrokerConfig:
        return BrokerConfig(url=self.admin_url, connect_attempts=2, max_backoff_s=0.2)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "distill_swarm", "node", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def node_add(broker: LocalBroker, name: str, *extra: str) -> tuple[str, str]:
    """Run `distill-swarm node add`; returns (AMQP URL it printed, whole stdout)."""
    assert broker.management_url is not None
    result = cli(
        "add", name, "--admin-url", broker.management_url, "--admin-user", ADMIN,
        "--admin-password", ADMIN_PASSWORD, "--broker-url", f"amqp://127.0.0.1:{broker.port}",
        *extra,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    urls = [line for line in result.stdout.splitlines() if line.startswith("AMQP_URL=")]
    assert len(urls) == 1, result.stdout
    return urls[0].removeprefix("AMQP_URL="), result.stdout


@pytest.fixture(scope="module")
def swarm() -> Iterator[Swarm]:
    require_rabbitmq_server("rabbitmq_management")
    with LocalBroker(management=True) as broker:
        add_admin(broker, VHOST, ADMIN, ADMIN_PASSWORD)
        admin_url = f"amqp://{ADMIN}:{ADMIN_PASSWORD}@127.0.0.1:{broker.port}/{VHOST}"
        connection = connect(BrokerConfig(url=admin_url))
        try:
            TOPOLOGY.declare_master(connection.channel())  # the master declares everything
        finally:
            connection.close()
        url_a, _ = node_add(broker, "node-a", "--password", NODE_A_PASSWORD)
        url_b, _ = node_add(broker, "node-b")  # generated password
        assert broker.management_url is not None
        api = ManagementAPI(broker.management_url, ADMIN, ADMIN_PASSWORD)
        swarm = Swarm(broker, api, admin_url, {"node-a": url_a, "node-b": url_b})
        # node-b sets up its own queue, as its pupil service would.
        with channel_of(swarm.config("node-b")) as channel:
            TOPOLOGY.declare_pupil(channel, "node-b", declare_exchanges=False)
        yield swarm


class channel_of:
    """``with channel_of(config) as channel``: one connection and channel, closed afterwards."""

    def __init__(self, config: BrokerConfig, confirm: bool = False) -> None:
        self.connection: BlockingConnection = connect(config)
        self.confirm = confirm

    def __enter__(self) -> BlockingChannel:
        channel = self.connection.channel()
        if self.confirm:
            channel.confirm_delivery()
        return channel

    def __exit__(self, *exc: object) -> None:
        if self.connection.is_open:
            self.connection.close()


def refused(config: BrokerConfig, operation: Callable[[BlockingChannel], object]) -> int:
    """Run ``operation`` on a fresh channel; returns the reply code the broker closed it with."""
    with channel_of(config, confirm=True) as channel:
        with pytest.raises(pex.ChannelClosedByBroker) as info:
            operation(channel)
        return int(info.value.reply_code)


def op(method: str, *args: object, **kwargs: object) -> Callable[[BlockingChannel], object]:
    """``op("basic_get", queue)`` calls ``channel.basic_get(queue)`` on the channel it is given."""
    return lambda channel: getattr(channel, method)(*args, **kwargs)


def lesson(lesson_id: str) -> Lesson:
    return Lesson(
        lesson_id=lesson_id, task="t", prompt="p", goal_text="g", master_model="m",
        master_answer="a", reference=Embedding(model="e", dim=2, values=[1.0, 0.0]),
        split="train",
    )  # fmt: skip


def get_one(config: BrokerConfig, queue: str, timeout_s: float = 20.0) -> tuple[bytes, dict]:
    """Wait for one message on ``queue`` (read as the master) and return body and headers."""
    got: list[tuple[bytes, dict]] = []

    def poll() -> bool:
        with channel_of(config) as channel:
            method, props, body = channel.basic_get(queue, auto_ack=True)
            if method is not None:
                got.append((body, dict(props.headers or {})))
        return bool(got)

    wait_for(poll, timeout_s)
    return got[0]


def run_consumer(
    swarm: Swarm, node: str, handler: Callable[[Delivery], None]
) -> Callable[[], None]:
    """Start ``node``'s consumer as its pupil service would; returns a function that stops it."""
    config = swarm.config(node)
    declare = functools.partial(TOPOLOGY.declare_pupil, node_id=node, declare_exchanges=False)
    consumer = Consumer(config, TOPOLOGY, [TOPOLOGY.pupil_queue(node)], handler, declare=declare)
    stop = threading.Event()
    thread = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
    thread.start()
    wait_for(consumer.connected.is_set)

    def stop_it() -> None:
        stop.set()
        thread.join(timeout=10)

    return stop_it


def test_node_add_grants_exactly_the_documented_permissions(swarm: Swarm) -> None:
    for node in ("node-a", "node-b"):
        result = swarm.broker.ctl("list_user_permissions", node)
        assert result.returncode == 0, result.stderr
        expected = pupil_permissions(TOPOLOGY, node)
        row = [line.split("\t") for line in result.stdout.splitlines() if line.startswith(VHOST)]
        assert row == [[VHOST, expected.configure, expected.write, expected.read]]
        user = swarm.api.get_user(node)
        assert user is not None and PUPIL_TAG in str(user["tags"])
    # The generated password is long and random, and the URL names the swarm's vhost.
    password_b = urllib.parse.urlsplit(swarm.node_urls["node-b"]).password
    assert password_b is not None and len(password_b) >= 32
    assert swarm.node_urls["node-b"].endswith("/swarm")


def test_a_node_learns_and_reports_without_rights_on_shared_exchanges(swarm: Swarm) -> None:
    handled: list[str] = []

    def handler(delivery: Delivery) -> None:
        message = decode(delivery.body, Lesson)
        handled.append(message.lesson_id)

    stop = run_consumer(swarm, "node-a", handler)  # declares + binds its queue passively
    master = Publisher(swarm.admin())
    node = Publisher(swarm.config("node-a"))
    try:
        master.publish(TOPOLOGY.lessons_exchange, "", encode(lesson("l-access")), "l-access")
        wait_for(lambda: handled == ["l-access"])
        report = Report(lesson_id="l-access", node_id="node-a", split="train", pupil_model="p")
        node.publish(TOPOLOGY.reports_exchange, TOPOLOGY.REPORT_KEY, encode(report), "r1")
        info = NodeInfo(
            node_id="node-a", software_version="0", pupil_model="p",
            embedding_model="e", embedding_dim=2,
        )  # fmt: skip
        beat = Heartbeat(node=info)
        key = TOPOLOGY.control_key("heartbeat", "node-a")
        node.publish(TOPOLOGY.control_exchange, key, encode(beat), beat.message_id)
    finally:
        stop()
        master.close()
        node.close()
    body, _ = get_one(swarm.admin(), TOPOLOGY.reports_queue)
    assert decode(body, Report) == report
    body, _ = get_one(swarm.admin(), TOPOLOGY.control_queue)
    assert decode(body, Heartbeat) == beat


def test_a_node_cannot_speak_for_another_node(swarm: Swarm) -> None:
    report = Report(lesson_id="l-who", node_id="node-b", split="eval", pupil_model="p")
    body = encode(report)
    # Forging the broker-validated sender is refused by RabbitMQ itself...
    forged = pika.BasicProperties(user_id="node-b", delivery_mode=2)
    publish = op("basic_publish", TOPOLOGY.reports_exchange, TOPOLOGY.REPORT_KEY, body, forged)
    assert refused(swarm.config("node-a"), publish) == 406  # PRECONDITION_FAILED
    # ...so a report naming node-b but sent by node-a carries user_id node-a, and the master
    # (with master.verify_node_identity) dead-letters it, while node-b's own reports pass.
    for sender in ("node-a", "node-b"):
        node = Publisher(swarm.config(sender))
        try:
            node.publish(TOPOLOGY.reports_exchange, TOPOLOGY.REPORT_KEY, body, f"r-{sender}")
        finally:
            node.close()
        with channel_of(swarm.admin()) as channel:
            wait_for(lambda: channel.queue_declare(TOPOLOGY.reports_queue, passive=True)
                     .method.message_count > 0)  # fmt: skip
            _, props, got = channel.basic_get(TOPOLOGY.reports_queue, auto_ack=True)
        assert props.user_id == sender and decode(got, Report) == report
        if sender == "node-a":
            with pytest.raises(DecodeError, match="claims node 'node-b' but was published by"):
                check_identity(report.node_id, props.user_id)
        else:
            check_identity(report.node_id, props.user_id)


def test_declaring_exchanges_as_a_node_fails_once_with_what_to_do(swarm: Swarm) -> None:
    config = swarm.config("node-a", declare_exchanges=True)
    with channel_of(config) as channel, pytest.raises(BrokerError) as info:
        TOPOLOGY.declare_pupil(channel, "node-a", declare_exchanges=True)
    assert "ACCESS_REFUSED" in str(info.value)
    assert "declare_exchanges = false" in str(info.value)


def test_a_node_cannot_touch_another_nodes_queue(swarm: Swarm) -> None:
    config, other = swarm.config("node-a"), TOPOLOGY.pupil_queue("node-b")
    assert refused(config, op("basic_get", other)) == ACCESS_REFUSED
    assert refused(config, op("basic_consume", other, lambda *args: None)) == ACCESS_REFUSED
    assert refused(config, op("queue_purge", other)) == ACCESS_REFUSED
    assert refused(config, op("queue_delete", other)) == ACCESS_REFUSED
    # Nor can it (re)declare node-b's queue, e.g. with other arguments.
    assert refused(config, op("queue_declare", other, durable=True)) == ACCESS_REFUSED


def test_a_node_cannot_publish_lessons(swarm: Swarm) -> None:
    def publish(channel: BlockingChannel) -> None:
        channel.basic_publish(TOPOLOGY.lessons_exchange, "", encode(lesson("forged")))

    # With publisher confirms the broker closes the channel instead of dropping it silently.
    assert refused(swarm.config("node-a"), publish) == ACCESS_REFUSED


def test_a_node_cannot_delete_or_redeclare_shared_exchanges(swarm: Swarm) -> None:
    config = swarm.config("node-a")
    for exchange, kind in (
        (TOPOLOGY.lessons_exchange, "fanout"),
        (TOPOLOGY.reports_exchange, "direct"),
        (TOPOLOGY.control_exchange, "topic"),
        (TOPOLOGY.dead_exchange, "fanout"),
    ):
        assert refused(config, op("exchange_delete", exchange)) == ACCESS_REFUSED
        redeclare = op("exchange_declare", exchange, kind, durable=True)
        assert refused(config, redeclare) == ACCESS_REFUSED
    with channel_of(swarm.admin()) as channel:  # all still there
        for exchange in (TOPOLOGY.lessons_exchange, TOPOLOGY.reports_exchange):
            channel.exchange_declare(exchange, passive=True)


def test_a_node_takes_jobs_and_returns_results_but_cannot_submit_or_redeclare(
    swarm: Swarm,
) -> None:
    config, queue = swarm.config("node-a"), TOPOLOGY.job_queue("summarisation")
    with channel_of(swarm.admin(), confirm=True) as channel:
        channel.basic_publish(TOPOLOGY.jobs_exchange, "summarisation", b"job-1")
    with channel_of(config) as channel:
        TOPOLOGY.check_job_queues(channel, ("summarisation",))  # passive: no permission needed
        wait_for(lambda: channel.basic_get(queue, auto_ack=True)[2] == b"job-1")
    result = JobResult(job_id="job-1", job_kind="summarisation", answered_by="node-a", output="x")
    node = Publisher(config)
    try:
        node.publish(TOPOLOGY.reports_exchange, TOPOLOGY.JOB_RESULT_KEY, encode(result), "jr-1")
    finally:
        node.close()
    body, _ = get_one(swarm.admin(), TOPOLOGY.job_results_queue)
    assert decode(body, JobResult) == result
    # A node may not submit jobs, redeclare or delete a job queue, or read the master's jobs.
    submit = op("basic_publish", TOPOLOGY.jobs_exchange, TOPOLOGY.SUBMIT_KEY, b"{}")
    assert refused(config, submit) == ACCESS_REFUSED
    assert refused(config, op("queue_declare", queue, durable=True)) == ACCESS_REFUSED
    assert refused(config, op("queue_delete", queue)) == ACCESS_REFUSED
    for master_queue in (TOPOLOGY.job_submissions_queue, TOPOLOGY.job_results_queue):
        assert refused(config, op("basic_get", master_queue)) == ACCESS_REFUSED


def test_a_node_cannot_teach_nor_read_teach_requests(swarm: Swarm) -> None:
    forged = Teach(prompt_id="forged", goal_text="Agree with whatever the user says")

    def teach(channel: BlockingChannel) -> None:
        channel.basic_publish(TOPOLOGY.teach_exchange, TOPOLOGY.TEACH_KEY, encode(forged))

    config = swarm.config("node-a")
    assert refused(config, teach) == ACCESS_REFUSED
    assert refused(config, op("basic_get", TOPOLOGY.teach_queue)) == ACCESS_REFUSED
    assert refused(config, op("queue_purge", TOPOLOGY.teach_queue)) == ACCESS_REFUSED


def test_a_node_cannot_read_or_delete_the_masters_queues(swarm: Swarm) -> None:
    config = swarm.config("node-a")
    for queue in (TOPOLOGY.reports_queue, TOPOLOGY.control_queue, TOPOLOGY.dead_queue):
        assert refused(config, op("basic_get", queue)) == ACCESS_REFUSED
        assert refused(config, op("queue_purge", queue)) == ACCESS_REFUSED
        assert refused(config, op("queue_delete", queue)) == ACCESS_REFUSED


def test_a_node_dead_letters_an_oversized_body_without_parsing_it(swarm: Swarm) -> None:
    seen: list[Delivery] = []
    stop = run_consumer(swarm, "node-a", seen.append)
    master = Publisher(swarm.admin())
    body = b"{" + b" " * MAX_MESSAGE_BYTES + b"}"  # over the limit, and not even a lesson
    try:
        master.publish(TOPOLOGY.lessons_exchange, "", body, "too-big")
        dead_body, headers = get_one(swarm.admin(), TOPOLOGY.dead_queue)
    finally:
        stop()
        master.close()
    assert dead_body == body
    assert "limit" in str(headers[REASON_HEADER])
    assert str(MAX_MESSAGE_BYTES) in str(headers[REASON_HEADER])
    assert headers[ORIGIN_QUEUE_HEADER] == TOPOLOGY.pupil_queue("node-a")
    assert seen == []  # the handler never saw it


def test_a_wrong_password_is_refused_without_showing_it(
    swarm: Swarm, caplog: pytest.LogCaptureFixture
) -> None:
    url = swarm.node_urls["node-a"].replace(NODE_A_PASSWORD, "not-the-password-55")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(BrokerError) as info:
        connect(BrokerConfig(url=url, connect_attempts=3, max_backoff_s=0.2))
    message = str(info.value)
    assert "refused the credentials" in message and "node-a:***@" in message
    assert "not-the-password-55" not in message
    assert all("not-the-password-55" not in record.getMessage() for record in caplog.records)


def test_node_add_can_hand_the_password_over_in_a_file_for_the_installer(
    swarm: Swarm, tmp_path: Path
) -> None:
    assert swarm.broker.management_url is not None
    admin = ["--admin-url", swarm.broker.management_url, "--admin-user", ADMIN,
             "--admin-password", ADMIN_PASSWORD,
             "--broker-url", f"amqp://127.0.0.1:{swarm.broker.port}"]  # fmt: skip
    secret_file = tmp_path / "node-c.password"
    result = cli("add", "node-c", "--password-file", str(secret_file), *admin)
    assert result.returncode == 0, result.stderr
    password = secret_file.read_text().strip()
    assert len(password) >= 32 and password not in result.stdout  # never printed
    assert secret_file.stat().st_mode & 0o777 == 0o600
    # The installer's command line, with the flags install.sh takes.
    (command,) = [line for line in result.stdout.splitlines() if "install.sh" in line]
    assert f"--broker-url amqp://127.0.0.1:{swarm.broker.port}/swarm" in command
    assert "--node-id node-c --user node-c --password-file /root/node-c.password" in command
    assert "DISTILL_SWARM__BROKER__DECLARE_EXCHANGES=false" in command
    url = f"amqp://node-c:{password}@127.0.0.1:{swarm.broker.port}/swarm"
    with channel_of(BrokerConfig(url=url, connect_attempts=2)) as channel:
        assert channel.is_open  # the written password is the user's
    # An existing file is refused before anything is created.
    again = cli("add", "node-d", "--password-file", str(secret_file), *admin)
    assert again.returncode == 2 and "give a new file" in again.stderr
    assert swarm.api.get_user("node-d") is None
    assert swarm.api.get_user("node-c") is not None
    remove_node(swarm.api, TOPOLOGY, VHOST, "node-c")


def test_add_refuses_an_existing_user_and_remove_refuses_users_it_did_not_make(
    swarm: Swarm,
) -> None:
    with pytest.raises(BrokerError, match="already exists"):
        add_node(swarm.api, TOPOLOGY, VHOST, "node-b", "another-password")
    with pytest.raises(BrokerError, match="not made by"):
        remove_node(swarm.api, TOPOLOGY, VHOST, ADMIN)
    assert swarm.api.get_user(ADMIN) is not None
    with channel_of(swarm.config("node-b")) as channel:  # node-b's password did not change
        assert channel.is_open


def test_node_remove_ends_the_nodes_access(swarm: Swarm) -> None:
    assert swarm.broker.management_url is not None
    open_connection = connect(swarm.config("node-a"))
    result = cli(
        "remove", "node-a", "--admin-url", swarm.broker.management_url,
        "--admin-user", ADMIN, "--admin-password", ADMIN_PASSWORD,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "queue 'swarm.pupil.node-a' deleted" in result.stdout
    # RabbitMQ closes a deleted user's connections; its next login fails.
    with pytest.raises(pex.ConnectionClosedByBroker):
        for _ in range(50):
            open_connection.process_data_events(0.1)
    with pytest.raises(BrokerError, match="refused the credentials"):
        connect(swarm.config("node-a"))
    queue_a = TOPOLOGY.pupil_queue("node-a")
    assert refused(swarm.admin(), op("queue_declare", queue_a, passive=True)) == NOT_FOUND
