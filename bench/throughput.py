"""Benchmark: the framework's broker path against plain pika doing the same thing, same run.

Two patterns, each run by the framework and by a plain pika script with the same durability:
persistent messages, durable queues of the same types (classic pupil queues bound to a fanout,
a quorum reports queue), mandatory publishes, publisher confirms, manual acks.

1. **Fan-out**: the master publishes L lessons to the lessons fanout, on each transport:
   ``queues`` (today's per-node queues: the fanout copies each lesson into N pupil queues) and
   ``stream`` (one stream queue, ``x-queue-type: stream``, bound to the fanout, as issue 14's
   lesson stream; declared by this bench itself). Nobody consumes meanwhile. Rate: lessons/s.
   Confirms: the baseline is raw pika with up to 100 unconfirmed messages in flight (pika's
   ``SelectConnection``), RabbitMQ's recommended pattern for throughput; the framework's master
   publishes the same way (``WindowedPublisher``, ``master.publish_window`` = 100), marking a
   lesson published only once its own confirm is in. Target (issue 14): >= 80 % of it.
   - framework: ``MasterService.publish_lessons`` with the fast backend: render the prompt,
     answer (echo), embed (hashing), store the lesson in SQLite, publish with a window of
     confirms, mark it published on its confirm. A second framework row publishes the same,
     already encoded lessons through ``WindowedPublisher`` alone (the broker wrapper's share),
     and a third through the confirm-each ``Publisher`` (what the master did before).
   - raw, for context: ``basic_publish`` on a ``BlockingChannel`` in confirm mode, one confirm
     per publish (the earlier baseline).
2. **Ingest**: the reports queue holds R reports (queued up front, 20,000 by default, from
   (lesson, node) pairs all distinct so each is a new row); the master consumes them
   with manual acks, raw and framework at the same prefetch (default: the master's own window,
   ``master.prefetch``). Rate: reports/s from first delivery to last.
   - framework: ``MasterService.handle`` behind ``shared.broker.Consumer`` (an I/O thread and a
     worker thread; a fast handler's acks go back to the I/O thread together, as one
     multiple-ack): decode and validate, store in SQLite, metrics.
   - raw: a ``basic_consume`` callback that acks each message (and does nothing else); the
     target is judged against this one.
   - raw + store: the same callback, plus what any master must do with a report: ``json.loads``
     and one SQLite ``INSERT`` per report (its own transaction, WAL, ``synchronous=NORMAL``, as
     the master's store), then the ack. Printed for context: it shows how much of the gap is
     the framework and how much is storing reports at all.

Fan-out times run from opening the connection to the last confirm, for every row (the
framework's publisher connects on its first publish). Ingest times run from the first delivery
handled to the last. Each pattern runs ``--rounds`` times, alternating raw and framework; the
table shows the median round. Targets: fan-out >= 80 % of windowed raw pika (issue 14), ingest
>= 50 % of raw pika (issue 6).

    .venv/bin/python bench/throughput.py [--nodes 10] [--lessons 2000] [--reports 20000]
        [--prefetch 100] [--rounds 3] [--transports queues,stream]
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika
from fast_backend import EchoGenerator, HashingEmbedder
from harness import (
    AMQP_URL,
    bench_namespace,
    broker_config,
    format_table,
    make_lessons,
    throwaway_topology,
)
from pika.adapters.blocking_connection import BlockingChannel

from master.prompts import PromptItem
from master.service import MasterService
from master.store import Store
from shared.broker import (
    Consumer,
    Delivery,
    Publisher,
    Settlement,
    WindowedPublisher,
    broker_user,
)
from shared.config import BrokerConfig, MasterConfig, Settings
from shared.messages import Lesson, Report, Timings, encode
from shared.topology import Topology

TARGET_SHARE = 0.5  # ingest (issue 6)
FAN_OUT_TARGET_SHARE = 0.8  # fan-out against windowed raw pika (issue 14)
CONFIRM_WINDOW = 100
TRANSPORTS = ("queues", "stream")
DIM = 384
CONTENT_TYPE = "application/json"


@dataclass
class Rate:
    """One measured run: how many messages in how many seconds."""

    messages: int
    seconds: float

    @property
    def per_s(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else float("nan")


# -- the framework -----------------------------------------------------------------------


def framework_fan_out(settings: Settings, prompts: list[PromptItem], workdir: Path) -> Rate:
    """The master's real publishing loop over ``prompts`` (fast backend, fresh store)."""
    store = Store(workdir / f"master-{time.monotonic_ns()}.sqlite3")
    service = MasterService(settings, EchoGenerator(), HashingEmbedder(DIM), store, prompts)
    started = time.perf_counter()
    service.publish_lessons()
    seconds = time.perf_counter() - started
    store.close()
    return Rate(len(prompts), seconds)


