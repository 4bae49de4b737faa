"""`distill-swarm pupil ...`."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Annotated

import typer

from shared.backends import embedder_from, generator_from
from shared.cli_support import exit_on_errors, fail, settings_from, setup_logging, stop_on_signals
from shared.metrics import PupilMetrics, serve

app = typer.Typer(
    help="A pupil node: learn from the master.", no_args_is_help=True, rich_markup_mode=None
)
log = logging.getLogger(__name__)


@app.command("run")
def run(
    node_id: Annotated[
        str | None, typer.Option(help="This node's id (letters, digits, . _ -).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="TOML or YAML config file.")
    ] = None,
    state_dir: Annotated[
        Path | None, typer.Option(help="Where the adapter checkpoint and journal live.")
    ] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING...")] = "INFO",
) -> None:
    """Consume lessons, answer, train the adapter, report back."""
    setup_logging(log_level)
    settings = settings_from(config, {"pupil.node_id": node_id, "pupil.state_dir": state_dir})
    cfg = settings.pupil
    # Imported here, not at the top: they pull in torch (seconds to import), which every other
    # `distill-swarm` command (status, eval, node add) would otherwise pay for.
    from pupil_node.node import PupilNode
    from pupil_node.service import PupilService

    if cfg.node_id is None:
        fail("no node id: give --node-id NAME or set pupil.node_id")
    # Signals first: a SIGTERM while the models load must still end in a clean exit.
    stop = threading.Event()
    stop_on_signals(stop)
    metrics = PupilMetrics()
    serve(metrics.registry, cfg.metrics_addr, cfg.metrics_port)
    with exit_on_errors():
        generator = generator_from(cfg.generator)
        embedder = embedder_from(cfg.embedder)
        node = PupilNode(cfg.node_id, cfg, generator, embedder)
        service = PupilService(settings, node, stop, metrics)
        log.info(
            "pupil %s: model %s, adapter v%d",
            cfg.node_id,
            generator.model_name,
            node.trainer.version,
        )
        service.run()
