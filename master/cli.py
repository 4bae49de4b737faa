"""`distill-swarm master ...` and `distill-swarm status`."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer
from tqdm import tqdm

from master import evaluation
from master.evaluation import DEFAULT_RESAMPLES, DEFAULT_SEED
from master.exam import Exam, ExamStore, publish_exam
from master.judge import DEFAULT_LIMIT_PER_NODE, run_judge
from master.judge import MAX_TOKENS as JUDGE_MAX_TOKENS
from master.prompts import load_prompts
from master.service import MasterService
from master.status import format_json, format_table
from master.store import Store
from master.teach_store import Source, TeachStore
from shared.backends import embedder_from, generator_from
from shared.broker import Publisher
from shared.cli_options import ConfigOpt, JsonOpt, StoreOpt, master_store
from shared.cli_support import (
    ExitCode,
    exit_on_errors,
    fail,
    settings_from,
    setup_logging,
    stop_on_signals,
)
from shared.metrics import MasterMetrics, serve
from shared.topology import Topology

# `distill-swarm exam`: nodes heard from this recently are waited for; progress is polled.
EXAM_PRESENT_S = 300.0
EXAM_POLL_S = 1.0
EXAM_TIMEOUT_S = 1800.0

app = typer.Typer(
    help="The master service: teach the swarm.", no_args_is_help=True, rich_markup_mode=None
)
log = logging.getLogger(__name__)


@app.command("run")
def run(
    config: ConfigOpt = None,
    prompts: Annotated[
        Path | None, typer.Option(help="Prompt set (.jsonl/.yaml); overrides master.prompts.")
    ] = None,
    store: StoreOpt = None,
    expect_nodes: Annotated[
        int | None, typer.Option(min=0, help="Wait for this many pupils before publishing.")
    ] = None,
    exit_when_done: Annotated[
        bool, typer.Option(help="Exit once every present node reported every lesson.")
    ] = False,
    timeout_s: Annotated[
        float | None, typer.Option(min=1, help="With --exit-when-done: give up after this long.")
    ] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING...")] = "INFO",
) -> None:
    """Publish lessons from a prompt set, ingest the pupils' reports, dispatch jobs."""
    setup_logging(log_level)
    settings = settings_from(
        config,
        {"master.prompts": prompts, "master.store": store, "master.expect_nodes": expect_nodes},
    )
    cfg = settings.master
    # Signals first: a SIGTERM while the models load must still end in a clean exit.
    stop = threading.Event()
    stop_on_signals(stop)
    # Metrics first too: /metrics answers (and the container turns healthy) while models load.
    metrics = MasterMetrics(cfg.metrics_max_nodes)
    serve(metrics.registry, cfg.metrics_addr, cfg.metrics_port)
    with exit_on_errors():
        # Without a prompt set the master teaches nothing and serves jobs and reports only.
        items = load_prompts(cfg.prompts) if cfg.prompts is not None else []
        generator = generator_from(cfg.generator)
        embedder = embedder_from(cfg.embedder)
        service = MasterService(
            settings, generator, embedder, Store(cfg.store), items, stop, metrics
        )
        log.info("master: %d prompts, model %s", len(items), generator.model_name)
        service.run(exit_when_done=exit_when_done, timeout_s=timeout_s)