def windowed_fan_out(config: BrokerConfig, topology: Topology, bodies: list[bytes]) -> Rate:
    """Already encoded lessons through the framework's ``WindowedPublisher`` alone."""
    started = time.perf_counter()
    publisher = WindowedPublisher(config, topology.declare_master, window=CONFIRM_WINDOW)
    confirmed = [0]

    def done() -> None:
        confirmed[0] += 1

    for index, body in enumerate(bodies):
        publisher.publish(topology.lessons_exchange, "", body, f"lesson-{index}", done)
    publisher.flush()
    seconds = time.perf_counter() - started
    publisher.close()
    if confirmed[0] != len(bodies):
        raise RuntimeError(f"{confirmed[0]} of {len(bodies)} confirmed")
    return Rate(len(bodies), seconds)


def publisher_fan_out(config: BrokerConfig, topology: Topology, bodies: list[bytes]) -> Rate:
    """Already encoded lessons through the framework's confirming ``Publisher`` alone."""
    started = time.perf_counter()
    publisher = Publisher(config, topology.declare_master)  # connects on the first publish
    for index, body in enumerate(bodies):
        publisher.publish(topology.lessons_exchange, "", body, f"lesson-{index}")
    seconds = time.perf_counter() - started
    publisher.close()
    return Rate(len(bodies), seconds)


def framework_ingest(
    settings: Settings, topology: Topology, expected: int, workdir: Path, lessons: list[Lesson]
) -> Rate:
    """The master's consumer and ``handle`` draining ``expected`` queued reports into a store."""
    store = Store(workdir / f"ingest-{time.monotonic_ns()}.sqlite3")
    # The master refuses reports for lessons it never made: give it the lessons, as publishing
    # them would have.
    for seq, lesson in enumerate(lessons):
        store.save_lesson(lesson, f"p{seq}", seq)
    service = MasterService(settings, EchoGenerator(), HashingEmbedder(DIM), store, [])
    stop = threading.Event()
    counter = _Counter(expected, stop)

    def handle(delivery: Delivery) -> Settlement:
        counter.started()
        settlement = service.handle(delivery)  # its ack carries the batch's commit
        counter.finished()
        return settlement

    consumer = Consumer(
        settings.master_consumer_broker(),  # what MasterService.run consumes with
        topology,
        [topology.reports_queue, topology.control_queue],
        handle,
        declare=topology.declare_master,
    )
    consumer.run(stop)
    stored = store.report_count()
    store.close()
    if stored != expected:
        raise RuntimeError(f"the master stored {stored} reports, expected {expected}")
    return counter.rate()


class _Counter:
    """Counts handled messages; sets ``stop`` after the last; times first start to last end."""

    def __init__(self, expected: int, stop: threading.Event) -> None:
        self.expected = expected
        self.stop = stop
        self.count = 0
        self.first = 0.0
        self.last = 0.0

    def started(self) -> None:
        if self.count == 0:
            self.first = time.perf_counter()

    def finished(self) -> None:
        self.count += 1
        if self.count == self.expected:
            self.last = time.perf_counter()
            self.stop.set()

    def rate(self) -> Rate:
        return Rate(self.count, self.last - self.first)


# -- plain pika --------------------------------------------------------------------------


def stream_name(namespace: str) -> str:
    """The bench's lesson stream (not ``<ns>.lessons``, which the master may declare itself)."""
    return f"{namespace}.bench-stream"


