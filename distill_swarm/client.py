"""Submit jobs to the swarm from Python: ``submit`` (blocking) and ``submit_async`` (asyncio).

    from distill_swarm.client import JobClient

    with JobClient(settings) as client:
        result = client.submit("translation", {"text": "Good morning", "language": "French"})
        print(result.output, "by", result.answered_by)

    # or, in a coroutine:
        result = await client.submit_async("summarisation", long_text)

A payload is the job's text, or a mapping with ``text`` and the kind's parameters (see
``shared.jobs.KINDS``). The job goes to the master, which answers it itself (critical kinds,
missed deadlines, failed pupils) or has a pupil answer it; the :class:`JobResult` says who
answered, how long it took, and why the master stepped in if it did.

One client holds one broker connection on a background thread, with an exclusive reply queue,
and can have many jobs in flight from many threads or tasks at once.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pika
import pika.exceptions as pex

from shared.broker import close_quietly, connect, properties
from shared.config import Settings
from shared.errors import ConnectionClosed, DecodeError, DistillSwarmError, PublishNotConfirmed
from shared.jobs import render_goal
from shared.messages import Job, JobResult, decode, encode, new_id
from shared.topology import Topology

log = logging.getLogger(__name__)

# How long a submitter waits beyond the deadline for the master's own answer by default: the
# master model answers a fallback after the deadline, and on a CPU that takes a while.
DEFAULT_GRACE_S = 300.0
POLL_S = 0.05

Payload = str | Mapping[str, str]


class JobFailed(DistillSwarmError):
    """The swarm answered the job with an error; ``result`` holds the whole answer."""

    def __init__(self, result: JobResult) -> None:
        super().__init__(result.error or "job failed")
        self.result = result


def _checked(result: JobResult) -> JobResult:
    if result.error is not None:
        raise JobFailed(result)
    return result


def _reason(exc: Exception) -> str:
    if isinstance(exc, pex.ChannelClosedByBroker):
        return str(exc.reply_text)
    return "unroutable" if isinstance(exc, pex.UnroutableError) else "refused by the broker"


def split_payload(payload: Payload) -> tuple[str, dict[str, str]]:
    """(text, params) from a payload: a plain text, or a mapping with ``text`` and params."""
    if isinstance(payload, str):
        return payload, {}
    params = {str(k): str(v) for k, v in payload.items()}
    text = params.pop("text", "")
    return text, params


@dataclass
class _Outgoing:
    job: Job
    future: Future[JobResult]


class JobClient:
    """A connection to the swarm for submitting jobs; use as a context manager or ``close()``."""

    def __init__(self, settings: Settings, grace_s: float = DEFAULT_GRACE_S) -> None:
        self.settings = settings
        self.topology = Topology(settings.broker.namespace, settings.broker.quorum_queues)
        self.grace_s = grace_s
        self._outbox: queue.Queue[_Outgoing] = queue.Queue()
        self._waiting: dict[str, Future[JobResult]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._io_loop, name="job-client", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def __enter__(self) -> JobClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection; jobs still waiting fail with ConnectionClosed."""
        self._stop.set()
        self._thread.join(timeout=10)

    # -- submitting ------------------------------------------------------------------------

    def submit_future(
        self,
        kind: str,
        payload: Payload,
        deadline_s: float | None = None,
        job_id: str | None = None,
    ) -> Future[JobResult]:
        """Send a job; the future resolves to its :class:`JobResult` (errors included).

        Raises InvalidJob at once if the kind is unknown or the payload incomplete, so a typo
        never travels to the master.
        """
        text, params = split_payload(payload)
        render_goal(kind, text, params)
        seconds = deadline_s or self.settings.master.jobs.default_deadline_s
        job = Job(
            job_id=job_id or new_id(),
            job_kind=kind,
            text=text,
            params=params,
            deadline=datetime.now(UTC) + timedelta(seconds=seconds),
        )
        future: Future[JobResult] = Future()
        if self._stop.is_set() or not self._thread.is_alive():
            raise ConnectionClosed("this JobClient is closed")
        self._outbox.put(_Outgoing(job, future))
        return future

    def submit(
        self,
        kind: str,
        payload: Payload,
        deadline_s: float | None = None,
        timeout_s: float | None = None,
    ) -> JobResult:
        """Submit a job and wait for its answer.

        Waits ``timeout_s`` at most (default: the deadline plus ``grace_s`` for the master's own
        answer). Raises JobFailed when the answer is an error, TimeoutError when none came.
        """
        future, wait_s = self._submit_and_wait_s(kind, payload, deadline_s, timeout_s)
        return _checked(future.result(timeout=wait_s))

    async def submit_async(
        self,
        kind: str,
        payload: Payload,
        deadline_s: float | None = None,
        timeout_s: float | None = None,
    ) -> JobResult:
        """:meth:`submit` for asyncio: awaits the answer without blocking the event loop."""
        future, wait_s = self._submit_and_wait_s(kind, payload, deadline_s, timeout_s)
        return _checked(await asyncio.wait_for(asyncio.wrap_future(future), timeout=wait_s))

    def _submit_and_wait_s(
        self, kind: str, payload: Payload, deadline_s: float | None, timeout_s: float | None
    ) -> tuple[Future[JobResult], float]:
        # The submitter waits for the deadline, then for the master's own answer (grace_s).
        seconds = deadline_s or self.settings.master.jobs.default_deadline_s
        return self.submit_future(kind, payload, seconds), timeout_s or seconds + self.grace_s

    # -- the connection (background thread) -----------------------------------------------

    def _io_loop(self) -> None:
        connection = None
        try:
            connection = connect(self.settings.broker, self._stop)
            # The reply queue belongs to the connection (exclusive: deleted with it), not to a
            # channel, and is not auto-delete: it must outlive a channel the broker closes (a
            # publish to a missing exchange), and each new channel consumes it again.
            reply_queue = connection.channel().queue_declare("", exclusive=True).method.queue
            channel = self._open_channel(connection, reply_queue)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            close_quietly(connection)
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                if not self._send_outbox(channel, reply_queue):
                    channel = self._open_channel(connection, reply_queue)
                connection.process_data_events(time_limit=POLL_S)
        except (pex.AMQPError, ConnectionError) as exc:
            log.warning("job client lost the broker: %r", exc)
        finally:
            self._stop.set()
            self._fail_all(ConnectionClosed("the job client's broker connection is closed"))
            close_quietly(connection)

    def _open_channel(self, connection: Any, reply_queue: str) -> Any:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_consume(reply_queue, self._on_reply, auto_ack=True)
        return channel

    def _send_outbox(self, channel: Any, reply_queue: str) -> bool:
        """Publish every queued job; False if the broker closed the channel doing so."""
        while True:
            try:
                item = self._outbox.get_nowait()
            except queue.Empty:
                return True
            with self._lock:
                self._waiting[item.job.job_id] = item.future
            try:
                channel.basic_publish(
                    self.topology.jobs_exchange,
                    self.topology.SUBMIT_KEY,
                    encode(item.job),
                    properties(
                        item.job.message_id,
                        reply_to=reply_queue,
                        correlation_id=item.job.job_id,
                    ),
                    mandatory=True,
                )
            except (pex.UnroutableError, pex.NackError, pex.ChannelClosedByBroker) as exc:
                self._resolve_error(
                    item.job.job_id,
                    PublishNotConfirmed(
                        f"no master takes jobs on '{self.topology.jobs_exchange}' "
                        f"({_reason(exc)}): start the master first (it declares the job queues)"
                    ),
                )
                if isinstance(exc, pex.ChannelClosedByBroker):
                    return False

    def _on_reply(
        self, _channel: Any, _method: Any, props: pika.BasicProperties, body: bytes
    ) -> None:
        try:
            result = decode(body, JobResult)
        except DecodeError as exc:
            log.warning("unreadable job result ignored: %s", exc)
            return
        with self._lock:
            future = self._waiting.pop(props.correlation_id or result.job_id, None)
        if future is not None and not future.done():
            future.set_result(result)

    def _resolve_error(self, job_id: str, error: BaseException) -> None:
        with self._lock:
            future = self._waiting.pop(job_id, None)
        if future is not None and not future.done():
            future.set_exception(error)

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            waiting, self._waiting = self._waiting, {}
        while True:
            try:
                waiting[new_id()] = self._outbox.get_nowait().future
            except queue.Empty:
                break
        for future in waiting.values():
            if not future.done():
                future.set_exception(error)
