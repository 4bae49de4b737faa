"""Benchmark: late joiners on the lesson stream (docs/stream.md). Prints figures; times nothing.

On a private RabbitMQ: 200 train lessons and 20 eval lessons are published to the lesson stream
before any pupil exists. Then

1. node ``late`` starts (the real PupilService + PupilNode, fast backends, its own process) and
   catches up: are all 200 train lessons trained on exactly once, in publishing order?
2. node ``killed`` starts, is SIGKILLed mid-catch-up, and is restarted: a gap (a lesson never
   journalled), a repeat (a lesson trained twice: the adapter's version would pass 200) or an
   order change would show.

    .venv/bin/python -m bench.late_joiner [--lessons 200] [--eval 20] [--delay-s 0.02]
"""

from __future__ import annotations

import argparse
import signal
import tempfile
import time
from pathlib import Path

from bench.stream_swarm import DIM, StreamSwarm, lesson, wait_until
from distill_swarm.local_broker import LocalBroker
from pupil_node.node import CHECKPOINT_NAME
from shared.checkpoint import load_latest
from shared.config import BrokerConfig


def catch_up(
    swarm: StreamSwarm, node_id: str, total: int, delay_s: float, kill_at: int | None
) -> dict[str, object]:
    """Run ``node_id`` until its journal holds ``total`` lessons; SIGKILL it once at ``kill_at``."""
    started = time.monotonic()
    proc = swarm.spawn(node_id, delay_s=delay_s)
    killed_at = None
    if kill_at is not None:
        wait_until(lambda: len(swarm.journal(node_id)) >= kill_at, 600, "the kill point")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        killed_at = len(swarm.journal(node_id))
        proc = swarm.spawn(node_id, delay_s=delay_s)
    wait_until(lambda: len(swarm.journal(node_id)) >= total, 1200, f"{node_id} to catch up")
    elapsed_s = time.monotonic() - started
    proc.terminate()
    proc.wait(timeout=60)
    return {"elapsed_s": elapsed_s, "killed_at": killed_at}


def check(swarm: StreamSwarm, node_id: str, expected: list[str], train: int) -> dict[str, object]:
    """Gap, repeat and order figures from the node's journal and checkpoint."""
    journal = swarm.journal(node_id)
    done = [lesson_id for lesson_id, _ in journal]
    offsets = [offset for _, offset in journal]
    trainer = load_latest(swarm.state_dir(node_id) / CHECKPOINT_NAME, in_dim=DIM)
    log = (swarm.root / f"{node_id}.log").read_text()
    return {
        "journalled": len(done),
        "missing": len(set(expected) - set(done)),
        "in_order": done == expected and offsets == sorted(offsets),
        "trained": None if trainer is None else trainer.version,
        "trained_exactly_once": trainer is not None and trainer.version == train,
        "replayed_from_journal": log.count("already done"),
        "catch_up_log_lines": log.count("catching up"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lessons", type=int, default=200, help="train lessons")
    parser.add_argument("--eval", type=int, default=20, help="eval lessons, mixed in")
    parser.add_argument("--delay-s", type=float, default=0.02, help="pupil answer latency")
    args = parser.parse_args()
    total = args.lessons + args.eval
    every = total // args.eval if args.eval else total + 1
    published = [
        lesson(i, "eval" if args.eval and i % every == every - 1 else "train") for i in range(total)
    ]
    train = sum(1 for x in published if x.split == "train")
    expected = [x.lesson_id for x in published]
    with LocalBroker() as broker, tempfile.TemporaryDirectory() as workdir:
        swarm = StreamSwarm(BrokerConfig(url=broker.url, namespace="late"), Path(workdir))
        swarm.declare()
        started = time.monotonic()
        swarm.publish(published)
        publish_s = time.monotonic() - started
        print(f"published {total} lessons ({train} train) in {publish_s:.1f} s, before any pupil")
        rows = []
        for node_id, kill_at in (("late", None), ("killed", total // 2)):
            run = catch_up(swarm, node_id, total, args.delay_s, kill_at)
            rows.append((node_id, run, check(swarm, node_id, expected, train)))
        swarm.close()
    print()
    header = (
        "node", "killed at", "journalled", "missing", "in order", "trained", "exactly once",
        "replayed", "catch-up s", "lessons/s",
    )  # fmt: skip
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for node_id, run, figures in rows:
        elapsed = float(run["elapsed_s"])  # type: ignore[arg-type]
        print(
            " | ".join(
                str(v)
                for v in (
                    node_id, run["killed_at"] or "-", figures["journalled"], figures["missing"],
                    figures["in_order"], figures["trained"], figures["trained_exactly_once"],
                    figures["replayed_from_journal"], f"{elapsed:.1f}", f"{total / elapsed:.1f}",
                )
            )
        )  # fmt: skip
    print(
        "\ntrained = the answer adapter's version: one per train lesson learned (eval lessons "
        "are never trained on); replayed = lessons redelivered after the kill that the journal "
        "absorbed (acked, not trained again); catch-up s includes process start-up."
    )


if __name__ == "__main__":
    main()
