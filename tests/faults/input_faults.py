"""Bad input: garbage on the wire through a running pupil, and a damaged adapter checkpoint.

The test plays the master in both (synthetic lessons in the pupil's embedding space), so only the
pupil loads models.
"""

from __future__ import annotations

import signal
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from distill_swarm.local_broker import LocalBroker, free_port
from shared.adapter import AdapterTrainer
from shared.backends.embedded import MINILM_DIM, MINILM_NAME
from shared.broker import connect
from shared.checkpoint import load_checkpoint, save_checkpoint
from shared.topology import ORIGIN_QUEUE_HEADER, REASON_HEADER
from tests.faults.garbage import bad_bodies
from tests.faults.harness import RUN_TIMEOUT_S, Swarm, wait_until
from tests.faults.lessons import publish_lesson, synthetic_lesson
from tests.faults.process_faults import NODE
from tests.faults.result import FaultResult, tally
from tests.faults.wiretap import WireTap

BAD_PER_CATEGORY = 4  # x 9 categories
VALID_LESSONS = 4
REJECTED = "distill_swarm_messages_rejected_total"
CHECKPOINTS = ("adapter.safetensors", "prompt_adapter.safetensors")


def rejected_by_reason(metrics_url: str) -> Counter[str]:
    """The pupil's dead-lettered lessons by reason class, from its live /metrics page."""
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    counts: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == REJECTED and sample.labels.get("queue") == "lessons":
                counts[sample.labels["reason"]] += int(sample.value)
    return counts


def bad_input(broker: LocalBroker, workdir: Path) -> FaultResult:
    """Hypothesis-drawn bad bodies among valid lessons, through the lessons fanout."""
    with Swarm(broker, workdir) as swarm:
        tap = WireTap(swarm.broker_config).install()
        publisher = swarm.play_master()
        port = free_port()
        swarm.pupil(NODE, env={"DISTILL_SWARM__PUPIL__METRICS_PORT": str(port)})
        swarm.wait_for_log(NODE, r"consuming")
        metrics_url = f"http://127.0.0.1:{port}/metrics"
        before = rejected_by_reason(metrics_url)
        bad = bad_bodies(BAD_PER_CATEGORY)
        valid = [
            synthetic_lesson(100 + n, "train" if n % 2 else "eval") for n in range(VALID_LESSONS)
        ]
        # Bad bodies in chunks, each chunk followed by a valid lesson: the consumer must go on.
        chunks = np.array_split(np.arange(len(bad)), VALID_LESSONS)
        for chunk, lesson in zip(chunks, valid, strict=True):
            for index in chunk:
                _category, body = bad[index]
                publisher.publish(swarm.topology.lessons_exchange, "", body, f"bad-{index:03d}")
            last_bad = tap.now()
            publish_lesson(publisher, swarm.topology, lesson)
        dead_queue = swarm.topology.dead_queue
        wait_until(
            lambda: (
                len(set(tap.poll().report_pairs({NODE}))) == VALID_LESSONS
                and swarm.queue_depth(dead_queue) >= len(bad)
            ),
            RUN_TIMEOUT_S,
            "every valid lesson reported and every bad one dead-lettered",
        )
        after = rejected_by_reason(metrics_url)
        pupil_alive = swarm.running(NODE)
        dead = _dead_letters(swarm, dead_queue)
        pupil_exit = swarm.kill(NODE, signal.SIGTERM)
        tap.poll()
        return tally(
            f"bad input ({len(bad)} bad bodies)",
            tap,
            VALID_LESSONS,
            {NODE},
            tap.recovery_s(last_bad, NODE, valid[-1].lesson_id),
            state_dirs=[swarm.state_dir(NODE)],
            only={lesson.lesson_id for lesson in valid},
            bad_ids={f"bad-{i:03d}": category for i, (category, _) in enumerate(bad)},
            dead_letters=dead,
            rejected_delta={k: after[k] - before[k] for k in after},
            refusal_reports=sum(1 for s in tap.reports if s.error is not None),
            pupil_alive=pupil_alive,
            pupil_exit=pupil_exit,
        )


def _dead_letters(swarm: Swarm, queue: str) -> dict[str, tuple[str, str]]:
    """message id -> (reason header, origin queue header) of every dead-lettered message."""
    connection = connect(swarm.broker_config)
    found: dict[str, tuple[str, str]] = {}
    try:
        channel = connection.channel()
        while True:
            method, props, _body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return found
            headers = props.headers or {}
            found[str(props.message_id)] = (
                str(headers.get(REASON_HEADER, "")),
                str(headers.get(ORIGIN_QUEUE_HEADER, "")),
            )
    finally:
        connection.close()


def _write_two_versions(path: Path) -> None:
    """A checkpoint at version 2 with its version 1 kept as ``.prev``, as a node would leave."""
    trainer = AdapterTrainer(MINILM_DIM, MINILM_DIM, embedding_model=MINILM_NAME)
    rng = np.random.default_rng(0)
    for n in range(2):
        x, y = rng.normal(size=(2, MINILM_DIM)).astype(np.float32)
        trainer.learn(f"seed-{n}", x, y, steps=2, batch_size=2)
        save_checkpoint(trainer, path)


def corrupt_checkpoint(broker: LocalBroker, workdir: Path) -> FaultResult:
    """Start a pupil whose answer adapter has flipped bytes and whose prompt adapter is cut off."""
    with Swarm(broker, workdir) as swarm:
        state = swarm.state_dir(NODE)
        state.mkdir(parents=True)
        for name in CHECKPOINTS:
            _write_two_versions(state / name)
        flipped = bytearray((state / CHECKPOINTS[0]).read_bytes())
        middle = len(flipped) // 2
        flipped[middle : middle + 16] = bytes(b ^ 0xFF for b in flipped[middle : middle + 16])
        (state / CHECKPOINTS[0]).write_bytes(bytes(flipped))
        truncated = (state / CHECKPOINTS[1]).read_bytes()
        (state / CHECKPOINTS[1]).write_bytes(truncated[: len(truncated) // 2])

        tap = WireTap(swarm.broker_config).install()
        publisher = swarm.play_master()
        started = tap.now()
        swarm.pupil(NODE)
        swarm.wait_for_log(NODE, r"consuming")
        lesson = synthetic_lesson(200, "train")
        publish_lesson(publisher, swarm.topology, lesson)
        wait_until(lambda: tap.poll().report_pairs({NODE}), RUN_TIMEOUT_S, "the lesson's report")
        log = swarm.log(NODE)
        pupil_exit = swarm.kill(NODE, signal.SIGTERM)
        tap.poll()
        return tally(
            "corrupt + truncated checkpoint",
            tap,
            1,
            {NODE},
            tap.recovery_s(started, NODE),
            state_dirs=[swarm.state_dir(NODE)],
            fallbacks=log.count("falling back to the previous checkpoint"),
            loaded_v1=log.count("loaded adapter version 1 from"),
            report_adapter_versions=[s.adapter_version for s in tap.reports],
            versions_after={name: load_checkpoint(state / name).version for name in CHECKPOINTS},
            pupil_exit=pupil_exit,
            log=log,
        )
