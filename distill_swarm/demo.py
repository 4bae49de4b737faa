"""`distill-swarm demo`: a master and N pupils as separate processes over a real RabbitMQ.

Runs on the embedded models (no Ollama, no network), or with ``backend="ollama"`` on the same two
models served by an Ollama server at ``$OLLAMA_HOST`` (``scripts/demo --backend ollama`` starts
one: ``scripts/ollama-server``). Master and pupils share the one packaged text
model, so the master is made distinct on purpose: its own template (an expert persona answering in
a fixed, concise structure) and greedy decoding, while pupils use the seed's plain template and
sample at temperature 0.8. That gap is what the pupils' adapters learn.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import pika
from tqdm import tqdm

from distill_swarm.demo_jobs import run_demo_jobs
from distill_swarm.local_broker import LocalBroker, port_open
from distill_swarm.processes import stop_processes
from master.prompts import bundled_prompt_set, load_prompts
from master.status import format_table
from master.store import Store
from shared.config import BrokerConfig, load_settings
from shared.namespace import delete_namespace

BUNDLED_PROMPTS = "demo.jsonl"  # in master/prompt_sets
POLL_S = 0.5
# The demo's (text model, embedding model) for each backend kind: the same Gemma 3 270M and
# all-MiniLM-L6-v2 either way, in each process or from Ollama (as scripts/ollama-server names them).
DEMO_MODELS = {
    "embedded": ("gemma3-270m", "all-minilm-l6-v2"),
    "ollama": ("gemma3:270m", "all-minilm"),
}
GOODBYE_WAIT_S = 10.0


def demo_config(broker_url: str, namespace: str, max_tokens: int, backend: str = "embedded") -> str:
    """The TOML config every demo process reads (written to the work dir for people to look at).

    ``backend`` is ``"embedded"`` or ``"ollama"`` (the server at ``$OLLAMA_HOST``).
    """
    text_model, embedding_model = DEMO_MODELS[backend]
    return f"""# Written by `distill-swarm demo`: one file for the master and every pupil.
[broker]
url = "{broker_url}"
namespace = "{namespace}"
heartbeat_s = 60
prefetch = 1

[master]
eval_fraction = 0.25
expect_nodes_timeout_s = 300

[master.jobs]
sample_rate = 1.0          # the demo compares every offloaded job with the master's own answer

[master.generator]
kind = "{backend}"
model = "{text_model}"
template = "master.j2"
temperature = 0.0          # greedy: the master's answer is its most likely one
max_tokens = {max_tokens}
threads = 1                # three processes share 2 cores

[master.embedder]
kind = "{backend}"
model = "{embedding_model}"

[pupil]
heartbeat_interval_s = 5
metrics_port = 0           # N pupils cannot share one port; the master's /metrics shows them all

[pupil.generator]
kind = "{backend}"
model = "{text_model}"
template = "pupil.j2"
temperature = 0.8          # sampling: a different style from the master's
max_tokens = {max_tokens}
threads = 1

[pupil.embedder]
kind = "{backend}"
model = "{embedding_model}"

[pupil.adapter]
hidden_dim = 256
steps_per_lesson = 8
batch_size = 16

[pupil.guidance]
method = "retrieval"                         # what the pupil answers with
eval_methods = ["best_of_k", "retrieval"]    # measured on every eval lesson
k = 4
examples = 2
"""


def broker_reachable(url: str) -> bool:
    """True if an AMQP server accepts TCP at the URL's host and port."""
    params = pika.URLParameters(url)
    return port_open(params.host, params.port)


def run_demo(
    nodes: int,
    prompts: Path | None,
    workdir: Path,
    max_tokens: int,
    timeout_s: float,
    backend: str = "embedded",
) -> int:
    """Run the whole demo, lessons then jobs; returns a process exit code.

    ``prompts`` None: the bundled 16-prompt set. ``backend``: see :func:`demo_config`.
    """
    with (
        bundled_prompt_set(BUNDLED_PROMPTS) if prompts is None else contextlib.nullcontext(prompts)
    ) as path:
        return run_swarm(
            path,
            workdir,
            nodes,
            timeout_s,
            lambda url, ns: demo_config(url, ns, max_tokens, backend),
            with_jobs=True,
        )


