"""`distill-swarm master ...` and `distill-swarm status`."""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path
from typing import Annotated

import typer

from master import evaluation
from master.evaluation import DEFAULT_RESAMPLES, DEFAULT_SEED
from master.judge import DEFAULT_LIMIT_PER_NODE, run_judge
from master.judge import MAX_TOKENS as JUDGE_MAX_TOKENS
from master.prompts import load_prompts
from master.service import MasterService
from master.status import format_json, format_table
from master.store import Store
from shared.backends import embedder_from, generator_from
from shared.cli_support import exit_on_errors, fail, settings_from, setup_logging, stop_on_signals
from shared.metrics import MasterMetrics, serve

app = typer.Typer(
    help="The master service: teach the swarm.", no_args_is_help=True, rich_markup_mode=None
)
log = logging.getLogger(__name__)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML or YAML config file.")]


@app.command("run")
def run(
    config: ConfigOpt = None,
    prompts: Annotated[
        Path | None, typer.Option(help="Prompt set (.jsonl/.yaml); overrides master.prompts.")
    ] = None,
    store: Annotated[Path | None, typer.Option(help="SQLite store path.")] = None,
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
    store: Annotated[Path | None, typer.Option(help="SQLite store path.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Every node with last seen, lessons done, latest loss and eval similarity."""
    settings = settings_from(config, {"master.store": store})
    path = settings.master.store
    if not path.is_file():
        fail(f"no master store at {path}: has the master run here? (--store PATH)")
    rows = Store(path).node_status(settings.master.duplicate_window_s)
    typer.echo(format_json(rows) if as_json else format_table(rows))


def evaluate(
    config: ConfigOpt = None,
    store: Annotated[Path | None, typer.Option(help="SQLite store path.")] = None,
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
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    bootstrap: Annotated[
        int, typer.Option(min=100, max=1_000_000, help="Bootstrap resamples for the 95% CIs.")
    ] = DEFAULT_RESAMPLES,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap's resampling.")] = DEFAULT_SEED,
) -> None:
    """Per node and method, on eval lessons: similarity, gain over plain with a CI, the ceiling."""
    settings = settings_from(config, {"master.store": store})
    path = settings.master.store
    if not path.is_file():
        fail(f"no master store at {path}: has the master run here? (--store PATH)")
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
        write_plots(data, directory)
    except OSError as exc:
        fail(f"cannot write the evaluation to {directory}: {exc.strerror or exc}")
    if as_json:
        typer.echo(evaluation.to_json(result))
    else:
        typer.echo(evaluation.format_table(result))
        typer.echo(f"wrote eval.csv, eval.json, loss.png, heldout.png to {directory}")
