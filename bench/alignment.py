"""Benchmark: does alignment change what a pupil says on prompts it never saw?

Runs the whole loop on the embedded models: a master and N pupils as separate processes over
RabbitMQ on the bundled 144-prompt benchmark (108 train / 36 eval, fixed split), then
`distill-swarm eval` on the master's store. Prints the table and writes CSV, JSON and PNGs.

    .venv/bin/python bench/alignment.py [--nodes 2] [--master-temperature 0.7] [--out DIR]

Settings are chosen up front and written to DIR/run/swarm.toml; nothing here is tuned on the eval
split. The master's temperature changes what there is to learn (a greedy master is consistent, a
sampling one is not), so the README reports both runs side by side rather than picking one.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from distill_swarm.demo import run_swarm

ROOT = Path(__file__).resolve().parent.parent
BENCHMARK = ROOT / "master" / "prompt_sets" / "benchmark.jsonl"

# By default the master samples (temperature 0.7) so that its ceiling, the agreement between two
# of its own answers, is a measurement rather than 1 by definition.
DEFAULT_MASTER_TEMPERATURE = 0.7
PUPIL_TEMPERATURE = 0.8
MAX_TOKENS = 64


GUIDANCE = """
[pupil.guidance]
method = "retrieval"
eval_methods = ["best_of_k", "retrieval", "retrieval+best_of_k"]
k = 4
examples = 2
"""


def bench_config(
    url: str,
    namespace: str,
    master_temperature: float,
    guidance: str = GUIDANCE,
    extra: str = "",
    pupil_seed: int = 0,
) -> str:
    """The TOML every process of the benchmark reads (``guidance``: its [pupil.guidance]
    section; ``extra``: more sections, e.g. bench/lora_swarm.py's [pupil.study])."""
    return f"""
[broker]
url = "{url}"
namespace = "{namespace}"

[master]
ceiling = true
expect_nodes_timeout_s = 600

[master.generator]
kind = "embedded"
template = "master.j2"
temperature = {master_temperature}
max_tokens = {MAX_TOKENS}
seed = 0
threads = 1

[pupil]
heartbeat_interval_s = 10
metrics_port = 0           # N pupils share one machine; the master's /metrics shows them all

[pupil.generator]
kind = "embedded"
template = "pupil.j2"
temperature = {PUPIL_TEMPERATURE}
max_tokens = {MAX_TOKENS}
seed = {pupil_seed}
threads = 1

[pupil.adapter]
hidden_dim = 256
steps_per_lesson = 8
batch_size = 16
{guidance}{extra}"""


def main() -> int:
    """Run the benchmark; returns a process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--master-temperature", type=float, default=DEFAULT_MASTER_TEMPERATURE)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "alignment")
    parser.add_argument("--timeout-s", type=float, default=7200)
    args = parser.parse_args()
    return run_and_evaluate(
        lambda url, ns: bench_config(url, ns, args.master_temperature),
        args.nodes,
        args.out,
        args.timeout_s,
    )


def run_and_evaluate(
    make_config: Callable[[str, str], str],
    nodes: int,
    out: Path,
    timeout_s: float,
    with_exam: bool = False,
) -> int:
    """Run the swarm on the benchmark (workdir ``out/run``), then `distill-swarm eval` into
    ``out``; returns a process exit code."""
    workdir = out / "run"
    started = time.monotonic()
    code = run_swarm(BENCHMARK, workdir, nodes, timeout_s, make_config, with_exam=with_exam)
    print(f"swarm run: {time.monotonic() - started:.0f}s, exit {code}")
    if code != 0:
        return code
    store = workdir / "master.sqlite3"
    return subprocess.call(
        [sys.executable, "-m", "distill_swarm", "eval", "--store", str(store), "--out", str(out)]
    )


if __name__ == "__main__":
    sys.exit(main())
