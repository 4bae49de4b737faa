"""One worker process of the scale benchmark: many pupil nodes as threads, one process.

Started by ``bench/scale.py``, never by hand. Each node talks to the broker exactly as a real pupil
does: its own consumer connection on its own queue ``<ns>.pupil.<node>`` (prefetch 1, manual ack),
its own confirming publisher connection for hello, heartbeats and reports, and the ack only after
the report is confirmed. Two kinds of node:

- ``sim`` (the default): :class:`SimPupil`, built from ``shared.broker``'s Consumer and Publisher
  and the real message types. It decodes and validates the lesson, answers with the fast backend,
  measures ``similarity_before`` and reports. It does not train an adapter nor write a
  checkpoint, which are per-node costs that do not load the master (bench/overhead.py measures
  them); in exchange, 1,000 of them fit on 2 cores beside a broker and a master.
- ``loop``: :class:`LoopPupil`, the same wire behaviour on one pika event loop per process, with
  no threads: past a few hundred nodes on 2 cores, the ``sim`` nodes' threads are what a run
  measures (docs/scale.md).
- ``real``: the real :class:`PupilService` + :class:`PupilNode` with the fast backend, torch
  adapter training, checkpoints and the journal. For a few dozen nodes.

On SIGTERM the worker stops its nodes and writes what each node received and reported (wall-clock
times) as JSON to ``--results``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pika
import pika.spec
from fast_backend import EchoGenerator, HashingEmbedder
from pika.adapters.blocking_connection import BlockingChannel
from pika.adapters.select_connection import IOLoop

from shared.backends import GenerationParams
from shared.broker import Consumer, Delivery, Publisher, properties
from shared.config import Settings
from shared.messages import Heartbeat, Hello, Lesson, Message, NodeInfo, Report, decode, encode
from shared.similarity import cosine
from shared.topology import Topology

log = logging.getLogger("scale.pupils")

# Linux prctl(2) option: deliver a signal to this process when its parent dies, so an
# orchestrator killed with SIGKILL leaves no worker behind.
PR_SET_PDEATHSIG = 1
# How often the keepalive thread walks the nodes (heartbeat when due, else pump the publisher).
KEEPALIVE_INTERVAL_S = 1.0
# How long a stopping worker waits for each node's threads.
JOIN_TIMEOUT_S = 30.0
# Event-loop nodes connect this many at a time, with this pause between batches.
LOOP_CONNECT_BATCH = 10
LOOP_CONNECT_PAUSE_S = 0.05


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when the process that started it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def answer_lesson(
    node_id: str,
    lesson: Lesson,
    generator: EchoGenerator,
    embedder: HashingEmbedder,
    params: GenerationParams,
) -> Report:
    """A simulated node's report on one lesson: answer, embed, compare; no adapter."""
    answer = generator.generate(lesson.goal_text, params)
    vector = embedder.embed([answer])[0]
    before = cosine(vector, lesson.reference.to_array())
    return Report(
        lesson_id=lesson.lesson_id,
        node_id=node_id,
        split=lesson.split,
        pupil_model=generator.model_name,
        pupil_answer=answer,
        similarity_before=before,
        similarity_adapted=before,  # no adapter: the identity's prediction
    )


@dataclass
class Ledger:
    """What one node saw: per lesson, when it arrived and when its report was confirmed."""

    received: dict[str, float] = field(default_factory=dict)
    confirmed: dict[str, float] = field(default_factory=dict)
    deliveries: int = 0
    redelivered: int = 0
    errors: list[str] = field(default_factory=list)


class Node(Protocol):
    """What the worker needs of a node, simulated or real."""

    node_id: str
    ledger: Ledger

    def start(self) -> None: ...

    def keepalive(self) -> None: ...

    def join(self, timeout_s: float) -> None: ...


