"""Benchmark: what a pupil node costs per lesson around its model, pinned to one core.

Runs the real :class:`~pupil_node.service.PupilService` and :class:`~pupil_node.node.PupilNode`
against the real broker, with the benchmark-only fast backend in place of the models, on one CPU
core (``os.sched_setaffinity`` before torch is imported, so every thread, torch's included, is on
that core). Lessons are queued up front in the node's queue; the node then decodes each, answers
and embeds it (fast backend), measures similarity, trains both adapters, writes both checkpoints,
remembers the lesson, journals it, publishes its report (confirmed) and acks.

    .venv/bin/python bench/overhead.py [--lessons 300] [--dim 384] [--core 0] [--profile FILE]

Per-lesson overhead = time from the delivery reaching the consumer to the ack being written,
minus the time spent inside the generator's and the embedder's calls (measured around each
call; the fast backend costs microseconds, and subtracting it leaves exactly what the framework
adds around a real model). The breakdown attributes each part's *exclusive* time (a part nested
in another is not counted twice); "other" is whatever the handler did outside every measured
part (logging, glue). The first ``--warmup`` lessons are not counted.

By default the node starts as a node that has run for a while: both replay buffers full (512
pairs) and 512 lessons in its retrieval memory, so checkpoints have their steady-state size.
``--fresh`` starts from an empty state instead. Every 4th lesson is an eval lesson (the master's
default split) unless ``--eval-every`` says otherwise; eval lessons train nothing but answer by
each guidance method (model calls, excluded) and search the memory.

Target (issue #6): at most 30 ms median per lesson. docs/performance.md has measured figures.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from harness import (
    bench_namespace,
    broker_config,
    format_table,
    make_lessons,
    median,
    percentile,
    queue_lessons,
    throwaway_topology,
)

TARGET_MS = 30.0
NODE_ID = "overhead-1"
MODEL_PARTS = ("generate", "embed")
# Table order of the measured parts; "other" and the model calls come last.
PARTS = (
    "queue hop",
    "decode",
    "prompt render",
    "similarity",
    "train",
    "checkpoint",
    "memory",
    "report encode",
    "journal",
    "metrics",
    "report publish",
    "ack",
)
F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class LessonTiming:
    """One lesson's measured parts (exclusive seconds) and its wall-clock span."""

    split: str = "train"
    arrived: float = 0.0
    handler_started: float = 0.0
    handler_ended: float = 0.0
    acked: float = 0.0
    parts: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    @property
    def total_s(self) -> float:
        return self.acked - self.arrived

    @property
    def overhead_s(self) -> float:
        return self.total_s - sum(self.parts[p] for p in MODEL_PARTS)

    def breakdown(self) -> dict[str, float]:
        """Every part in seconds, with the queue hop, the ack and "other" derived."""
        parts = dict(self.parts)
        parts["queue hop"] = self.handler_started - self.arrived
        parts["ack"] = self.acked - self.handler_ended
        handler = self.handler_ended - self.handler_started
        parts["other"] = handler - sum(self.parts.values())
        return parts


@dataclass
class _Frame:
    """A timed call in progress: when it started, and the time spent in parts nested in it."""

    started: float
    nested: float = 0.0


class Clock:
    """Exclusive timing of nested parts on the consumer's worker thread; arrivals and acks."""

    def __init__(self) -> None:
        self.current = LessonTiming()
        self.done: list[LessonTiming] = []
        self._stack: list[_Frame] = []
        self._arrivals: dict[int, float] = {}
        self._lock = threading.Lock()

    def timed(self, part: str, function: F, *, worker_only: bool = False) -> F:
        """``function`` wrapped to add its exclusive time to ``part`` of the current lesson."""

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if worker_only and threading.current_thread().name != "consumer-worker":
                return function(*args, **kwargs)
            frame = _Frame(time.perf_counter())
            self._stack.append(frame)
            try:
                return function(*args, **kwargs)
            finally:
                self._stack.pop()
                elapsed = time.perf_counter() - frame.started
                self.current.parts[part] += elapsed - frame.nested
                if self._stack:
                    self._stack[-1].nested += elapsed

        return wrapper  # type: ignore[return-value]

    def arrived(self, delivery_tag: int) -> None:
        with self._lock:
            self._arrivals[delivery_tag] = time.perf_counter()

    def handler_started(self, delivery_tag: int, split: str) -> None:
        with self._lock:
            arrived = self._arrivals.pop(delivery_tag)
        self.current = LessonTiming(split=split, arrived=arrived)
        self.current.handler_started = time.perf_counter()

    def handler_ended(self) -> None:
        self.current.handler_ended = time.perf_counter()

    def acked(self) -> int:
        self.current.acked = time.perf_counter()
        with self._lock:
            self.done.append(self.current)
            return len(self.done)


def pin(core: int) -> None:
    """Run this process (and every thread it starts from now on) on ``core`` only."""
    if core not in os.sched_getaffinity(0):
        raise SystemExit(f"core {core} is not available to this process")
    os.sched_setaffinity(0, {core})


