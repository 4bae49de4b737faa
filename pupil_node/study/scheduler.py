"""When a pupil studies, and what happens to what it learned: rounds, promotion, serving.

A background thread of the pupil service (never the lesson or job worker) decides when to run a
round and runs it in a child process (:mod:`pupil_node.study.worker`):
1. a round is due after ``study.every_lessons`` new train lessons, or when no lesson came for
   ``study.idle_s`` and at least one new train lesson waits; never before ``study.min_lessons``;
2. the child trains the LoRA on the node's newest train lessons (resuming from the served
   adapter), measures the validation loss of the served adapter and of the new one on the same
   held-out slice of *train* lessons, and exports the new one as a llama.cpp GGUF;
3. the new version is promoted (served from the next generation on) only if its validation loss
   is lower; otherwise the served one stays and the log says why.
Lessons keep being answered, journalled and acked while a round runs.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pupil_node.study.data import StudyLesson
from pupil_node.study.round import ROUND_FILE, StudySettings
from pupil_node.study.train import TARGETS, TrainSettings
from pupil_node.study.versions import AdapterStore, AdapterVersion
from pupil_node.study.worker import RoundRequest, settings_to_json, write_lessons
from shared.config import StudyConfig
from shared.study_metrics import StudyMetrics

log = logging.getLogger(__name__)

SCHEDULE_FILE = "schedule.json"
# How often the thread checks whether a round is due (and whether it was asked to stop).
CHECK_INTERVAL_S = 5.0
# A child asked to stop gets this long to exit before it is killed.
STOP_GRACE_S = 10.0


@dataclass(frozen=True)
class RoundOutcome:
    """What one round did: ``promoted``, ``rejected`` or ``failed``, with its figures."""

    outcome: str
    version: int | None
    val_loss_before: float | None = None
    val_loss_after: float | None = None
    seconds: float = 0.0
    peak_rss: int | None = None
    reason: str = ""


class StudyScheduler:
    """Runs study rounds for one node in the background and serves what improves."""

    def __init__(
        self,
        config: StudyConfig,
        store: AdapterStore,
        lessons: Callable[[int], list[StudyLesson]],
        settings: StudySettings,
        on_promote: Callable[[AdapterVersion], None],
        metrics: StudyMetrics | None = None,
    ) -> None:
        """``lessons(n)``: the node's newest ``n`` train lessons (never an eval lesson)."""
        self.config = config
        self.store = store
        self._lessons = lessons
        self.settings = settings
        self._on_promote = on_promote
        self.metrics = metrics
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._child: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._new_train_lessons = 0
        # Clear while a round runs: an exam waits for it (see wait_for_round).
        self._not_studying = threading.Event()
        self._not_studying.set()
        self._last_lesson_at = time.monotonic()
        self._schedule_path = store.root / SCHEDULE_FILE
        self.rounds = self._read_schedule()

    # -- what the lesson flow tells us (any thread) ----------------------------------------

    def lesson_done(self, trained: bool) -> None:
        """Note a finished lesson (``trained``: a train lesson that is now in the memory)."""
        with self._lock:
            self._last_lesson_at = time.monotonic()
            if trained:
                self._new_train_lessons += 1
                if self._new_train_lessons >= self.config.every_lessons:
                    self._wake.set()

    # -- the background thread -------------------------------------------------------------

    def start(self) -> None:
        """Start the background thread (a daemon; :meth:`stop` ends it)."""
        self._thread = threading.Thread(target=self._loop, name="study", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread; a round in progress is cut short and its files discarded."""
        self._stop.set()
        self._wake.set()
        child = self._child
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)
        if self._thread is not None:
            self._thread.join(timeout=STOP_GRACE_S + 5)

    def wait_for_round(self, timeout_s: float) -> bool:
        """Block until no round runs (at most ``timeout_s``); False if one still runs.

        An exam is answered with the node's final model: a round that the curriculum's last
        lessons started is let finish (and promoted, if better) first.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            # A round the last lessons made due may not have started yet: give the thread a
            # moment to start it.
            start_by = time.monotonic() + 2 * CHECK_INTERVAL_S
            while (
                self._not_studying.is_set() and self._due_by_count() and time.monotonic() < start_by
            ):
                time.sleep(0.1)
            if self._not_studying.is_set():
                return True  # nothing runs, and nothing is about to
            if not self._not_studying.wait(max(0.0, deadline - time.monotonic())):
                return False
            # The round ended; lessons that came in while it ran may have made the next one due
            # (bench/lora_swarm.py: round 2 is due the moment round 1 ends): wait for that too.

    def _due_by_count(self) -> bool:
        with self._lock:
            return self._new_train_lessons >= self.config.every_lessons

    def due(self) -> bool:
        """True when a round should start now (see the module docstring)."""
        with self._lock:
            new, idle_s = self._new_train_lessons, time.monotonic() - self._last_lesson_at
        if new == 0:
            return False
        return new >= self.config.every_lessons or idle_s >= self.config.idle_s

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(CHECK_INTERVAL_S)
            self._wake.clear()
            if self._stop.is_set() or not self.due():
                continue
            try:
                self.run_round()
            except Exception:
                # A bug in one round must not end studying for good, nor the node.
                log.exception("study round failed unexpectedly")

    # -- one round -------------------------------------------------------------------------

    def run_round(self) -> RoundOutcome | None:
        """Run one round now (None if the node has too few train lessons); see the docstring."""
        lessons = self._lessons(self.config.max_lessons)
        with self._lock:
            counted = self._new_train_lessons
        if len(lessons) < self.config.min_lessons:
            log.info(
                "study: %d train lessons, waiting for %d before the first round",
                len(lessons),
                self.config.min_lessons,
            )
            with self._lock:
                self._new_train_lessons -= counted  # ask again after more lessons, not at once
            return None
        served = self.store.served()
        self._not_studying.clear()
        self.rounds += 1
        candidate = self.store.candidate_dir(self.rounds)
        log.info(
            "study round %d: %d train lessons, from %s",
            self.rounds,
            len(lessons),
            f"LoRA v{served.version}" if served else "the base model",
        )
        if self.metrics is not None:
            self.metrics.studying.set(1)
        started = time.monotonic()
        try:
            error = self._run_child(candidate, lessons, served)
            return self._conclude(candidate, served, counted, started, error)
        finally:
            if self.metrics is not None:
                self.metrics.studying.set(0)
            self._not_studying.set()

    def _conclude(
        self,
        candidate: Path,
        served: AdapterVersion | None,
        counted: int,
        started: float,
        error: str | None,
    ) -> RoundOutcome:
        """Promote, reject or discard a finished round's candidate."""
        with self._lock:
            self._new_train_lessons -= counted
        self._write_schedule()
        seconds = time.monotonic() - started
        if error is not None:
            self.store.discard(candidate)
            return self._finish(RoundOutcome("failed", None, seconds=seconds, reason=error))
        result = json.loads((candidate / ROUND_FILE).read_text())
        before, after = float(result["val_loss_before"]), float(result["val_loss_after"])
        version, rss = int(result["version"]), int(result["peak_rss"])
        if self.metrics is not None:
            self.metrics.val_loss.labels("candidate").set(after)
        if after >= before:
            self.store.discard(candidate)
            keeping = f"LoRA v{served.version}" if served else "the base model"
            reason = f"validation loss {after:.4f} is not below {before:.4f}; keeping {keeping}"
            return self._finish(
                RoundOutcome("rejected", version, before, after, seconds, rss, reason)
            )
        promoted = self.store.promote(candidate, version)
        self._on_promote(promoted)
        if self.metrics is not None:
            self.metrics.lora_version.set(promoted.version)
            self.metrics.val_loss.labels("served").set(after)
        reason = f"validation loss {before:.4f} -> {after:.4f}"
        return self._finish(RoundOutcome("promoted", version, before, after, seconds, rss, reason))

    def _finish(self, outcome: RoundOutcome) -> RoundOutcome:
        if self.metrics is not None:
            self.metrics.rounds.labels(outcome.outcome).inc()
            self.metrics.round_seconds.observe(outcome.seconds)
            if outcome.peak_rss is not None:
                self.metrics.peak_rss.set(outcome.peak_rss)
        rss = "" if outcome.peak_rss is None else f", peak RSS {outcome.peak_rss / 2**30:.2f} GiB"
        level = logging.WARNING if outcome.outcome == "failed" else logging.INFO
        log.log(
            level,
            "study round %d %s%s: %s (%.0fs%s)",
            self.rounds,
            outcome.outcome,
            "" if outcome.version is None else f" (LoRA v{outcome.version})",
            outcome.reason,
            outcome.seconds,
            rss,
        )
        return outcome

    def _run_child(
        self, candidate: Path, lessons: list[StudyLesson], served: AdapterVersion | None
    ) -> str | None:
        """Run the worker process; None on success, else a one-line reason."""
        lessons_file = candidate / "lessons.jsonl"
        write_lessons(lessons_file, lessons)
        request = RoundRequest(
            lessons_file=str(lessons_file),
            out_dir=str(candidate),
            previous_adapter_dir=None if served is None else str(served.peft_dir),
            settings=settings_to_json(self.settings),
            nice=self.config.nice,
        )
        request_file = candidate / "request.json"
        request.write(request_file)
        command = [sys.executable, "-m", "pupil_node.study.worker", str(request_file)]
        with (candidate / "round.log").open("wb") as round_log:
            self._child = subprocess.Popen(command, stdout=round_log, stderr=subprocess.STDOUT)
            try:
                code = self._child.wait(timeout=self.config.round_timeout_s)
            except subprocess.TimeoutExpired:
                self._child.kill()
                self._child.wait()
                return (
                    f"the round ran over study.round_timeout_s ({self.config.round_timeout_s:.0f}s)"
                )
            finally:
                child, self._child = self._child, None
        if self._stop.is_set():
            return "the node is stopping"
        if code != 0:
            return _last_error(candidate / "round.log") or f"the round's process exited {code}"
        if child is not None and not (candidate / ROUND_FILE).exists():
            return "the round's process wrote no round.json"
        return None

    # -- the schedule file -----------------------------------------------------------------

    def _read_schedule(self) -> int:
        try:
            return int(json.loads(self._schedule_path.read_text())["rounds"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def _write_schedule(self) -> None:
        partial = self._schedule_path.with_suffix(".partial")
        partial.write_text(json.dumps({"rounds": self.rounds}) + "\n")
        os.replace(partial, self._schedule_path)


def _last_error(log_file: Path) -> str | None:
    lines = log_file.read_text(errors="replace").splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    return errors[-1].removeprefix("error: ") if errors else (lines[-1] if lines else None)


def study_settings(
    config: StudyConfig, base_gguf: Path | None, cache_dir: Path, template: str, system: str | None
) -> StudySettings:
    """The round settings of a node's ``[pupil.study]`` section."""
    threads = config.threads or max(1, (os.cpu_count() or 2) - 1)
    train = TrainSettings(
        rank=config.rank,
        alpha=config.alpha,
        learning_rate=config.learning_rate,
        batch_size=config.batch_size,
        epochs=config.epochs,
        max_steps=config.max_steps,
        threads=threads,
        target_modules=TARGETS[config.targets],
    )
    return StudySettings(
        train=train,
        base_gguf=base_gguf,
        cache_dir=cache_dir,
        max_len=config.max_len,
        validation_fraction=config.validation_fraction,
        template=template,
        system=system,
    )