def status(
    config: ConfigOpt = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Every node with last seen, lessons done, latest loss and eval similarity."""
    settings, path = master_store(config, store)
    db = Store(path)
    rows = db.node_status(settings.master.duplicate_window_s)
    typer.echo(format_json(rows) if as_json else format_table(rows))
    if not as_json:
        typer.echo(_taught_line(TeachStore(db)))


def _taught_line(teach_store: TeachStore) -> str:
    """One line on lessons taught while the master ran: `teach` requests and jobs."""
    parts = []
    sources: tuple[tuple[Source, str], ...] = (("teach", "taught"), ("job", "from jobs"))
    for source, name in sources:
        counts: dict[str, int] = {}
        for (_, outcome), n in teach_store.counts(source).items():
            counts[outcome] = counts.get(outcome, 0) + n
        total = ", ".join(f"{n} {o.replace('_', ' ')}" for o, n in sorted(counts.items()))
        parts.append(f"lessons {name}: {total or 'none'}")
    return "; ".join(parts) + " (`distill-swarm jobs` has them by kind)"


def evaluate(
    config: ConfigOpt = None,
    store: StoreOpt = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Where eval.csv, eval.json and plots go (default: <store dir>/eval)."),
    ] = None,
    judge: Annotated[
        bool, typer.Option("--judge", help="Also let the master model rate answers 1-10.")
    ] = False,
    judge_limit: Annotated[
        int, typer.Option(min=1, help="With --judge: judge up to this many lessons per node.")
    ] = DEFAULT_LIMIT_PER_NODE,
    as_json: JsonOpt = False,
    bootstrap: Annotated[
        int, typer.Option(min=100, max=1_000_000, help="Bootstrap resamples for the 95% CIs.")
    ] = DEFAULT_RESAMPLES,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap's resampling.")] = DEFAULT_SEED,
    exam_id: Annotated[
        str,
        typer.Option("--exam", help="Which exam to report too: an exam id, latest, or none."),
    ] = "latest",
) -> None:
    """Per node and method, on eval lessons: similarity, gain over plain with a CI, the ceiling.

    Online figures (eval lessons as they arrived) and, if the master held one, the exam's (the
    same lessons answered again at the end), each in its own table.
    """
    settings, path = master_store(config, store)
    try:
        db = Store(path)
        data = evaluation.load(db)
    except sqlite3.DatabaseError as exc:
        fail(f"{path} is not a readable master store: {exc}")
    if not data.samples:
        fail(f"no eval reports in {path} yet: nothing to evaluate")
    scores = judge_info = None
    if judge:
        with exit_on_errors():
            generator = generator_from(settings.master.generator)
            scores = run_judge(db, generator, judge_limit)
        judge_info = {
            "model": generator.model_name,
            "limit_per_node": judge_limit,
            "max_tokens": JUDGE_MAX_TOKENS,
        }
    result = evaluation.summarise(data, bootstrap, seed, scores, judge_info)
    exam, exam_result = _exam_evaluation(db, exam_id, bootstrap, seed)
    try:
        # matplotlib comes with the `master` extra; a Pi's base install never needs it.
        from master.plots import write_plots
    except ImportError as exc:
        fail(f"plotting needs matplotlib ({exc}): pip install 'distill-swarm[master]'")
    directory = out or path.parent / "eval"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "eval.csv").write_text(evaluation.to_csv(result.rows))
        (directory / "eval.json").write_text(evaluation.to_json(result) + "\n")
        if exam_result is not None:
            (directory / "exam.csv").write_text(evaluation.to_csv(exam_result.rows))
            (directory / "exam.json").write_text(evaluation.to_json(exam_result) + "\n")
        write_plots(data, directory)
    except OSError as exc:
        fail(f"cannot write the evaluation to {directory}: {exc.strerror or exc}")
    if as_json:
        figures = evaluation.to_dict(result)
        figures["phase"] = "online"
        figures["exam"] = None
        if exam is not None and exam_result is not None:
            figures["exam"] = {"exam_id": exam.exam_id, **evaluation.to_dict(exam_result)}
        typer.echo(json.dumps(figures, indent=2))
        return
    typer.echo(evaluation.format_table(result))
    typer.echo(
        "^ online: each eval lesson as it arrived, interleaved with training (answers given "
        "before and after study rounds)"
    )
    if exam is not None and exam_result is not None:
        typer.echo("")
        typer.echo(evaluation.format_table(exam_result))
        typer.echo(
            f"^ exam {exam.exam_id} (started {exam.started_at[:19]}): the eval lessons answered "
            "again by each node's final model, by every method; nothing learned from them"
        )
    written = "eval.csv, eval.json, " + ("exam.csv, exam.json, " if exam_result else "")
    typer.echo(f"wrote {written}loss.png, heldout.png to {directory}")


def _exam_evaluation(
    db: Store, exam_id: str, bootstrap: int, seed: int
) -> tuple[Exam | None, evaluation.Evaluation | None]:
    """The exam ``exam_id`` (``latest``: the newest; ``none``: skip) and its evaluation."""
    if exam_id == "none":
        return None, None
    exams = ExamStore(db)
    exam = exams.latest() if exam_id == "latest" else exams.get(exam_id)
    if exam is None:
        if exam_id != "latest":
            fail(f"no exam '{exam_id}' in {db.path}")
        return None, None
    data = evaluation.load(db, exams.reports(exam.exam_id))
    if not data.samples:
        return exam, None
    return exam, evaluation.summarise(data, bootstrap, seed)


def exam(
    config: ConfigOpt = None,
    store: StoreOpt = None,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Wait for every present node to answer.")
    ] = True,
    timeout_s: Annotated[
        float, typer.Option(min=1, help="With --wait: give up after this many seconds.")
    ] = EXAM_TIMEOUT_S,
) -> None:
    """Send every published eval lesson again as an exam, answered by each node's final model.

    A running master stores the answers; `distill-swarm eval` then reports the exam apart from
    the online figures. Nodes heard from in the last few minutes are waited for.
    """
    settings, path = master_store(config, store)
    db = Store(path)
    exams = ExamStore(db)
    topology = Topology.for_settings(settings)
    with exit_on_errors():
        publisher = Publisher(settings.broker, topology.declare_master)
        try:
            held = publish_exam(db, exams, publisher, topology)
        except ValueError as exc:
            fail(f"{exc} in {path}")
        finally:
            publisher.close()
    typer.echo(f"exam {held.exam_id} sent: {len(held.lesson_ids)} eval lessons")
    if not wait:
        return
    since = (datetime.now(UTC) - timedelta(seconds=EXAM_PRESENT_S)).isoformat()
    nodes = db.nodes_seen_since(since)
    if not nodes:
        fail("no node was heard from in the last few minutes: nobody to wait for", ExitCode.FAILURE)
    want, have = exams.answered(held.exam_id, nodes)
    deadline = time.monotonic() + timeout_s
    with tqdm(total=want, desc=f"answers from {len(nodes)} nodes", unit="answer") as progress:
        while have < want and time.monotonic() < deadline:
            time.sleep(EXAM_POLL_S)
            _, now_have = exams.answered(held.exam_id, nodes)
            progress.update(now_have - have)
            have = now_have
    if have < want:
        fail(
            f"exam {held.exam_id}: {have} of {want} answers after {timeout_s:.0f}s "
            "(is the master running? `distill-swarm status` shows the nodes)",
            ExitCode.FAILURE,
        )
    typer.echo(f"exam {held.exam_id}: all {want} answers in; `distill-swarm eval` reports it")