def instrument(clock: Clock, stop: threading.Event, lessons: int) -> Any:
    """Wrap the pupil's parts with ``clock`` and build the service; returns it (not started)."""
    # Imported only now: torch must see the pinned affinity when it starts its thread pool.
    from fast_backend import EchoGenerator, HashingEmbedder

    import pupil_node.guidance as guidance
    import pupil_node.node as node_module
    import pupil_node.service as service_module
    from pupil_node.journal import Journal
    from pupil_node.memory import LessonMemory
    from shared.adapter import AdapterTrainer
    from shared.broker import Consumer
    from shared.broker.worker import Settled
    from shared.metrics import PupilMetrics

    for module, name, part in (
        (node_module, "decode", "decode"),
        (node_module, "cosine", "similarity"),
        (node_module, "encode", "report encode"),
        (node_module, "Report", "report encode"),
        (guidance, "render_prompt", "prompt render"),
    ):
        setattr(module, name, clock.timed(part, getattr(module, name)))
    for cls, name, part in (
        # The two checkpoints are written on writer threads while the worker waits in _learn:
        # _learn's own (exclusive) time, with training and memory timed inside it, is that wait.
        (node_module.PupilNode, "_learn", "checkpoint"),
        (AdapterTrainer, "learn", "train"),
        (AdapterTrainer, "predict", "similarity"),
        (Journal, "entry", "journal"),
        (Journal, "record", "journal"),
        (Journal, "mark_reported", "journal"),
        (LessonMemory, "add", "memory"),
        (LessonMemory, "nearest", "memory"),
        (PupilMetrics, "record_lesson", "metrics"),
    ):
        setattr(cls, name, clock.timed(part, getattr(cls, name)))

    on_message, settle_all = Consumer._on_message, Consumer._settle_all

    def timed_on_message(
        self: Consumer, queue_name: str, channel: Any, method: Any, props: Any, body: bytes
    ) -> None:
        clock.arrived(method.delivery_tag)
        on_message(self, queue_name, channel, method, props, body)

    def timed_settle_all(self: Consumer, done: Settled) -> None:
        settle_all(self, done)  # on the I/O thread: the ack is written when this returns
        for _ in done:  # prefetch 1: one lesson at a time
            if clock.acked() >= lessons:
                stop.set()

    Consumer._on_message = timed_on_message  # type: ignore[method-assign]
    Consumer._settle_all = timed_settle_all  # type: ignore[method-assign]
    return node_module, service_module, EchoGenerator, HashingEmbedder


def build_service(args: argparse.Namespace, clock: Clock, stop: threading.Event, total: int) -> Any:
    """The instrumented node and service, with the fast backend wrapped as the model parts."""
    node_module, service_module, echo, hashing = instrument(clock, stop, total)
    from shared.config import PupilConfig, Settings
    from shared.messages import decode

    generator, embedder = echo(), hashing(args.dim)
    generator.generate = clock.timed("generate", generator.generate)
    embedder.embed = clock.timed("embed", embedder.embed)
    settings = Settings(
        broker=broker_config(args.namespace, prefetch=1),
        pupil=PupilConfig(node_id=NODE_ID, state_dir=args.state, metrics_port=0),
    )
    node = node_module.PupilNode(NODE_ID, settings.pupil, generator, embedder)
    if not args.fresh:
        prefill(node, args.dim)
        clock.current = LessonTiming()  # the prefill's own calls are not a lesson
    service = service_module.PupilService(settings, node, stop)
    handle = service.handle
    publish = clock.timed("report publish", service.publisher.publish, worker_only=True)
    service.publisher.publish = publish

    def timed_handle(delivery: Any) -> None:
        split = decode(delivery.body).split  # type: ignore[attr-defined]  # the label, untimed
        clock.handler_started(delivery.delivery_tag, split)
        try:
            handle(delivery)
        finally:
            clock.handler_ended()

    service.handle = timed_handle
    return service


def prefill(node: Any, dim: int) -> None:
    """Give ``node`` the state of a node that has run for a while (full replay, big memory)."""
    import numpy as np

    from shared.checkpoint import save_checkpoint

    rng = np.random.default_rng(1)
    for trainer, path in (
        (node.trainer, node.checkpoint_path),
        (node.prompt_trainer, node.prompt_checkpoint_path),
    ):
        capacity = trainer.replay.capacity
        inputs = rng.standard_normal((capacity, dim)).astype(np.float32)
        targets = rng.standard_normal((capacity, dim)).astype(np.float32)
        trainer.learn("prefill", inputs, targets, steps=1, batch_size=16)
        save_checkpoint(trainer, path)
    for index in range(node.trainer.replay.capacity):
        vector = rng.standard_normal(dim).astype(np.float32)
        node.memory.add(f"prefill-{index}", "an earlier goal", "an earlier answer", vector)


