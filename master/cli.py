"""`distill-swarm master ...` and `distill-swarm status`."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Annotated

import typer

from master.prompts import load_prompts
from master.service import MasterService
from master.status import format_json, format_table
from master.store import Store
from shared.backends import build_embedder, build_generator
from shared.cli_support import exit_on_errors, fail, settings_from, setup_logging, stop_on_signals

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
    """Publish lessons from a prompt set and ingest the pupils' reports."""
    setup_logging(log_level)
    settings = settings_from(
        config,
        {"master.prompts": prompts, "master.store": store, "master.expect_nodes": expect_nodes},
    )
    cfg = settings.master
    if cfg.prompts is None:
        fail("no prompt set: give --prompts FILE or set master.prompts")
    # Signals first: a SIGTERM while the models load must still end in a clean exit.
    stop = threading.Event()
    stop_on_signals(stop)
    with exit_on_errors():
        items = load_prompts(cfg.prompts)
        generator = build_generator(
            cfg.generator.kind,
            cfg.generator.model,
            url=cfg.generator.url,
            timeout_s=cfg.generator.timeout_s,
            n_threads=cfg.generator.threads,
        )
        embedder = build_embedder(
            cfg.embedder.kind,
            cfg.embedder.model,
            url=cfg.embedder.url,
            timeout_s=cfg.embedder.timeout_s,
        )
        service = MasterService(settings, generator, embedder, Store(cfg.store), items, stop)
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
    rows = Store(path).node_status()
    typer.echo(format_json(rows) if as_json else format_table(rows))
