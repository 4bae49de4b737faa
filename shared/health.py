"""Dependencies a service's work needs, and pausing intake while one is down.

A :class:`Dependency` is something the work cannot do without (today: the model server). When
work fails with one of its outage errors (:class:`shared.errors.DependencyDown`, e.g.
``ModelDown``), the caller marks it down; from then on:

- one prober thread per dependency asks it (a cheap ``probe``) whether it is back, with capped,
  jittered exponential backoff that starts afresh with every outage;
- every consumer that pauses on it (``pause_while`` of a consumer) keeps the message it holds
  unacked, takes no new ones, and retries the held one once the probe succeeds;
- other callers (the master's lesson publisher and job answerer) wait with :meth:`Dependency.call`;
- listeners (metrics, the node state a pupil sends in its heartbeats) hear of each change.

The mechanism knows nothing about models: any "pause intake while X is down" (a later adapter
runtime, a disk) is one more Dependency with its own probe and its own error classes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from shared.broker import backoff_delays
from shared.errors import DependencyDown, one_line

log = logging.getLogger(__name__)

T = TypeVar("T")
# How often a waiter re-checks its stop flag (and whether it still wants to wait).
WAIT_POLL_S = 0.2

Listener = Callable[[bool, str], None]


class Dependency:
    """Something the work needs that may go down: its state, its prober, its waiters.

    Args:
        name: what it is, for logs (``"model"``).
        probe: raises while the dependency is down, returns when it is up. Called from the
            prober thread only, never while the dependency is up.
        errors: the exception classes that mean "it is down" rather than "this message is bad".
        probe_base_s, probe_max_s: the probe backoff's first step and its cap, in seconds.
    """

    def __init__(
        self,
        name: str,
        probe: Callable[[], None],
        errors: tuple[type[BaseException], ...] = (DependencyDown,),
        *,
        probe_base_s: float = 0.5,
        probe_max_s: float = 15.0,
    ) -> None:
        self.name = name
        self.errors = errors
        self._probe = probe
        self._probe_base_s = probe_base_s
        self._probe_max_s = probe_max_s
        self._up = threading.Event()
        self._up.set()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._listeners: list[Listener] = []
        self._down_since = 0.0
        self.reason = ""
        self.outages = 0

    @property
    def up(self) -> bool:
        """True unless an outage is in progress."""
        return self._up.is_set()

    def on_change(self, listener: Listener) -> None:
        """Call ``listener(up, reason)`` on every change, on the thread that made it."""
        self._listeners.append(listener)

    def is_outage(self, exc: BaseException) -> bool:
        """True if ``exc`` means this dependency is down."""
        return isinstance(exc, self.errors)

    def mark_down(self, exc: BaseException | str) -> None:
        """Note an outage (a no-op if one is already in progress) and start probing."""
        reason = one_line(str(exc))
        with self._lock:
            if not self._up.is_set():
                return
            self._up.clear()
            self._down_since = time.monotonic()
            self.reason = reason
            self.outages += 1
            threading.Thread(
                target=self._probe_until_up, name=f"probe-{self.name}", daemon=True
            ).start()
        log.warning(
            "%s down: %s; pausing intake, probing every %g-%g s", self.name, reason,
            self._probe_base_s, self._probe_max_s,
        )  # fmt: skip
        self._notify(False, reason)

    def _probe_until_up(self) -> None:
        # A fresh backoff per outage: the previous outage's long delays do not carry over.
        for delay_s in backoff_delays(self._probe_max_s, self._probe_base_s):
            if self._closed.wait(delay_s):
                return
            try:
                self._probe()
            except Exception as exc:
                log.info("%s still down: %s", self.name, one_line(str(exc)))
                continue
            with self._lock:
                down_s = time.monotonic() - self._down_since
                self.reason = ""
                self._up.set()
            log.warning("%s back after %.1f s; resuming intake", self.name, down_s)
            self._notify(True, "")
            return

    def _notify(self, up: bool, reason: str) -> None:
        for listener in self._listeners:
            try:
                listener(up, reason)
            except Exception:
                log.exception("a listener of %s failed", self.name)

    def wait_until_up(
        self, stop: threading.Event, still_wanted: Callable[[], bool] = lambda: True
    ) -> bool:
        """Block until the dependency is up; False if ``stop`` is set or ``still_wanted()`` fails.

        ``still_wanted`` lets a consumer give up on a delivery whose channel is gone (the broker
        redelivers it), instead of holding it for the whole outage.
        """
        while not self._up.wait(WAIT_POLL_S):
            if stop.is_set() or not still_wanted():
                return False
        return not stop.is_set()

    def call(self, work: Callable[[], T], stop: threading.Event) -> T | None:
        """Run ``work``; while it fails with an outage, wait for the dependency and run it again.

        Returns None only if ``stop`` was set while waiting. Other exceptions propagate.
        """
        while True:
            if not self.wait_until_up(stop):
                return None
            try:
                return work()
            except self.errors as exc:
                self.mark_down(exc)

    def close(self) -> None:
        """Stop the prober (waiters then return only when their own stop is set)."""
        self._closed.set()