def report(timings: list[LessonTiming], args: argparse.Namespace) -> str:
    """The figures as text: overhead percentiles per split, then the per-part breakdown."""
    rows = []
    for label in ("train", "eval", "all"):
        chosen = [t for t in timings if label in ("all", t.split)]
        if not chosen:
            continue
        overhead = [t.overhead_s * 1e3 for t in chosen]
        model = [sum(t.parts[p] for p in MODEL_PARTS) * 1e3 for t in chosen]
        rows.append(
            (
                label,
                str(len(chosen)),
                f"{median(overhead):.2f}",
                f"{percentile(overhead, 90):.2f}",
                f"{percentile(overhead, 99):.2f}",
                f"{median(model):.3f}",
            )
        )
    columns = ("lessons", "n", "median ms", "p90 ms", "p99 ms", "fast backend ms (excluded)")
    lines = [format_table(columns, rows), ""]
    part_rows = []
    names = [*PARTS, "other"]
    for label in ("train", "eval"):
        breakdowns = [t.breakdown() for t in timings if t.split == label]
        if not breakdowns:
            continue
        for name in names:
            values = [b.get(name, 0.0) * 1e3 for b in breakdowns]
            part_rows.append(
                (f"{label}: {name}", f"{median(values):.3f}", f"{sum(values) / len(values):.3f}")
            )
    lines.append(format_table(("part (exclusive)", "median ms", "mean ms"), part_rows))
    train = [t.overhead_s * 1e3 for t in timings if t.split == "train"]
    verdict = "met" if train and median(train) <= TARGET_MS else "MISSED"
    lines += [
        "",
        f"target: median overhead of a train lesson <= {TARGET_MS:.0f} ms: {verdict} "
        f"({median(train):.2f} ms)",
    ]
    return "\n".join(lines)


def main() -> int:
    """Run the node over the queued lessons and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--lessons", type=int, default=300, help="lessons to time (default 300)")
    parser.add_argument("--warmup", type=int, default=10, help="lessons run before timing")
    parser.add_argument("--dim", type=int, default=384, help="embedding dims (default 384)")
    parser.add_argument(
        "--eval-every", type=int, default=4, help="every Nth lesson is eval (0: none)"
    )
    parser.add_argument("--core", type=int, default=0, help="the CPU core to pin to")
    parser.add_argument("--fresh", action="store_true", help="start from an empty node state")
    parser.add_argument("--profile", type=Path, help="write a pyinstrument profile of the worker")
    args = parser.parse_args()
    pin(args.core)
    args.namespace = bench_namespace("overhead")
    total = args.warmup + args.lessons
    with tempfile.TemporaryDirectory(prefix="distill-swarm-overhead-") as workdir:
        args.state = Path(workdir) / "state"
        logging.basicConfig(
            filename=Path(workdir) / "pupil.log",
            level=logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        clock = Clock()
        stop = threading.Event()
        service = build_service(args, clock, stop, total)
        profiler = start_profiler(service, args.profile, args.warmup, total)
        config = service.settings.broker
        lessons = make_lessons(total, args.dim, eval_every=args.eval_every)
        with throwaway_topology(config, [NODE_ID]) as topology:
            queue_lessons(config, topology, lessons)
            import torch

            print(
                f"pinned to core {args.core}; torch threads {torch.get_num_threads()}; "
                f"{args.dim} dims; {total} lessons queued ({args.warmup} warm-up)",
                file=sys.stderr,
                flush=True,
            )
            started = time.monotonic()
            service.run()
            elapsed = time.monotonic() - started
        if profiler is not None:
            profiler.write()
    timed = clock.done[args.warmup :]
    print(report(timed, args))
    print(
        f"\n{len(clock.done)} lessons in {elapsed:.1f}s wall-clock on one core "
        f"(broker on the other); command: .venv/bin/python bench/overhead.py "
        f"--lessons {args.lessons} --dim {args.dim}",
    )
    return 0


class _WorkerProfiler:
    """pyinstrument on the consumer's worker thread, from the first timed lesson to the last."""

    def __init__(self, path: Path, warmup: int, total: int) -> None:
        from pyinstrument import Profiler

        self.path = path
        self.warmup = warmup
        self.total = total
        self.seen = 0
        self.profiler = Profiler(interval=0.0002)

    def around(self, handle: Callable[[Any], None]) -> Callable[[Any], None]:
        def profiled(delivery: Any) -> None:
            self.seen += 1
            if self.seen == self.warmup + 1:
                self.profiler.start()
            try:
                handle(delivery)
            finally:
                if self.seen == self.total and self.profiler.is_running:
                    self.profiler.stop()  # on the thread that started it

        return profiled

    def write(self) -> None:
        if self.profiler.is_running:
            return  # the run ended early: nothing consistent to write
        self.path.write_text(self.profiler.output_text(unicode=True, color=False))
        print(f"profile written to {self.path}", file=sys.stderr)


def start_profiler(
    service: Any, path: Path | None, warmup: int, total: int
) -> _WorkerProfiler | None:
    """Profile the worker thread's handler if ``path`` is given (needs pyinstrument)."""
    if path is None:
        return None
    profiler = _WorkerProfiler(path, warmup, total)
    service.handle = profiler.around(service.handle)
    return profiler


if __name__ == "__main__":
    sys.exit(main())
