"""Benchmark: peak resident memory of a real pupil node process on the `ollama` backend.

The model lives in Ollama, not in the node, so what the node itself holds is the framework:
Python, torch for the adapters, the broker client, the journal and memory. This starts:

- a fake Ollama server in its own process (``tests/support/fake_ollama.py``, answering with the
  benchmark-only fast backend, so no model is loaded anywhere);
- a real `distill-swarm pupil run` process, generator and embedder of kind ``ollama`` pointed at
  that server, on a throwaway broker namespace;

queues ``--lessons`` lessons for it (every 4th an eval lesson, so guidance runs too), waits until
every report is in, and reads the node's peak resident set (``VmHWM`` in ``/proc/<pid>/status``)
before stopping it. For comparison, each of these runs in a fresh interpreter and reports its
own peak: Python alone; ``import torch``; torch plus one AdamW step (the optimizer imports
torch._dynamo and sympy); the node's imports without torch; and the adapter's inference through
``shared.adapter_numpy`` (numpy only) against the same through torch, both loading the node's
own checkpoint.

    .venv/bin/python bench/memory.py [--lessons 40] [--dim 384]

Target (issue #6): the node's peak RSS at most 350 MB (MB = 10^6 bytes here; MiB in brackets).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pika
from harness import (
    ROOT,
    bench_namespace,
    broker_config,
    format_table,
    make_lessons,
    proc_status_kib,
    queue_lessons,
    throwaway_topology,
)

from distill_swarm.processes import stop_processes
from shared.broker import connect
from shared.config import BrokerConfig
from shared.topology import Topology

TARGET_BYTES = 350 * 10**6
NODE_ID = "memory-1"
GENERATOR_MODEL = "bench-echo"
EMBEDDER_MODEL = "all-minilm"
PYTHON = sys.executable
DISTILL_SWARM = str(Path(PYTHON).with_name("distill-swarm"))
# Printed by each probe: its own peak resident set.
PEAK = "import re; print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1])"
NODE_IMPORTS_WITHOUT_TORCH = (
    "import pika, pydantic, numpy, ollama, httpx, prometheus_client, typer, jinja2, yaml, "
    "safetensors; import shared.broker, shared.messages, shared.metrics, shared.config, "
    "shared.backends.ollama, shared.backends.templates, pupil_node.journal, pupil_node.memory"
)


def serve_fake_ollama(dim: int) -> None:
    """Child process: a fake Ollama answering with the fast backend; prints its URL, serves."""
    sys.path.insert(0, str(ROOT))
    from fast_backend import EchoGenerator, HashingEmbedder

    from tests.support import fake_ollama

    generator, embedder = EchoGenerator(), HashingEmbedder(dim, EMBEDDER_MODEL)
    fake_ollama._generator = lambda: generator
    fake_ollama._embedder = lambda: embedder
    server = fake_ollama.FakeOllama({GENERATOR_MODEL: "generate", EMBEDDER_MODEL: "embed"})
    print(server.url, flush=True)
    server.serve_forever()


def node_config(path: Path, url: str, namespace: str, ollama_url: str, state: Path) -> None:
    """Write the pupil's config file."""
    path.write_text(
        f"""
[broker]
url = "{url}"
namespace = "{namespace}"

[pupil]
node_id = "{NODE_ID}"
state_dir = "{state}"
metrics_port = 0

[pupil.generator]
kind = "ollama"
model = "{GENERATOR_MODEL}"
url = "{ollama_url}"

[pupil.embedder]
kind = "ollama"
model = "{EMBEDDER_MODEL}"
url = "{ollama_url}"
"""
    )


def wait_for_reports(
    config: BrokerConfig, topology: Topology, expected: int, node: subprocess.Popen[bytes]
) -> list[int]:
    """Poll the reports queue until ``expected`` reports are in; samples the node's RSS."""
    samples = []
    connection = connect(config)
    try:
        channel = connection.channel()
        deadline = time.monotonic() + 600
        while True:
            if node.poll() is not None:
                raise RuntimeError(f"the pupil exited with {node.returncode}; see its log")
            samples.append(proc_status_kib(node.pid, "VmRSS"))
            depth = channel.queue_declare(topology.reports_queue, passive=True).method.message_count
            dead = channel.queue_declare(topology.dead_queue, passive=True).method.message_count
            if dead:
                raise RuntimeError(f"the pupil dead-lettered {dead} lessons; see its log")
            if depth >= expected:
                return samples
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {depth} of {expected} reports after 600 s")
            time.sleep(0.2)
    except pika.exceptions.AMQPError as error:
        raise RuntimeError(f"broker error while waiting: {error!r}") from None
    finally:
        connection.close()


