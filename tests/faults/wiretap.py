"""A wire tap: a copy of every lesson and every report published in one namespace, in order.

Two durable queues bound beside the real ones (``<ns>.tap.lessons`` to the lessons fanout,
``<ns>.tap.reports`` to the reports exchange with the report key) receive a copy of each publish.
So the tap counts what went over the wire, not what a store deduplicated: a lesson or report
published twice shows up twice. The queues are durable and the messages persistent, so a broker
restart loses nothing from the tap either.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from pika.adapters.blocking_connection import BlockingChannel

from shared.broker import connect
from shared.config import BrokerConfig
from shared.errors import BrokerError, DecodeError
from shared.messages import Lesson, Report, decode
from shared.topology import Topology


@dataclass(frozen=True)
class Moment:
    """A point in a scenario (time.monotonic()) and how many reports the tap had read by then.

    Reports are stamped when the tap reads them, so "after a moment" means "read by a later
    poll": a report published before the fault but read after it is not mistaken for recovery.
    """

    at: float
    reports_read: int


@dataclass(frozen=True)
class Seen:
    """One message the tap saw: its ids and when the tap read it (time.monotonic())."""

    seen_at: float
    lesson_id: str | None  # None: not a decodable lesson/report (bad input)
    node_id: str | None = None  # reports only
    error: str | None = None  # reports only: the node refused or failed the lesson
    adapter_version: int | None = None  # reports only


class WireTap:
    """Copies of lessons and reports; :meth:`poll` reads what arrived since the last poll."""

    def __init__(self, config: BrokerConfig) -> None:
        self._config = config.model_copy(update={"connect_attempts": 1})
        self._topology = Topology(config.namespace)
        self.lessons_queue, self.reports_queue = self.queues(config.namespace)
        self.lessons: list[Seen] = []
        self.reports: list[Seen] = []

    @staticmethod
    def queues(namespace: str) -> tuple[str, str]:
        """The names of the lessons and reports taps of ``namespace``."""
        return f"{namespace}.tap.lessons", f"{namespace}.tap.reports"

    def install(self) -> WireTap:
        """Declare the exchanges (as the master would) and the two tap queues."""
        connection = connect(self._config.model_copy(update={"connect_attempts": 5}))
        try:
            channel = connection.channel()
            self._topology.declare_exchanges(channel)
            for queue, exchange, key in (
                (self.lessons_queue, self._topology.lessons_exchange, ""),
                (self.reports_queue, self._topology.reports_exchange, Topology.REPORT_KEY),
            ):
                channel.queue_declare(queue, durable=True)
                channel.queue_bind(queue, exchange, routing_key=key)
        finally:
            connection.close()
        return self

    def poll(self) -> WireTap:
        """Read everything waiting in the taps; a broker that is down just means "nothing yet"."""
        try:
            connection = connect(self._config)
        except BrokerError:
            return self
        with contextlib.suppress(Exception):  # the broker may go away mid-poll: retry next time
            channel = connection.channel()
            # Each copy is kept as soon as it is read: the gets ack automatically, so a copy read
            # before a failure later in the same poll must not be dropped with the failure.
            _drain(channel, self.lessons_queue, lambda body: self.lessons.append(_lesson(body)))
            _drain(channel, self.reports_queue, lambda body: self.reports.append(_report(body)))
        with contextlib.suppress(Exception):
            connection.close()
        return self

    # -- what the wire carried -------------------------------------------------------------------

    def lesson_ids(self) -> list[str]:
        """Every valid lesson publish, in order, repeats included."""
        return [s.lesson_id for s in self.lessons if s.lesson_id is not None]

    def report_pairs(self, nodes: set[str] | None = None) -> list[tuple[str, str]]:
        """Every successful report publish as (lesson, node), in order, repeats included."""
        return [
            (s.lesson_id, s.node_id)
            for s in self.reports
            if s.lesson_id is not None
            and s.node_id is not None
            and s.error is None
            and (nodes is None or s.node_id in nodes)
        ]

    def now(self) -> Moment:
        """Read the taps, then mark this moment: reports read later count as after it."""
        self.poll()
        return Moment(time.monotonic(), len(self.reports))

    def recovery_s(self, since: Moment, node: str, lesson_id: str | None = None) -> float | None:
        """Seconds from ``since`` to the first later report from ``node`` (on ``lesson_id``,
        if given), as the tap saw it; None if there was none."""
        times = [
            s.seen_at
            for s in self.reports[since.reports_read :]
            if s.node_id == node and (lesson_id is None or s.lesson_id == lesson_id)
        ]
        return round(min(times) - since.at, 1) if times else None


def _drain(channel: BlockingChannel, queue: str, keep: Callable[[bytes], None]) -> None:
    while True:
        method, _props, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            return
        keep(body)


def _lesson(body: bytes) -> Seen:
    now = time.monotonic()
    try:
        lesson = decode(body, Lesson)
    except DecodeError:
        return Seen(now, None)
    return Seen(now, lesson.lesson_id)


def _report(body: bytes) -> Seen:
    now = time.monotonic()
    try:
        report = decode(body, Report)
    except DecodeError:
        return Seen(now, None)
    return Seen(now, report.lesson_id, report.node_id, report.error, report.adapter_version)