def reset_stream(url: str, name: str, exchange: str) -> None:
    """(Re)declare an empty stream queue bound to ``exchange``: streams cannot be purged."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.queue_delete(name)
    channel.queue_declare(name, durable=True, arguments={"x-queue-type": "stream"})
    channel.queue_bind(name, exchange)
    connection.close()


def delete_queue(url: str, name: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    connection.channel().queue_delete(name)
    connection.close()


class RawTopology:
    """The same exchanges and queues, declared with plain pika under another namespace."""

    def __init__(self, namespace: str, nodes: int) -> None:
        self.lessons = f"{namespace}.lessons"
        self.reports = f"{namespace}.reports"
        self.dead = f"{namespace}.dead"
        self.reports_queue = f"{namespace}.master.reports"
        self.pupil_queues = [f"{namespace}.pupil.n{i}" for i in range(nodes)]
        self.stream = stream_name(namespace)

    def declare(self, channel: BlockingChannel) -> None:
        channel.exchange_declare(self.lessons, exchange_type="fanout", durable=True)
        channel.exchange_declare(self.reports, exchange_type="direct", durable=True)
        channel.exchange_declare(self.dead, exchange_type="fanout", durable=True)
        dlx = {"x-dead-letter-exchange": self.dead}
        channel.queue_declare(
            self.reports_queue, durable=True, arguments={**dlx, "x-queue-type": "quorum"}
        )
        channel.queue_bind(self.reports_queue, self.reports, routing_key="report")
        for queue in self.pupil_queues:
            channel.queue_declare(queue, durable=True, arguments=dlx)
            channel.queue_bind(queue, self.lessons)

    def delete(self, channel: BlockingChannel) -> None:
        for queue in [self.reports_queue, *self.pupil_queues, self.stream]:
            channel.queue_delete(queue)
        for exchange in (self.lessons, self.reports, self.dead):
            channel.exchange_delete(exchange)


def _properties(message_id: str) -> pika.BasicProperties:
    return pika.BasicProperties(
        content_type=CONTENT_TYPE, delivery_mode=pika.DeliveryMode.Persistent, message_id=message_id
    )


def raw_fan_out(url: str, exchange: str, bodies: list[bytes]) -> Rate:
    """``basic_publish`` in confirm mode: each call returns once the broker confirmed it."""
    started = time.perf_counter()  # connecting counts, as it does for the framework
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.confirm_delivery()
    for index, body in enumerate(bodies):
        channel.basic_publish(exchange, "", body, _properties(f"lesson-{index}"), mandatory=True)
    seconds = time.perf_counter() - started
    connection.close()
    return Rate(len(bodies), seconds)


@dataclass
class _Window:
    """Progress of the windowed publish."""

    sent: int = 0
    confirmed: int = 0
    started: float = 0.0
    ended: float = 0.0
    error: str = ""


def raw_fan_out_windowed(url: str, exchange: str, bodies: list[bytes], window: int) -> Rate:
    """Asynchronous confirms: up to ``window`` messages unconfirmed (pika's SelectConnection)."""
    state = _Window()

    def publish_more(channel: Any) -> None:
        while state.sent < len(bodies) and state.sent - state.confirmed < window:
            index = state.sent
            channel.basic_publish(
                exchange, "", bodies[index], _properties(f"lesson-{index}"), mandatory=True
            )
            state.sent = index + 1

    def on_confirm(channel: Any, frame: Any) -> None:
        method = frame.method
        if isinstance(method, pika.spec.Basic.Nack):
            state.error = "the broker nacked a message"
        tag = method.delivery_tag
        state.confirmed = tag if method.multiple else max(state.confirmed, tag)
        if state.confirmed >= len(bodies):
            state.ended = time.perf_counter()
            channel.connection.close()
        else:
            publish_more(channel)

    def on_returned(channel: Any, method: Any, props: Any, body: bytes) -> None:
        state.error = "a message was unroutable"

    def on_confirm_mode(channel: Any, _frame: Any) -> None:
        publish_more(channel)

    def on_channel(channel: Any) -> None:
        channel.add_on_return_callback(on_returned)
        channel.confirm_delivery(
            ack_nack_callback=functools.partial(on_confirm, channel),
            callback=functools.partial(on_confirm_mode, channel),
        )

    state.started = time.perf_counter()
    connection = pika.SelectConnection(
        pika.URLParameters(url),
        on_open_callback=lambda conn: conn.channel(on_open_callback=on_channel),
        on_close_callback=lambda conn, reason: conn.ioloop.stop(),
    )
    connection.ioloop.start()
    if state.error or state.confirmed < len(bodies):
        raise RuntimeError(f"windowed publish failed: {state}")
    return Rate(len(bodies), state.ended - state.started)


def raw_ingest(
    url: str, queue: str, expected: int, prefetch: int, store: Path | None = None
) -> Rate:
    """``basic_consume`` with manual acks; the callback (stores the report if ``store``,) acks."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=prefetch)
    stop = threading.Event()
    counter = _Counter(expected, stop)
    db = None if store is None else _raw_store(store)

    def on_message(ch: BlockingChannel, method: Any, _props: Any, body: bytes) -> None:
        counter.started()
        if db is not None:
            report = json.loads(body)
            db.execute(
                "INSERT OR IGNORE INTO reports VALUES (?, ?, ?)",
                (report["lesson_id"], report["node_id"], body),
            )
        ch.basic_ack(method.delivery_tag)
        counter.finished()
        if stop.is_set():
            ch.stop_consuming()

    channel.basic_consume(queue, on_message, auto_ack=False)
    channel.start_consuming()
    connection.close()
    if db is not None:
        db.close()
    return counter.rate()


def _raw_store(path: Path) -> sqlite3.Connection:
    """A one-table SQLite store with the master store's durability settings."""
    db = sqlite3.connect(path, isolation_level=None)  # autocommit: one transaction per INSERT
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute(
        "CREATE TABLE IF NOT EXISTS reports (lesson_id TEXT, node_id TEXT, body BLOB, "
        "PRIMARY KEY (lesson_id, node_id))"
    )
    return db


# -- set-up ------------------------------------------------------------------------------


def report_bodies(lessons: list[Lesson], nodes: int) -> list[bytes]:
    """One realistic report per (lesson, node), as a pupil would send it."""
    bodies = []
    for node in range(nodes):
        for lesson in lessons:
            report = Report(
                lesson_id=lesson.lesson_id,
                node_id=f"n{node}",
                split=lesson.split,
                pupil_model="bench:echo",
                pupil_answer=lesson.master_answer[:300],
                similarity_before=0.42,
                similarity_adapted=0.47,
                losses=[0.5 - 0.01 * step for step in range(8)],
                timings=Timings(generate_ms=1200.0, embed_ms=40.0, train_ms=8.0),
                adapter_version=1,
                trained=lesson.split == "train",
            )
            bodies.append(encode(report))
    return bodies


def fill_queue(url: str, exchange: str, key: str, queue: str, bodies: list[bytes]) -> None:
    """Queue ``bodies`` quickly (no confirms) and wait until the queue holds all of them.

    Sent with the connection's user as ``user_id``, as every pupil sends its reports: the master
    refuses a report without one (master.verify_node_identity, docs/security.md).
    """
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    user = broker_user(url)
    for index, body in enumerate(bodies):
        props = _properties(f"report-{index}")
        props.user_id = user
        channel.basic_publish(exchange, key, body, props)
    deadline = time.monotonic() + 120
    while channel.queue_declare(queue, passive=True).method.message_count < len(bodies):
        if time.monotonic() > deadline:
            raise RuntimeError(f"queue {queue} did not fill up")
        time.sleep(0.05)
    connection.close()


def purge(url: str, queues: list[str]) -> None:
    """Empty ``queues``, so that each round starts from the same state."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    for queue in queues:
        channel.queue_purge(queue)
    connection.close()


def queue_depths(url: str, queues: list[str]) -> list[int]:
    """How many messages each queue holds."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    depths = [channel.queue_declare(q, passive=True).method.message_count for q in queues]
    connection.close()
    return depths


def with_raw_topology(url: str, raw: RawTopology, work: Callable[[], None]) -> None:
    """Declare the plain-pika topology, run ``work``, delete the topology whatever happens."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    raw.declare(connection.channel())
    connection.close()
    try:
        work()
    finally:
        connection = pika.BlockingConnection(pika.URLParameters(url))
        raw.delete(connection.channel())
        connection.close()


# -- the run -----------------------------------------------------------------------------


def master_settings(config: BrokerConfig, args: argparse.Namespace, workdir: Path) -> Settings:
    """The master's settings: the bench declares the lesson queues (or stream) itself."""
    data: dict[str, Any] = {
        "broker": config.model_dump(),
        "master": {
            "store": str(workdir / "unused.sqlite3"),
            "prefetch": args.prefetch,
            "metrics_port": 0,
            "ceiling": True,
            "publish_window": CONFIRM_WINDOW,
            "generator": {"temperature": 0.0},
        },
    }
    # A swarm on the lesson stream (issue 14) would have the master declare it with its own
    # retention; here every row publishes into the same plain stream declared by the bench.
    if "lessons" in Settings.model_fields:
        data["lessons"] = {"transport": "queues"}
    return Settings.model_validate(data)


def run(args: argparse.Namespace, workdir: Path) -> dict[str, list[Rate]]:
    """Every round of both patterns; returns the rates by row name."""
    config = broker_config(bench_namespace("throughput"), args.url)
    settings = master_settings(config, args, workdir)
    node_ids = [f"n{i}" for i in range(args.nodes)]
    raw = RawTopology(bench_namespace("throughput-raw"), args.nodes)
    rates: dict[str, list[Rate]] = {name: [] for name in rows_for(args.transports)}
    lessons = make_lessons(args.lessons, DIM)
    bodies = [encode(lesson) for lesson in lessons]
    # Enough reports that each ingest run lasts about a second or more: N x L of them would be
    # over in a tenth of a second at raw pika's rate, too short to time well.
    reports = report_bodies(lessons, -(-args.reports // len(lessons)))[: args.reports]

    with throwaway_topology(config, node_ids) as topology:
        pupil_queues = [topology.pupil_queue(n) for n in node_ids]
        stream = stream_name(config.namespace)

        def fan_out(transport: str, round_index: int) -> None:
            """Every fan-out row on one transport, each into empty queues (or a new stream)."""

            def empty() -> None:
                if transport == "stream":
                    reset_stream(args.url, raw.stream, raw.lessons)
                    reset_stream(args.url, stream, topology.lessons_exchange)
                else:
                    purge(args.url, raw.pupil_queues)
                    purge(args.url, pupil_queues)

            if transport == "stream":  # the stream alone: no per-node queue bound
                for queue in raw.pupil_queues:
                    delete_queue(args.url, queue)
                for queue in pupil_queues:
                    delete_queue(args.url, queue)
            prompts = [
                PromptItem(id=f"{transport}{round_index}-{i}", goal_text=lesson.goal_text)
                for i, lesson in enumerate(lessons)
            ]
            row = f"{transport}: "
            empty()
            rates[row + "raw"].append(raw_fan_out(args.url, raw.lessons, bodies))
            empty()
            rates[row + "raw windowed"].append(
                raw_fan_out_windowed(args.url, raw.lessons, bodies, CONFIRM_WINDOW)
            )
            empty()
            rates[row + "framework"].append(framework_fan_out(settings, prompts, workdir))
            if transport == "queues":
                depths = queue_depths(args.url, pupil_queues)
                if depths != [len(prompts)] * len(pupil_queues):
                    raise RuntimeError(f"pupil queues hold {depths}, expected {len(prompts)} each")
            empty()
            rates[row + "WindowedPublisher only"].append(windowed_fan_out(config, topology, bodies))
            empty()
            rates[row + "Publisher only"].append(publisher_fan_out(config, topology, bodies))
            if transport == "stream":  # back to the per-node queues for the next pattern
                delete_queue(args.url, raw.stream)
                delete_queue(args.url, stream)
                redeclare(args.url, raw, topology, tuple(node_ids))

        def rounds() -> None:
            for round_index in range(args.rounds):
                print(f"round {round_index + 1}/{args.rounds}", file=sys.stderr, flush=True)
                for transport in args.transports:
                    fan_out(transport, round_index)
                purge(args.url, pupil_queues)
                # Ingest: the same reports queued up front for each.
                fill_queue(args.url, raw.reports, "report", raw.reports_queue, reports)
                rates["ingest raw"].append(
                    raw_ingest(args.url, raw.reports_queue, len(reports), args.prefetch)
                )
                fill_queue(args.url, raw.reports, "report", raw.reports_queue, reports)
                store = workdir / f"raw-{round_index}.sqlite3"
                rates["ingest raw + store"].append(
                    raw_ingest(args.url, raw.reports_queue, len(reports), args.prefetch, store)
                )
                fill_queue(
                    args.url,
                    topology.reports_exchange,
                    topology.REPORT_KEY,
                    topology.reports_queue,
                    reports,
                )
                rates["ingest framework"].append(
                    framework_ingest(settings, topology, len(reports), workdir, lessons)
                )

        with_raw_topology(args.url, raw, rounds)
    return rates


def redeclare(url: str, raw: RawTopology, topology: Topology, node_ids: tuple[str, ...]) -> None:
    """Declare both topologies' per-node queues again (after a stream round deleted them)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    raw.declare(channel)
    topology.declare_all(channel, node_ids)
    connection.close()


FAN_OUT_ROWS = ("raw", "raw windowed", "framework", "WindowedPublisher only", "Publisher only")
INGEST_ROWS = ("ingest raw", "ingest raw + store", "ingest framework")
FAN_OUT_LABELS = {
    "raw": "raw pika, confirm each",
    "raw windowed": f"raw pika, {CONFIRM_WINDOW} in flight",
    "framework": "framework (MasterService)",
    "WindowedPublisher only": "framework WindowedPublisher only",
    "Publisher only": "framework Publisher (confirm each)",
}
LABELS = {
    "ingest raw": "ingest: raw pika",
    "ingest raw + store": "ingest: raw pika + json + SQLite",
    "ingest framework": "ingest: framework (MasterService)",
}


def rows_for(transports: tuple[str, ...]) -> list[str]:
    """Row names in table order: each transport's fan-out rows, then ingest."""
    return [f"{t}: {r}" for t in transports for r in FAN_OUT_ROWS] + list(INGEST_ROWS)


def label(name: str) -> str:
    if name in LABELS:
        return LABELS[name]
    transport, _, row = name.partition(": ")
    return f"fan-out ({transport}): {FAN_OUT_LABELS[row]}"


def baseline(name: str) -> str | None:
    """The raw row a row is judged against: windowed raw pika for fan-out, raw ingest."""
    if name in ("ingest raw + store", "ingest framework"):
        return "ingest raw"
    transport, _, row = name.partition(": ")
    if row and row != "raw windowed":
        return f"{transport}: raw windowed"
    return None


def table(rates: dict[str, list[Rate]], nodes: int) -> str:
    """Median round of each row, with its share of the matching raw row."""
    medians = {name: statistics.median(r.per_s for r in runs) for name, runs in rates.items()}
    rows = []
    for name in rates:
        per_s = medians[name]
        fan_out = not name.startswith("ingest")
        unit = "lessons" if fan_out else "reports"
        copies = nodes if name.startswith("queues") else 1
        deliveries = f"{per_s * copies:,.0f}" if fan_out else "-"
        base = baseline(name)
        share = f"{per_s / medians[base]:.0%}" if base else "-"
        spread = ", ".join(f"{r.per_s:,.0f}" for r in rates[name])
        rows.append((label(name), f"{per_s:,.0f} {unit}/s", deliveries, share, spread))
    columns = ("pattern", "median rate", "queue deliveries/s", "vs raw", "every round")
    return format_table(columns, rows)


def main() -> int:
    """Run the rounds and print the table and the verdict."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--nodes", type=int, default=10, help="pupil queues (default 10)")
    parser.add_argument("--lessons", type=int, default=2000, help="lessons per round")
    parser.add_argument("--reports", type=int, default=20_000, help="reports per ingest run")
    parser.add_argument(
        "--prefetch",
        type=int,
        default=MasterConfig().prefetch,
        help="the master's ingest window, raw and framework alike (default: master.prefetch)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--transports",
        type=lambda text: tuple(t for t in text.split(",") if t),
        default=TRANSPORTS,
        help="fan-out onto per-node queues, the stream, or both (default: queues,stream)",
    )
    parser.add_argument("--url", default=AMQP_URL)
    args = parser.parse_args()
    unknown = set(args.transports) - set(TRANSPORTS)
    if unknown:
        parser.error(f"--transports: unknown {', '.join(sorted(unknown))}")
    logging.basicConfig(level=logging.WARNING)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="distill-swarm-throughput-") as workdir:
        rates = run(args, Path(workdir))
    print(
        f"{args.nodes} pupil queues (queues) or one stream (stream), {args.lessons} lessons and "
        f"{args.reports} reports per round, prefetch {args.prefetch}, {DIM}-dim lessons "
        f"({len(encode(make_lessons(1, DIM)[0]))} bytes), median of {args.rounds} rounds"
    )
    print(table(rates, args.nodes))
    medians = {name: statistics.median(r.per_s for r in runs) for name, runs in rates.items()}
    verdicts = [(f"{t}: framework", FAN_OUT_TARGET_SHARE) for t in args.transports]
    verdicts.append(("ingest framework", TARGET_SHARE))
    for name, target in verdicts:
        base = baseline(name)
        assert base is not None
        share = medians[name] / medians[base]
        verdict = "met" if share >= target else "MISSED"
        print(f"target: {label(name)} >= {target:.0%} of {label(base)}: {verdict} ({share:.0%})")
    context = medians["ingest framework"] / medians["ingest raw + store"]
    print(f"context: the framework's ingest is {context:.0%} of raw pika + json + SQLite")
    print(
        f"{time.monotonic() - started:.0f}s; command: .venv/bin/python bench/throughput.py "
        f"--nodes {args.nodes} --lessons {args.lessons} --reports {args.reports} "
        f"--prefetch {args.prefetch} --rounds {args.rounds} "
        f"--transports {','.join(args.transports)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