def run_swarm(
    prompts: Path,
    workdir: Path,
    nodes: int,
    timeout_s: float,
    make_config: Callable[[str, str], str],
    with_jobs: bool = False,
    with_exam: bool = False,
) -> int:
    """Run a master and ``nodes`` pupils over one prompt set until every report is in.

    With ``with_jobs``, then offload one job of each kind to the swarm (distill_swarm/demo_jobs.py).
    With ``with_exam``, then hold the exam (`distill-swarm exam`: the eval lessons again, answered
    by each pupil's final model) and wait for every answer.

    ``make_config(broker_url, namespace)`` returns the TOML every process reads; it is written to
    ``workdir/swarm.toml``. Uses the broker at ``AMQP_URL`` or, if none answers, a private one.
    Returns a process exit code; the master's store is ``workdir/master.sqlite3``.
    """
    load_prompts(prompts)  # fail fast, with the field named, before starting anything
    settings = load_settings()
    with ExitStack() as stack:
        url = settings.broker.url
        if not broker_reachable(url):
            print(f"no RabbitMQ at {url}; starting a private one for this run", flush=True)
            url = stack.enter_context(LocalBroker()).url
        namespace = f"demo{secrets.token_hex(3)}"
        workdir.mkdir(parents=True, exist_ok=True)
        config_path = workdir / "swarm.toml"
        config_path.write_text(make_config(url, namespace))
        node_ids = tuple(f"pupil-{i}" for i in range(1, nodes + 1))
        broker = BrokerConfig(url=url, namespace=namespace, connect_attempts=1)
        stack.callback(delete_namespace, broker, node_ids)
        return _run_processes(
            config_path, workdir, prompts, node_ids, timeout_s, with_jobs, with_exam
        )
    return 1  # unreachable; keeps type checkers calm


def _spawn(args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("AMQP_URL", None)  # the config file names the broker
    log = log_path.open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "distill_swarm", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )


def _run_processes(
    config: Path,
    workdir: Path,
    prompts: Path,
    node_ids: tuple[str, ...],
    timeout_s: float,
    with_jobs: bool,
    with_exam: bool = False,
) -> int:
    store_path = workdir / "master.sqlite3"
    store_path.unlink(missing_ok=True)
    # One reader for the whole run, opened before the master starts: it creates the schema the
    # master's own Store would, and every poll below reuses its connection.
    with contextlib.closing(Store(store_path)) as store:
        return _run_with_store(
            config, workdir, prompts, store, node_ids, timeout_s, with_jobs, with_exam
        )


def _run_with_store(
    config: Path,
    workdir: Path,
    prompts: Path,
    store: Store,
    node_ids: tuple[str, ...],
    timeout_s: float,
    with_jobs: bool,
    with_exam: bool,
) -> int:
    pupils = {
        node: _spawn(
            ["pupil", "run", "--config", str(config), "--node-id", node,
             "--state-dir", str(workdir / node)],
            workdir / f"{node}.log",
        )
        for node in node_ids
    }  # fmt: skip
    master = _spawn(
        ["master", "run", "--config", str(config), "--prompts", str(prompts),
         "--store", str(store.path), "--expect-nodes", str(len(node_ids))],
        workdir / "master.log",
    )  # fmt: skip
    print(f"master and {len(node_ids)} pupils started; logs in {workdir}", flush=True)
    expected = len(load_prompts(prompts)) * len(node_ids)
    jobs_table = None
    try:
        problem = _watch(master, pupils, store, expected, timeout_s)
        if problem is None and with_exam:
            print("lessons done; now the exam: the eval lessons again", flush=True)
            exam = subprocess.call(
                [sys.executable, "-m", "distill_swarm", "exam", "--config", str(config),
                 "--store", str(store.path), "--timeout-s", str(int(timeout_s))]
            )  # fmt: skip
            problem = None if exam == 0 else f"the exam failed (exit {exam})"
        if problem is None and with_jobs:
            print("lessons done; now offloading one job of each kind to the swarm", flush=True)
            jobs_table = run_demo_jobs(load_settings(config, env={}), store.path)
        # Pupils first, so the master is still there to record their goodbyes.
        stop_processes(pupils.values())
        _wait_for_goodbyes(master, store)
    finally:
        stop_processes([master, *pupils.values()])
    print(format_table(store.node_status()))
    if jobs_table is not None:
        print()
        print(jobs_table)
    if problem:
        print(f"demo failed: {problem}; logs in {workdir}", file=sys.stderr)
        return 1
    return 0


def _watch(
    master: subprocess.Popen[bytes],
    pupils: dict[str, subprocess.Popen[bytes]],
    store: Store,
    expected_reports: int,
    timeout_s: float,
) -> str | None:
    """Show a progress bar of reports until all are in; returns what went wrong, if anything."""
    deadline = time.monotonic() + timeout_s
    with tqdm(total=expected_reports, desc="reports", unit="report") as bar:
        while bar.n < expected_reports:
            if master.poll() is not None:
                return f"the master exited early (code {master.returncode})"
            for node, proc in pupils.items():
                if proc.poll() is not None:
                    return f"{node} exited early (code {proc.returncode})"
            if time.monotonic() > deadline:
                return f"not every report arrived within {timeout_s:.0f}s"
            with contextlib.suppress(sqlite3.Error):
                bar.update(store.report_count() - bar.n)
            time.sleep(POLL_S)
    return None


def _wait_for_goodbyes(master: subprocess.Popen[bytes], store: Store) -> None:
    deadline = time.monotonic() + GOODBYE_WAIT_S
    while master.poll() is None and time.monotonic() < deadline:
        if all(row.state == "offline" for row in store.node_status()):
            return
        time.sleep(POLL_S)