def probe(code: str, cwd: Path = ROOT) -> int:
    """Peak RSS (KiB) of a fresh interpreter running ``code``."""
    result = subprocess.run(
        [PYTHON, "-c", f"{code}\n{PEAK}"], capture_output=True, text=True, check=True, cwd=cwd
    )
    return int(result.stdout.strip().splitlines()[-1])


def probes(checkpoint: Path, dim: int) -> list[tuple[str, int]]:
    """The comparison processes, each with its peak RSS in KiB."""
    vector = f"numpy.random.default_rng(0).standard_normal({dim}).astype(numpy.float32)"
    return [
        ("python alone", probe("pass")),
        ("import torch", probe("import torch")),
        (
            "torch + one AdamW step",
            probe(
                "import torch; p = torch.nn.Parameter(torch.zeros(4)); "
                "o = torch.optim.AdamW([p]); p.sum().backward(); o.step()"
            ),
        ),
        ("node imports without torch", probe(NODE_IMPORTS_WITHOUT_TORCH)),
        (
            "adapter inference, torch",
            probe(
                "import numpy; from shared.checkpoint import load_checkpoint; "
                f"load_checkpoint('{checkpoint}').predict({vector})"
            ),
        ),
        (
            "adapter inference, numpy only",
            probe(
                "import numpy; from shared.adapter_numpy import NumpyAdapter; "
                f"NumpyAdapter.load('{checkpoint}').predict({vector})"
            ),
        ),
    ]


def mb(kib: int) -> str:
    """KiB as ``MB (MiB)``."""
    return f"{kib * 1024 / 1e6:.0f} ({kib / 1024:.0f})"


def main() -> int:
    """Run the node, read its peak, run the probes, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--lessons", type=int, default=40)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--serve-fake-ollama", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_fake_ollama:
        serve_fake_ollama(args.dim)
        return 0
    config = broker_config(bench_namespace("memory"))
    lessons = make_lessons(args.lessons, args.dim, eval_every=4, tag="memory")
    # The node's embedder is "all-minilm" on Ollama: lessons must be embedded in that space.
    lessons = [
        lesson.model_copy(
            update={"reference": lesson.reference.model_copy(update={"model": EMBEDDER_MODEL})}
        )
        for lesson in lessons
    ]
    with tempfile.TemporaryDirectory(prefix="distill-swarm-memory-") as workdir:
        work = Path(workdir)
        fake = subprocess.Popen(
            [PYTHON, __file__, "--serve-fake-ollama", "--dim", str(args.dim)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert fake.stdout is not None
            ollama_url = fake.stdout.readline().strip()
            state = work / "state"
            node_config(work / "pupil.toml", config.url, config.namespace, ollama_url, state)
            with throwaway_topology(config, [NODE_ID]) as topology:
                queue_lessons(config, topology, lessons)
                peak, samples, seconds = run_node(work, config, topology, args)
            rows = probes(state / "adapter.safetensors", args.dim)
        finally:
            fake.terminate()
            fake.wait(timeout=30)
    print(
        f"pupil node (`distill-swarm pupil run`, ollama backend, {args.dim} dims): "
        f"{args.lessons} lessons in {seconds:.1f}s"
    )
    table = [
        ("pupil node: peak (VmHWM)", mb(peak)),
        ("pupil node: RSS at the end", mb(samples[-1])),
        *((name, mb(kib)) for name, kib in rows),
    ]
    print(format_table(("process", "peak RSS MB (MiB)"), table))
    by_name = dict(rows)
    saved = by_name["adapter inference, torch"] - by_name["adapter inference, numpy only"]
    print(f"\nnumpy-only inference instead of torch saves {mb(saved)} MB (MiB) of peak RSS")
    verdict = "met" if peak * 1024 <= TARGET_BYTES else "MISSED"
    print(f"target: pupil peak RSS <= {TARGET_BYTES / 1e6:.0f} MB: {verdict} ({mb(peak)})")
    print(f"command: .venv/bin/python bench/memory.py --lessons {args.lessons} --dim {args.dim}")
    return 0


def run_node(
    work: Path, config: BrokerConfig, topology: Topology, args: argparse.Namespace
) -> tuple[int, list[int], float]:
    """Run the pupil until every report is in; its peak RSS (KiB), RSS samples, seconds."""
    log = (work / "pupil.log").open("wb")
    started = time.monotonic()
    node = subprocess.Popen(
        [DISTILL_SWARM, "pupil", "run", "--config", str(work / "pupil.toml")],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        samples = wait_for_reports(config, topology, args.lessons, node)
        seconds = time.monotonic() - started
        peak = proc_status_kib(node.pid, "VmHWM")
    except Exception:
        print((work / "pupil.log").read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        stop_processes([node])
        log.close()
    return peak, samples, seconds


if __name__ == "__main__":
    sys.exit(main())