class SimPupil:
    """A pupil's broker behaviour without its training: hello, heartbeats, consume, report, ack."""

    def __init__(self, node_id: str, settings: Settings, stop: threading.Event) -> None:
        self.node_id = node_id
        self.ledger = Ledger()
        self._settings = settings
        self._stop = stop
        self._topology = Topology(settings.broker.namespace, settings.broker.quorum_queues)
        self._publisher = Publisher(settings.broker, self._declare, stop)
        self._generator = EchoGenerator()
        self._embedder = HashingEmbedder()
        self._params = GenerationParams(max_tokens=settings.pupil.generator.max_tokens)
        self._next_heartbeat = 0.0
        self._thread: threading.Thread | None = None

    def _declare(self, channel: BlockingChannel) -> None:
        self._topology.declare_pupil(channel, self.node_id)

    def _info(self) -> NodeInfo:
        return NodeInfo(
            node_id=self.node_id,
            software_version="bench",
            pupil_model=self._generator.model_name,
            embedding_model=self._embedder.model_name,
            embedding_dim=self._embedder.dim,
            lessons_done=len(self.ledger.confirmed),
        )

    def _control(self, message: Message) -> None:
        key = self._topology.control_key(message.kind, self.node_id)
        self._publisher.publish(
            self._topology.control_exchange,
            key,
            encode(message),
            message.message_id,
            mandatory=False,
        )

    def start(self) -> None:
        """Say hello (this declares the node's queue), then consume on a thread of its own."""
        self._control(Hello(node=self._info()))
        self._next_heartbeat = time.monotonic() + self._settings.pupil.heartbeat_interval_s
        consumer = Consumer(
            self._settings.broker,
            self._topology,
            [self._topology.pupil_queue(self.node_id)],
            self._handle,
            declare=self._declare,
        )
        self._thread = threading.Thread(
            target=consumer.run, args=(self._stop,), name=f"node-{self.node_id}", daemon=True
        )
        self._thread.start()

    def _handle(self, delivery: Delivery) -> None:
        received = time.time()
        lesson = decode(delivery.body, Lesson)
        self.ledger.deliveries += 1
        self.ledger.redelivered += int(delivery.redelivered)
        if lesson.lesson_id in self.ledger.confirmed:
            return  # reported and confirmed before: only the ack was lost, as in the real flow
        self.ledger.received.setdefault(lesson.lesson_id, received)
        report = answer_lesson(self.node_id, lesson, self._generator, self._embedder, self._params)
        self._publisher.publish(
            self._topology.reports_exchange,
            self._topology.REPORT_KEY,
            encode(report),
            f"{lesson.lesson_id}:{self.node_id}",
        )
        self.ledger.confirmed[lesson.lesson_id] = time.time()

    def keepalive(self) -> None:
        """Heartbeat when due, else let the idle publisher answer AMQP heartbeats."""
        now = time.monotonic()
        if now < self._next_heartbeat:
            self._publisher.pump()
            return
        self._next_heartbeat = now + self._settings.pupil.heartbeat_interval_s
        try:
            self._control(Heartbeat(node=self._info()))
        except Exception as exc:
            self.ledger.errors.append(f"heartbeat: {exc}")

    def join(self, timeout_s: float) -> None:
        """Wait for the consumer to finish its last ack and close; then close the publisher."""
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._publisher.close()


