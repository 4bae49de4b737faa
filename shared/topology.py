"""The RabbitMQ topology of DESIGN.md, in one place.

Every name is prefixed by the configured namespace (``swarm`` by default), so ``Topology("swarm")``
gives ``swarm.lessons``, ``swarm.pupil.<node>`` and so on. Declaring is idempotent: the same
arguments every time, so a second declaration is a no-op and a changed one fails loudly
(PRECONDITION_FAILED) instead of silently running with two different queue types.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pika.exceptions as pex
from pika.adapters.blocking_connection import BlockingChannel

from shared.config import LessonsConfig, Settings
from shared.errors import BrokerError
from shared.jobs import KINDS

# Header carrying why a message was dead-lettered by us (RabbitMQ's own x-death says only
# "rejected", which tells an operator nothing).
REASON_HEADER = "x-distill-swarm-reason"
ORIGIN_QUEUE_HEADER = "x-distill-swarm-queue"
# A Topology declares no lesson stream unless given the settings' lessons section: the tools that
# only name queues (node users, clean-up) need none, and the master passes its own.
PER_NODE_QUEUES = LessonsConfig(transport="queues")

# What a pupil needs to hear when setting up its queue fails; AMQP reply code -> what to do.
_PUPIL_DECLARE_HINTS = {
    403: "this broker user may not do that: a per-node user needs broker.declare_exchanges = "
    "false and the permissions `distill-swarm node add` sets (docs/security.md)",
    404: "start the master once (it declares the topology) or load the deploy definitions",
}


class _Named:
    """A name in one swarm's namespace, read from a :class:`Topology`: ``<namespace>.<suffix>``."""

    def __init__(self, suffix: str) -> None:
        self.suffix = suffix

    def __get__(self, topology: Topology, owner: type[Topology]) -> str:
        return f"{topology.namespace}.{self.suffix}"


