"""The consumer's worker thread: run the handler, settle, batch, commit; the same for every broker.

Transport-free on purpose: :class:`~shared.broker.consumer.Consumer` (RabbitMQ) and
:class:`~shared.broker.stub.StubBroker` (memory) hand it deliveries and get back batches of
settlements to send, so a unit test on the stub runs exactly the rules production runs.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from shared.broker.connection import backoff_delays
from shared.broker.settlement import Action, Delivery, Handler, Settlement, settlement_for
from shared.errors import DependencyDown, DistillSwarmError, ReasonCode
from shared.messages import MAX_MESSAGE_BYTES

if TYPE_CHECKING:
    from shared.health import Dependency

log = logging.getLogger(__name__)

# While more deliveries wait, the settlements of handlers faster than this go to the I/O thread
# together, at most this many at a time: one wake-up and one multiple-ack frame instead of one
# each (the master ingesting reports; docs/performance.md). A slower handler's settlement (a
# pupil's lesson) is handed over at once, as is the last one before the queue runs dry.
SETTLE_BATCH_FAST_S = 0.005
SETTLE_BATCH_MAX = 64

Settled = list[tuple[Delivery, Settlement]]


class Worker:
    """Runs ``handler`` on one delivery at a time and hands over what it settled, in order."""

    def __init__(
        self,
        handler: Handler,
        stop: threading.Event,
        max_backoff_s: float,
        pause_while: Sequence[Dependency] = (),
    ) -> None:
        self._handler = handler
        self._stop = stop
        self._max_backoff_s = max_backoff_s
        # While any of these is down, no handler runs: the delivery in hand waits, unacked.
        self._pause_while = tuple(pause_while)
        # Created at the first requeue after a success, so each run of requeues backs off from
        # the start (issue 11: one iterator per process made every later requeue wait the cap).
        self._requeue_delays: Iterator[float] | None = None

    def run(
        self,
        work: queue.Queue[Delivery | None],
        current: Callable[[Delivery], bool],
        hand_over: Callable[[Settled], None],
    ) -> None:
        """Take deliveries from ``work`` until None; ``hand_over`` gets each batch settled.

        ``current(delivery)`` is False for a delivery whose channel is gone: it is skipped, and
        the broker redelivers it.
        """
        done: Settled = []
        while (delivery := work.get()) is not None:
            if not current(delivery):
                continue
            if done and not self._dependencies_up():
                # Settle what is done before waiting out an outage, which may take minutes.
                hand_over(made_durable(done))
                done = []
            started = time.monotonic()
            settlement = self.settle(delivery, current)
            if settlement is None:
                continue  # stopped, or the channel went away, while waiting: it is redelivered
            done.append((delivery, settlement))
            fast = time.monotonic() - started < SETTLE_BATCH_FAST_S
            if not (fast and len(done) < SETTLE_BATCH_MAX and not work.empty()):
                hand_over(made_durable(done))
                done = []
        if done:
            hand_over(made_durable(done))

    def settle(self, delivery: Delivery, current: Callable[[Delivery], bool]) -> Settlement | None:
        """The delivery's settlement, its handler run once every dependency is up (again).

        None if ``stop`` was set, or the delivery's channel closed, while waiting: the delivery
        is then left unsettled and the broker hands it out again.
        """
        while True:
            for dependency in self._pause_while:
                if not dependency.wait_until_up(self._stop, lambda: current(delivery)):
                    return None
            held, settlement = self._run_handler(delivery)
            if not held:
                return settlement

    def _dependencies_up(self) -> bool:
        return all(dependency.up for dependency in self._pause_while)

    def _run_handler(self, delivery: Delivery) -> tuple[bool, Settlement]:
        """(held, settlement): held is True when an outage we probe keeps the delivery."""
        if len(delivery.body) > MAX_MESSAGE_BYTES:
            # Refused before the handler sees it: an oversized body is never parsed at all.
            size = len(delivery.body)
            text = f"message is {size} bytes, over the {MAX_MESSAGE_BYTES}-byte limit"
            return False, Settlement.dead_letter(ReasonCode.TOO_LARGE, text)
        try:
            settlement = self._handler(delivery) or Settlement.ack()
        except DependencyDown as exc:
            for dependency in self._pause_while:
                if dependency.is_outage(exc):
                    dependency.mark_down(exc)
                    return True, Settlement.requeue(exc.code, str(exc))
            settlement = settlement_for(exc, delivery.redelivered)
        except Exception as exc:
            if not isinstance(exc, DistillSwarmError):
                log.exception("handler failed on message %s", delivery.message_id)
            settlement = settlement_for(exc, delivery.redelivered)
        if settlement.action is Action.ACK:
            self._requeue_delays = None  # a success: the next requeue backs off from the start
        elif settlement.action is Action.REQUEUE and settlement.code != ReasonCode.HANDLER_ERROR:
            # A handler error is requeued at once: it is dead-lettered if it fails again.
            self._back_off(delivery, settlement)
        return False, settlement

    def _back_off(self, delivery: Delivery, settlement: Settlement) -> None:
        if self._requeue_delays is None:
            self._requeue_delays = backoff_delays(self._max_backoff_s)
        delay_s = next(self._requeue_delays)
        log.warning(
            "message %s requeued in %.1f s: %s", delivery.message_id, delay_s, settlement.text
        )
        self._stop.wait(delay_s)


def made_durable(done: Settled) -> Settled:
    """Commit the pending writes the acks of ``done`` carry, each once, before they are sent.

    Runs on the worker thread. If a commit fails, the acks that carried those writes become
    requeues (code ``not_durable``): nothing is acked that is not stored.
    """
    failures: dict[int, str] = {}
    committed: set[int] = set()
    for _, settlement in done:
        pending = settlement.pending
        if pending is None or id(pending) in committed or id(pending) in failures:
            continue
        try:
            pending.commit()
        except Exception as exc:
            log.exception("could not make a batch of %d messages durable; requeueing", len(done))
            failures[id(pending)] = f"could not make the work durable: {exc!r}"
        else:
            committed.add(id(pending))
    if not failures:
        return done
    return [
        (d, Settlement.requeue(ReasonCode.NOT_DURABLE, failures[id(s.pending)]))
        if s.pending is not None and id(s.pending) in failures
        else (d, s)
        for d, s in done
    ]