class RealPupil:
    """The real PupilService + PupilNode (fast backend), timing each delivery."""

    def __init__(
        self, node_id: str, settings: Settings, stop: threading.Event, state_root: Path
    ) -> None:
        from pupil_node.node import PupilNode
        from pupil_node.service import PupilService

        self.node_id = node_id
        self.ledger = Ledger()
        pupil = settings.pupil.model_copy(
            update={"node_id": node_id, "state_dir": state_root / node_id}
        )
        settings = settings.model_copy(update={"pupil": pupil})
        node = PupilNode(node_id, pupil, EchoGenerator(), HashingEmbedder())
        ledger = self.ledger

        class TimedService(PupilService):
            def handle(self, delivery: Delivery) -> None:
                received = time.time()
                ledger.deliveries += 1
                ledger.redelivered += int(delivery.redelivered)
                lesson_id = _lesson_id(delivery.body)
                ledger.received.setdefault(lesson_id, received)
                super().handle(delivery)
                ledger.confirmed.setdefault(lesson_id, time.time())

        self._service = TimedService(settings, node, stop)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Run the service (hello, consumer, its own keepalive thread) on a thread."""
        self._thread = threading.Thread(
            target=self._service.run, name=f"node-{self.node_id}", daemon=True
        )
        self._thread.start()

    def keepalive(self) -> None:
        """Nothing: the real service has its own keepalive thread."""

    def join(self, timeout_s: float) -> None:
        """Wait for the service to say goodbye and close."""
        if self._thread is not None:
            self._thread.join(timeout_s)


class LoopPupil:
    """A pupil's broker behaviour on a shared event loop: no threads, so 1,000 fit on 2 cores.

    Same wire behaviour as :class:`SimPupil`: a publisher connection (confirms; it declares and
    binds the node's queue, then says hello) and a consumer connection (prefetch 1, manual ack);
    the lesson is acked only once the broker confirmed its report, and nacked for a requeue if
    the report was refused or unroutable. What it does not reuse is ``shared.broker``, whose
    blocking connections need two threads per node: past a few hundred nodes per machine those
    threads, not the master, become what is measured (docs/scale.md).
    """

    def __init__(
        self, node_id: str, settings: Settings, ioloop: IOLoop, stop: threading.Event
    ) -> None:
        self.node_id = node_id
        self.ledger = Ledger()
        self._settings = settings
        self._ioloop = ioloop
        self._stop = stop
        self._topology = Topology(settings.broker.namespace, settings.broker.quorum_queues)
        self._queue = self._topology.pupil_queue(node_id)
        self._generator = EchoGenerator()
        self._embedder = HashingEmbedder()
        self._params = GenerationParams(max_tokens=settings.pupil.generator.max_tokens)
        self._publisher: Any = None
        self._consumer: Any = None
        self._connections: list[pika.SelectConnection] = []
        self._sequence = 0
        self._pending: dict[int, Callable[[bool], None]] = {}
        self._returned: set[str] = set()
        self._by_message: dict[str, int] = {}
        self.ready = False

    # -- set-up: publisher (declare, bind, hello), then consumer -------------------------------

    def start(self) -> None:
        """Open the publisher connection; everything else follows from callbacks."""
        self._connect(self._on_publisher_connection)

    def _connect(self, on_open: Callable[[Any], None]) -> None:
        params = pika.URLParameters(self._settings.broker.url)
        params.heartbeat = self._settings.broker.heartbeat_s
        connection = pika.SelectConnection(
            params,
            on_open_callback=on_open,
            on_open_error_callback=self._on_error,
            on_close_callback=self._on_close,
            custom_ioloop=self._ioloop,
        )
        self._connections.append(connection)

    def _on_error(self, _connection: Any, error: Any) -> None:
        self.ledger.errors.append(f"connect: {error!r}")

    def _on_close(self, _connection: Any, reason: Any) -> None:
        if not self._stop.is_set():
            self.ledger.errors.append(f"connection closed: {reason!r}")

    def _on_publisher_connection(self, connection: Any) -> None:
        connection.channel(on_open_callback=self._on_publisher_channel)

    def _on_publisher_channel(self, channel: Any) -> None:
        self._publisher = channel
        channel.confirm_delivery(self._on_confirm)
        channel.add_on_return_callback(self._on_return)
        arguments = {"x-dead-letter-exchange": self._topology.dead_exchange}
        channel.queue_declare(
            self._queue, durable=True, arguments=arguments, callback=self._on_declared
        )

    def _on_declared(self, _frame: Any) -> None:
        self._publisher.queue_bind(
            self._queue, self._topology.lessons_exchange, callback=self._on_bound
        )

    def _on_bound(self, _frame: Any) -> None:
        self._control(Hello(node=self._info()))
        self._ioloop.call_later(self._settings.pupil.heartbeat_interval_s, self._heartbeat)
        self._connect(self._on_consumer_connection)

    def _on_consumer_connection(self, connection: Any) -> None:
        connection.channel(on_open_callback=self._on_consumer_channel)

    def _on_consumer_channel(self, channel: Any) -> None:
        self._consumer = channel
        channel.basic_qos(prefetch_count=self._settings.broker.prefetch, callback=self._on_qos)

    def _on_qos(self, _frame: Any) -> None:
        self._consumer.basic_consume(self._queue, self._on_lesson, auto_ack=False)
        self.ready = True

    # -- publishing with confirms ----------------------------------------------------------------

    def _info(self) -> NodeInfo:
        return NodeInfo(
            node_id=self.node_id,
            software_version="bench",
            pupil_model=self._generator.model_name,
            embedding_model=self._embedder.model_name,
            embedding_dim=self._embedder.dim,
            lessons_done=len(self.ledger.confirmed),
        )

    def _publish(
        self,
        exchange: str,
        key: str,
        body: bytes,
        message_id: str,
        mandatory: bool,
        confirmed: Callable[[bool], None],
    ) -> None:
        self._sequence += 1
        self._pending[self._sequence] = confirmed
        self._by_message[message_id] = self._sequence
        self._publisher.basic_publish(
            exchange, key, body, properties(message_id), mandatory=mandatory
        )

    def _control(self, message: Message) -> None:
        key = self._topology.control_key(message.kind, self.node_id)
        exchange = self._topology.control_exchange
        self._publish(exchange, key, encode(message), message.message_id, False, _ignore)

    def _heartbeat(self) -> None:
        if self._stop.is_set() or self._publisher is None or not self._publisher.is_open:
            return
        self._control(Heartbeat(node=self._info()))
        self._ioloop.call_later(self._settings.pupil.heartbeat_interval_s, self._heartbeat)

    def _on_return(self, _channel: Any, _method: Any, props: Any, _body: bytes) -> None:
        self._returned.add(props.message_id)  # the broker's ack for it follows

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        tags = (
            [t for t in self._pending if t <= method.delivery_tag]
            if method.multiple
            else [method.delivery_tag]
        )
        acked = isinstance(method, pika.spec.Basic.Ack)
        for tag in tags:
            callback = self._pending.pop(tag, None)
            if callback is not None:
                callback(acked)

    # -- the lesson ------------------------------------------------------------------------------

    def _on_lesson(self, channel: Any, method: Any, _props: Any, body: bytes) -> None:
        received = time.time()
        self.ledger.deliveries += 1
        self.ledger.redelivered += int(method.redelivered)
        lesson = decode(body, Lesson)
        if lesson.lesson_id in self.ledger.confirmed:
            channel.basic_ack(method.delivery_tag)
            return
        self.ledger.received.setdefault(lesson.lesson_id, received)
        report = answer_lesson(self.node_id, lesson, self._generator, self._embedder, self._params)
        message_id = f"{lesson.lesson_id}:{self.node_id}"

        def confirmed(acked: bool) -> None:
            routed = message_id not in self._returned
            self._returned.discard(message_id)
            if acked and routed:
                self.ledger.confirmed[lesson.lesson_id] = time.time()
                channel.basic_ack(method.delivery_tag)
            else:
                self.ledger.errors.append(f"report {message_id} not confirmed; requeued")
                channel.basic_nack(method.delivery_tag, requeue=True)

        exchange, key = self._topology.reports_exchange, self._topology.REPORT_KEY
        self._publish(exchange, key, encode(report), message_id, True, confirmed)

    def keepalive(self) -> None:
        """Nothing: the event loop answers AMQP heartbeats and schedules the node's own."""

    def join(self, timeout_s: float) -> None:
        """Close both connections (the loop has stopped; the broker sees them go)."""
        for connection in self._connections:
            with contextlib.suppress(Exception):
                connection.close()


def _ignore(_acked: bool) -> None:
    pass


def run_loop(args: argparse.Namespace, settings: Settings, stop: threading.Event) -> int:
    """Run every node of this worker on one event loop until SIGTERM; write the ledger."""
    ioloop = IOLoop()
    node_ids = [f"{args.prefix}{i:04d}" for i in range(args.first, args.first + args.count)]
    nodes = [LoopPupil(node_id, settings, ioloop, stop) for node_id in node_ids]
    started = time.time()
    connected: list[float] = []

    def starter(index: int) -> None:
        # Connect a few nodes per loop turn so the broker sees a ramp, not a wall of handshakes.
        for node in nodes[index : index + LOOP_CONNECT_BATCH]:
            node.start()
        if index + LOOP_CONNECT_BATCH < len(nodes):
            ioloop.call_later(LOOP_CONNECT_PAUSE_S, lambda: starter(index + LOOP_CONNECT_BATCH))

    def watch() -> None:
        if stop.is_set():
            ioloop.stop()
            return
        if not connected and all(node.ready for node in nodes):
            connected.append(time.time())
            print(f"{len(nodes)} nodes started in {connected[0] - started:.1f}s", file=sys.stderr)
        ioloop.call_later(KEEPALIVE_INTERVAL_S / 4, watch)

    ioloop.add_callback_threadsafe(lambda: starter(0))
    ioloop.call_later(KEEPALIVE_INTERVAL_S / 4, watch)
    ioloop.start()
    for node in nodes:
        node.join(0)
    write_results(args.results, list(nodes), [], started, connected[0] if connected else 0.0)
    return 0


def _lesson_id(body: bytes) -> str:
    lesson = decode(body, Lesson)
    return lesson.lesson_id


def make_settings(url: str, namespace: str, heartbeat_interval_s: float) -> Settings:
    """The settings every node of this worker shares (metrics endpoints off)."""
    return Settings.model_validate(
        {
            "broker": {"url": url, "namespace": namespace},
            "pupil": {"metrics_port": 0, "heartbeat_interval_s": heartbeat_interval_s},
        }
    )


def run(args: argparse.Namespace) -> int:
    """Start the nodes, keep them alive until SIGTERM, write the ledger."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _s, _f: stop.set())
    signal.signal(signal.SIGINT, lambda _s, _f: stop.set())
    settings = make_settings(args.url, args.namespace, args.heartbeat_interval_s)
    if args.mode == "loop":
        return run_loop(args, settings, stop)
    if args.mode == "real":
        import torch

        torch.set_num_threads(1)  # many nodes share 2 cores: one thread each, no oversubscription
    node_ids = [f"{args.prefix}{i:04d}" for i in range(args.first, args.first + args.count)]
    nodes: list[Node] = []
    started = time.time()
    failures: list[str] = []
    for node_id in node_ids:
        if stop.is_set():
            break
        node: Node = (
            SimPupil(node_id, settings, stop)
            if args.mode == "sim"
            else RealPupil(node_id, settings, stop, args.state_dir)
        )
        try:
            node.start()
        except Exception as exc:
            failures.append(f"{node_id}: {type(exc).__name__}: {exc}")
            log.error("node %s did not start: %s", node_id, exc)
            continue
        nodes.append(node)
    connected = time.time()
    print(f"{len(nodes)} nodes started in {connected - started:.1f}s", file=sys.stderr, flush=True)
    while not stop.wait(KEEPALIVE_INTERVAL_S):
        for node in nodes:
            node.keepalive()
    for node in nodes:
        node.join(JOIN_TIMEOUT_S)
    write_results(args.results, nodes, failures, started, connected)
    return 0


def write_results(
    path: Path, nodes: list[Node], failures: list[str], started: float, connected: float
) -> None:
    """Write each node's ledger (atomically: the orchestrator polls for the file)."""
    out: dict[str, Any] = {
        "started": started,
        "connected": connected,
        "start_failures": failures,
        "nodes": {
            n.node_id: {
                "received": n.ledger.received,
                "confirmed": n.ledger.confirmed,
                "deliveries": n.ledger.deliveries,
                "redelivered": n.ledger.redelivered,
                "errors": n.ledger.errors,
            }
            for n in nodes
        },
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out))
    tmp.rename(path)


def main() -> int:
    """Parse the orchestrator's arguments and run."""
    parser = argparse.ArgumentParser(description="scale benchmark worker (started by scale.py)")
    parser.add_argument("--url", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--mode", choices=("sim", "loop", "real"), default="sim")
    parser.add_argument("--prefix", default="node-")
    parser.add_argument("--first", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--heartbeat-interval-s", type=float, default=30.0)
    parser.add_argument("--state-dir", type=Path, default=Path("scale-state"))
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--cpus", help="comma-separated CPUs to run on (default: any)")
    args = parser.parse_args()
    die_with_parent()
    if args.cpus:
        # Before any thread starts: every node's threads inherit it.
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