@dataclass(frozen=True)
class Topology:
    """Names and declarations of every exchange and queue of one swarm."""

    namespace: str = "swarm"
    quorum_queues: bool = True
    # Job kinds the master offloads: it declares one shared queue per kind (docs/jobs.md).
    job_kinds: tuple[str, ...] = ()
    # How lessons travel: with transport "stream" the master declares the lesson stream.
    lessons: LessonsConfig = PER_NODE_QUEUES

    # Every exchange and master queue: ``<namespace>.<suffix>``.
    lessons_exchange = _Named("lessons")
    jobs_exchange = _Named("jobs")
    reports_exchange = _Named("reports")
    control_exchange = _Named("control")
    dead_exchange = _Named("dead")
    reports_queue = _Named("master.reports")
    control_queue = _Named("master.control")
    dead_queue = _Named("dead")
    # The lesson stream: a queue named like the lessons exchange it is bound to. The same name on
    # purpose: a node's user may read ``<ns>.lessons`` (the exchange, to bind its queue) and so,
    # with no new grant, the stream; it may write neither (docs/security.md).
    lessons_stream = _Named("lessons")
    # Where submitters' jobs wait for the master (bound to jobs with ``SUBMIT_KEY``).
    job_submissions_queue = _Named("master.jobs")
    # Where pupils' job results wait for the master (bound to reports, ``JOB_RESULT_KEY``).
    job_results_queue = _Named("master.job-results")
    # `distill-swarm teach`: prompts for a running master to answer and publish as lessons. An
    # exchange of its own, so that who may teach is one grant on one name: a node's user may not
    # write it (master/access.py), and a submitter of jobs need not be able to either.
    teach_exchange = _Named("teach")
    teach_queue = _Named("master.teach")

    # Routing key of reports on the direct reports exchange.
    REPORT_KEY = "report"
    # Routing key of a pupil's job results on the reports exchange: the `reply_to` of every job
    # the master offloads. A routing key, not a queue on the default exchange, because writing to
    # the default exchange would let a node's user put messages into any queue (docs/jobs.md).
    JOB_RESULT_KEY = "job-result"
    # Routing key of submitted jobs on the jobs exchange (never a job kind's name).
    SUBMIT_KEY = "submit"
    # Routing key of teach requests on the teach exchange.
    TEACH_KEY = "teach"

    @classmethod
    def for_settings(cls, settings: Settings) -> Topology:
        """The topology a master with ``settings`` declares: its job kinds, its lesson transport."""
        broker = settings.broker
        jobs = tuple(settings.master.jobs.offloaded)
        return cls(broker.namespace, broker.quorum_queues, jobs, settings.lessons)

    def job_queue(self, kind: str) -> str:
        """The classic queue pupils doing ``kind`` share (competing consumers)."""
        return f"{self.namespace}.jobs.{kind}"

    def pupil_queue(self, node_id: str) -> str:
        """The queue one pupil consumes its lessons from."""
        return f"{self.namespace}.pupil.{node_id}"

    def control_key(self, kind: str, node_id: str) -> str:
        """Routing key of a control message, e.g. ``heartbeat.pi-7``."""
        return f"{kind}.{node_id}"

    @property
    def uses_stream(self) -> bool:
        """True if lessons go to the stream (``lessons.transport = "stream"``)."""
        return self.lessons.transport == "stream"

    def stream_arguments(self) -> dict[str, Any]:
        """The stream's declare arguments: its type and retention (by size and by age)."""
        return {
            "x-queue-type": "stream",
            "x-max-length-bytes": self.lessons.stream_max_bytes,
            "x-max-age": self.lessons.stream_max_age,
            "x-stream-max-segment-size-bytes": self.lessons.stream_segment_bytes,
        }

    def declare_lesson_stream(self, channel: BlockingChannel) -> str:
        """Declare the lesson stream bound to the lessons fanout; returns its name.

        Bound to the fanout rather than published to directly: the master's publishing does not
        change, and per-node queues still bound to the same fanout keep getting every lesson while
        a swarm moves to the stream (docs/stream.md).
        """
        name = self.lessons_stream
        try:
            channel.queue_declare(name, durable=True, arguments=self.stream_arguments())
        except pex.ChannelClosedByBroker as exc:
            raise BrokerError(
                f"cannot declare the lesson stream '{name}': {exc.reply_text}; RabbitMQ 3.9 or "
                "later is needed, and a stream declared with other retention must be deleted "
                "(or lessons.stream_* set to what it has) first"
            ) from None
        channel.queue_bind(name, self.lessons_exchange)
        return name

    def _queue_args(self, quorum: bool) -> dict[str, Any]:
        args: dict[str, Any] = {"x-dead-letter-exchange": self.dead_exchange}
        if quorum and self.quorum_queues:
            args["x-queue-type"] = "quorum"
        return args

    def declare_exchanges(self, channel: BlockingChannel) -> None:
        """Declare the six exchanges (durable)."""
        for name, kind in (
            (self.lessons_exchange, "fanout"),
            (self.jobs_exchange, "direct"),
            (self.reports_exchange, "direct"),
            (self.control_exchange, "topic"),
            (self.dead_exchange, "fanout"),
            (self.teach_exchange, "direct"),
        ):
            channel.exchange_declare(name, exchange_type=kind, durable=True)
        # The dead-letter queue itself has no DLX: a message that fails there stays there.
        channel.queue_declare(self.dead_queue, durable=True)
        channel.queue_bind(self.dead_queue, self.dead_exchange)

    def declare_master(self, channel: BlockingChannel) -> None:
        """Declare everything the master consumes: reports and control queues."""
        self.declare_exchanges(channel)
        channel.queue_declare(self.reports_queue, durable=True, arguments=self._queue_args(True))
        channel.queue_bind(self.reports_queue, self.reports_exchange, routing_key=self.REPORT_KEY)
        channel.queue_declare(self.control_queue, durable=True, arguments=self._queue_args(True))
        channel.queue_bind(self.control_queue, self.control_exchange, routing_key="#")
        channel.queue_declare(
            self.job_submissions_queue, durable=True, arguments=self._queue_args(True)
        )
        channel.queue_bind(self.job_submissions_queue, self.jobs_exchange, self.SUBMIT_KEY)
        channel.queue_declare(
            self.job_results_queue, durable=True, arguments=self._queue_args(True)
        )
        channel.queue_bind(self.job_results_queue, self.reports_exchange, self.JOB_RESULT_KEY)
        channel.queue_declare(self.teach_queue, durable=True, arguments=self._queue_args(True))
        channel.queue_bind(self.teach_queue, self.teach_exchange, self.TEACH_KEY)
        for kind in self.job_kinds:
            self.declare_job_queue(channel, kind)
        if self.uses_stream:
            self.declare_lesson_stream(channel)

    def _job_queue_args(self) -> dict[str, Any]:
        # Classic, not quorum: a pupil consumes all its kinds' queues on one channel with one
        # shared (global) prefetch window, so that it holds one job at a time instead of one per
        # kind; quorum queues refuse a global prefetch. Not replicated: a job lost with a broker
        # node is answered by the master at its deadline.
        # No dead-letter exchange: offloaded jobs carry a per-message TTL (their deadline), and an
        # expired job is one the master has answered already, not something for an operator to
        # see in the dead letters. A job a pupil cannot decode is still dead-lettered, with a
        # reason, by the consumer's own republish to the dead exchange.
        return {}

    def declare_job_queue(self, channel: BlockingChannel, kind: str) -> str:
        """Declare the shared queue of one job kind, bound to the jobs exchange; returns it."""
        queue = self.job_queue(kind)
        channel.queue_declare(queue, durable=True, arguments=self._job_queue_args())
        channel.queue_bind(queue, self.jobs_exchange, routing_key=kind)
        return queue

    def check_job_queues(self, channel: BlockingChannel, kinds: tuple[str, ...]) -> None:
        """Check, without declaring, that the master has declared the queues of ``kinds``.

        Raises :class:`BrokerError` naming the kind whose queue is missing: the master offloads
        only the kinds its policy allows, so a missing queue usually means a critical kind.
        """
        for kind in kinds:
            try:
                channel.queue_declare(self.job_queue(kind), passive=True)
            except pex.ChannelClosedByBroker as exc:
                raise BrokerError(
                    f"no job queue for kind '{kind}' ({exc.reply_text}): the master offloads only "
                    "the kinds its policy allows (master.jobs); start the master first or remove "
                    "the kind from pupil.jobs"
                ) from None

    def check_pupil_exchanges(self, channel: BlockingChannel) -> None:
        """Check that the exchanges a pupil uses exist, without declaring them.

        Passive declares need no permission at all, so a pupil's own user can run this. Checked:
        lessons (its queue binds to it), reports and control (it publishes there) and dead (its
        queue's dead-letter exchange, and where it dead-letters what it cannot decode).
        """
        for name in (
            self.lessons_exchange,
            self.reports_exchange,
            self.control_exchange,
            self.dead_exchange,
        ):
            channel.exchange_declare(name, passive=True)

    def declare_pupil(
        self, channel: BlockingChannel, node_id: str, declare_exchanges: bool = True
    ) -> str:
        """Declare one pupil's lesson queue bound to the lessons fanout; returns its name.

        Classic queue on purpose: a pupil queue has one consumer and one replica is enough;
        the master's queues, shared by the whole swarm, are the ones worth replicating.

        ``declare_exchanges=False`` only checks that the exchanges exist and leaves the
        dead-letter queue alone: a per-node user then needs `configure` on its own queue only,
        and cannot delete or redeclare what the whole swarm shares. The master declares those.
        A refusal (missing exchange, missing permission) raises :class:`BrokerError` with what
        to do: retrying cannot fix it.
        """
        queue = self.pupil_queue(node_id)
        try:
            if declare_exchanges:
                self.declare_exchanges(channel)
            else:
                self.check_pupil_exchanges(channel)
            channel.queue_declare(queue, durable=True, arguments=self._queue_args(False))
            channel.queue_bind(queue, self.lessons_exchange)
        except pex.ChannelClosedByBroker as exc:
            hint = _PUPIL_DECLARE_HINTS.get(exc.reply_code, "")
            raise BrokerError(
                f"cannot set up pupil queue '{queue}': {exc.reply_text}"
                + (f"; {hint}" if hint else "")
            ) from None
        return queue

    def declare_pupil_stream(self, channel: BlockingChannel, declare_exchanges: bool = True) -> str:
        """Set up a pupil that reads the lesson stream; returns the stream's name.

        ``declare_exchanges=False`` (a per-node user) only checks, passively, that the exchanges
        and the stream exist: the master declares them, and a node may never configure a queue
        the whole swarm reads. A refusal raises :class:`BrokerError` with what to do.
        """
        name = self.lessons_stream
        try:
            if declare_exchanges:
                self.declare_exchanges(channel)
                self.declare_lesson_stream(channel)
            else:
                self.check_pupil_exchanges(channel)
                channel.queue_declare(name, passive=True)
        except pex.ChannelClosedByBroker as exc:
            hint = _PUPIL_DECLARE_HINTS.get(exc.reply_code, "")
            raise BrokerError(
                f"cannot read the lesson stream '{name}': {exc.reply_text}"
                + (f"; {hint}" if hint else "")
            ) from None
        return name

    def declare_all(self, channel: BlockingChannel, node_ids: tuple[str, ...] = ()) -> None:
        """Declare the master's side and, if given, the lesson queues of known pupils."""
        self.declare_master(channel)
        for node_id in node_ids:
            self.declare_pupil(channel, node_id)

    def delete_all(self, channel: BlockingChannel, node_ids: tuple[str, ...] = ()) -> None:
        """Remove every exchange and queue of this namespace (tests and `demo` clean-up)."""
        queues = [self.reports_queue, self.control_queue, self.dead_queue]
        queues += [self.job_submissions_queue, self.job_results_queue, self.teach_queue]
        # Every kind of the catalogue, not only ours: pupils may have declared others' queues.
        queues += [self.job_queue(k) for k in KINDS]
        queues += [self.pupil_queue(n) for n in node_ids]
        queues.append(self.lessons_stream)
        for queue in queues:
            channel.queue_delete(queue)
        for exchange in (
            self.lessons_exchange,
            self.jobs_exchange,
            self.reports_exchange,
            self.control_exchange,
            self.dead_exchange,
            self.teach_exchange,
        ):
            channel.exchange_delete(exchange)
