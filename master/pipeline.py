"""Making and publishing lessons: N answers in flight, published in order, confirms windowed.

What "order" means (docs/decisions.md §32): lesson ids do not depend on timing (prompt id + master
model + rendered prompt), and lessons are *published in the order of their work*, the prompt
set's order (then teach requests in the order they arrived), whatever order the model server
finishes them in. The master asks for up to ``master.generate_in_flight`` answers at once and
keeps twice that many lessons ahead, so a slow answer holds up publishing, not the model
server. Why this order and not completion order: a pupil learns lessons in the order it gets
them (its replay buffer, its study rounds, a stream offset in its journal), so the same prompt
set gives every node, every run and every restart the same curriculum; and a restarted master
republishes nothing, since it skips what the store marks published, whatever the order.

Threads: :meth:`LessonPipeline.run` runs on the caller's (the master's publisher) thread, which
alone publishes and marks lessons published; the answers are made on a pool of
``generate_in_flight`` threads, each with its own store connection.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime

from master.prompts import PromptItem
from master.store import Store
from master.teacher import Made, Teacher
from shared.broker import WindowedPublisher
from shared.errors import ConnectionClosed
from shared.health import Dependency
from shared.messages import Lesson, encode
from shared.metrics import MasterMetrics

log = logging.getLogger(__name__)

# How long the publisher thread waits for the next answer before it takes confirms again
# (an answer that arrives wakes it at once).
ANSWER_POLL_S = 0.05
# Lessons kept in the making per answer in flight: the head of the line may be slow.
LOOKAHEAD_PER_SLOT = 2
# Ready lessons stored in one transaction, at most (one commit each was a tenth of a fast run).
SAVE_BATCH_MAX = 64


@dataclass(frozen=True)
class Work:
    """One lesson to make and publish, and whom to tell (on the publisher thread)."""

    item: PromptItem
    seq: int
    # The master's answer when it has one already (a job it answered itself).
    answer: str | None = None
    # Called with the lesson and True once the broker confirmed it, or False when an earlier
    # run (or request) had published it already and nothing was sent.
    on_done: Callable[[Lesson, bool], None] | None = None
    # Called instead when making the lesson failed; None: the error ends the run.
    on_failed: Callable[[Exception], None] | None = None


@dataclass
class _Outstanding:
    """A lesson handed to the publisher (or found published), until its caller is told."""

    work: Work
    lesson: Lesson
    started_at: str | None  # when its publish began; None: published by an earlier run
    confirmed: bool = False

    def confirm(self) -> None:
        # The publisher's callback, on the publisher thread: this very lesson is confirmed.
        self.confirmed = True


class LessonPipeline:
    """Makes lessons with answers in flight and publishes them in order of their work."""

    def __init__(
        self,
        teacher: Teacher,
        model: Dependency,
        store: Store,
        metrics: MasterMetrics,
        exchange: str,
        in_flight: int,
        stop: threading.Event,
    ) -> None:
        self._teacher = teacher
        self._model = model
        self._store = store
        self._metrics = metrics
        self._exchange = exchange
        self.in_flight = in_flight
        self._stop = stop
        self._outstanding: deque[_Outstanding] = deque()

    def run(self, work: Iterable[Work], publisher: WindowedPublisher) -> bool:
        """Make and publish every piece of ``work``; False if ``stop`` was set first.

        Returns once every lesson sent is confirmed (and marked published). Raises what making
        a lesson raised when its work has no ``on_failed``, and the publisher's errors.
        """
        pool = ThreadPoolExecutor(self.in_flight, thread_name_prefix="lesson")
        ahead: deque[tuple[Work, Future[Made | tuple[Lesson, bool] | None]]] = deque()
        source = iter(work)
        self._outstanding.clear()
        try:
            while not self._stop.is_set():
                while len(ahead) < self.in_flight * LOOKAHEAD_PER_SLOT:
                    more = next(source, None)
                    if more is None:
                        break
                    ahead.append((more, pool.submit(self._make, more)))
                if not ahead:
                    break
                if not self._wait(ahead[0][1], publisher):
                    return False
                # The head and every answer ready behind it: stored in one transaction.
                ready = [ahead.popleft()]
                while ahead and ahead[0][1].done() and len(ready) < SAVE_BATCH_MAX:
                    ready.append(ahead.popleft())
                if not self._handle(ready, publisher):
                    return False
            if self._stop.is_set():
                return False
            publisher.flush()
            self._mark_confirmed()
            return True
        except ConnectionClosed:
            if self._stop.is_set():
                return False  # stopped while waiting for the broker: unconfirmed stay unmarked
            raise
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _handle(
        self,
        ready: list[tuple[Work, Future[Made | tuple[Lesson, bool] | None]]],
        publisher: WindowedPublisher,
    ) -> bool:
        """Store what was made, then publish in order; False if stopped while the model was down."""
        to_send: list[tuple[Work, Lesson]] = []
        batch = self._store.write_batch()
        try:
            for item, future in ready:
                try:
                    made = future.result()
                except Exception as exc:
                    if item.on_failed is None:
                        raise
                    item.on_failed(exc)
                    continue
                if made is None:
                    return False  # stopped while the model was down
                if isinstance(made, Made):
                    with batch.message():
                        self._teacher.save(made, item.item, item.seq)
                    to_send.append((item, made.lesson))
                    continue
                lesson, published = made
                if published:  # an earlier run (or request) published it: nothing to send
                    self._outstanding.append(_Outstanding(item, lesson, None, True))
                else:
                    to_send.append((item, lesson))  # stored, never confirmed: send it now
        finally:
            batch.commit()  # stored before any of them is sent
        for item, lesson in to_send:
            self._publish(item, lesson, publisher)
        self._mark_confirmed()
        return True

    def _make(self, work: Work) -> Made | tuple[Lesson, bool] | None:
        """On a pool thread: the stored lesson and whether it was published, or a new one made
        (not stored: the publisher thread stores it, so the pool never waits for SQLite's write
        lock). Waits out an outage of the master's model: made once it is back."""
        found = self._teacher.find(work.item)
        if found is not None:
            return found
        make = functools.partial(self._teacher.make, work.item, work.answer)
        return self._model.call(make, self._stop)

    def _wait(
        self, future: Future[Made | tuple[Lesson, bool] | None], publisher: WindowedPublisher
    ) -> bool:
        """Wait for ``future``, taking confirms meanwhile; False if stopped first."""
        while not future.done():
            publisher.poll()
            self._mark_confirmed()
            if futures.wait([future], timeout=ANSWER_POLL_S).done:
                break
            if self._stop.is_set():
                return False
        return True

    def _publish(self, work: Work, lesson: Lesson, publisher: WindowedPublisher) -> None:
        # Taken before publishing: a node heard from before now has its queue bound.
        entry = _Outstanding(work, lesson, datetime.now(UTC).isoformat())
        self._outstanding.append(entry)
        publisher.publish(self._exchange, "", encode(lesson), lesson.lesson_id, entry.confirm)

    def _mark_confirmed(self) -> None:
        """Mark what the broker confirmed, in one transaction, then tell each work's caller.

        In order of the work: a lesson found published already waits behind the lessons before
        it that are still unconfirmed, so callers hear of their lessons in prompt order.
        """
        done: list[_Outstanding] = []
        while self._outstanding and self._outstanding[0].confirmed:
            done.append(self._outstanding.popleft())
        sent = [entry for entry in done if entry.started_at is not None]
        if sent:
            batch = self._store.write_batch()
            for entry in sent:
                with batch.message():
                    self._store.mark_published(entry.lesson.lesson_id, entry.started_at)
            batch.commit()
            self._metrics.lessons_published.inc(len(sent))
        for entry in done:
            if entry.work.on_done is not None:
                entry.work.on_done(entry.lesson, entry.started_at is not None)
