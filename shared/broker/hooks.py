"""The callbacks a consumer makes besides the handler, in the style of Dramatiq's middleware.

Subclass :class:`ConsumerHooks` and override what you need; every hook has a no-op default.
Hooks on the I/O thread must return quickly: while they run, no heartbeat is answered.
"""

from __future__ import annotations

from shared.broker.settlement import Delivery, Settlement


class ConsumerHooks:
    """What a service hears from its consumer, each hook on the thread its docstring names."""

    # Seconds between two calls of on_tick.
    tick_interval_s: float = 5.0

    def on_tick(self) -> None:
        """I/O thread, about every ``tick_interval_s`` while connected: housekeeping (is the run
        complete, has its deadline passed). Setting the consumer's ``stop`` here ends it."""

    def on_rejected(self, delivery: Delivery, settlement: Settlement) -> None:
        """I/O thread, once a delivery was dead-lettered (our republish confirmed and the
        original acked, or, if the republish was refused, nacked to RabbitMQ's own DLX)."""
