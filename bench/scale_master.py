"""The master process of the scale benchmark: the real MasterService on the fast backend.

Started by ``bench/scale.py``, never by hand. It is the production master (store, teacher,
consumer, metrics object) with two substitutions only: the fast deterministic backend instead of a
model (the CLI knows only real backends) and a generated prompt set. It waits for ``--nodes``
hellos, publishes ``--lessons`` lessons and ingests reports until SIGTERM.
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

from fast_backend import EchoGenerator, HashingEmbedder
from scale_pupils import die_with_parent

from master.prompts import PromptItem
from master.service import MasterService
from master.store import Store
from shared.cli_support import setup_logging, stop_on_signals
from shared.config import Settings

TOPICS = (
    "queues", "adapters", "embeddings", "heartbeats", "checkpoints", "replicas", "backoff",
    "journals", "fanout", "confirms", "prefetch", "quorum", "latency", "throughput",
)  # fmt: skip


def prompt_set(count: int) -> list[PromptItem]:
    """``count`` distinct prompts, so every lesson has its own answer and embedding."""
    items = []
    for i in range(count):
        a, b = TOPICS[i % len(TOPICS)], TOPICS[(3 * i + 5) % len(TOPICS)]
        goal = (
            f"Prompt {i}: explain in three sentences how {a} relate to {b} in a swarm of small "
            f"edge devices that learn from one master, and give one concrete tip about {a}."
        )
        items.append(PromptItem(id=f"scale-{i:04d}", goal_text=goal))
    return items


def main() -> int:
    """Run the master until SIGTERM."""
    parser = argparse.ArgumentParser(description="scale benchmark master (started by scale.py)")
    parser.add_argument("--url", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--lessons", type=int, required=True)
    parser.add_argument("--prefetch", type=int, default=None, help="master.prefetch")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args()
    die_with_parent()
    setup_logging(args.log_level)
    master: dict[str, object] = {
        "store": args.store,
        "expect_nodes": args.nodes,
        "expect_nodes_timeout_s": 3600,
        "metrics_port": 0,
    }
    if args.prefetch is not None:
        master["prefetch"] = args.prefetch
    settings = Settings.model_validate(
        {"broker": {"url": args.url, "namespace": args.namespace}, "master": master}
    )
    stop = threading.Event()
    stop_on_signals(stop)
    service = MasterService(
        settings,
        EchoGenerator(),
        HashingEmbedder(),
        Store(settings.master.store),
        prompt_set(args.lessons),
        stop,
    )
    service.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
