"""Benchmark: do pupils that study their own LoRA *say* something closer to the master?

The whole loop on the embedded models, as bench/alignment.py runs it (a master and N pupils as
separate processes over RabbitMQ, the bundled 144-prompt benchmark, 108 train / 36 eval), with
study rounds on: each pupil trains a LoRA on its train lessons in the background every
``--every`` train lessons, promotes a version only if it is better on a validation slice of its
*train* lessons, and serves it. When the curriculum ends the master holds the exam (the 36 eval
lessons again, answered by each pupil's final model by every method); `distill-swarm eval` then
prints the online table and the exam table. The bars of issue #12 are read on the exam.

    .venv/bin/python bench/lora_swarm.py [--nodes 2] [--every 54] [--out DIR]

Settings are fixed up front and written to DIR/run/swarm.toml; nothing is tuned on the eval
split. The master decodes greedily (as in the demo), so its answers are one consistent target.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from alignment import bench_config, run_and_evaluate

from pupil_node.study.train import TARGETS

ROOT = Path(__file__).resolve().parent.parent
# 108 train lessons reach every pupil: rounds after 54 and 108 of them.
DEFAULT_EVERY = 54


GUIDANCE = """
[pupil.guidance]
method = "lora+retrieval"
eval_methods = ["retrieval", "lora", "lora+retrieval"]
examples = 2
"""


def study_config(
    every: int, max_steps: int, targets: str = "all", epochs: int = 1, learning_rate: float = 2e-4
) -> str:
    """The [pupil.study] section of the benchmark."""
    return f"""
[pupil.study]
enabled = "on"
every_lessons = {every}
min_lessons = 20
idle_s = 3600
epochs = {epochs}
max_steps = {max_steps}
batch_size = 4
learning_rate = {learning_rate}
rank = 16
alpha = 32
max_len = 256
targets = "{targets}"
threads = 1
"""


def main() -> int:
    """Run the benchmark; returns a process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--every", type=int, default=DEFAULT_EVERY)
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2e-4)
    # Another seed is another replicate: other pupil samples, other training batches' order.
    parser.add_argument("--seed", type=int, default=0, help="the pupils' sampling seed")
    parser.add_argument("--targets", default="all", choices=sorted(TARGETS))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "lora")
    parser.add_argument("--timeout-s", type=float, default=3 * 3600)
    args = parser.parse_args()
    study = study_config(args.every, args.max_steps, args.targets, args.epochs, args.lr)
    return run_and_evaluate(
        # A greedy master (as in the demo): one consistent target, ceiling 1.
        lambda url, ns: bench_config(url, ns, 0.0, GUIDANCE, study, args.seed),
        args.nodes,
        args.out,
        args.timeout_s,
        with_exam=True,
    )


if __name__ == "__main__":
    sys.exit(main())
