"""The `distill-swarm` command: master, pupil, status, jobs and the local demo.

This module only composes the two roles' command groups; `master/` and `pupil_node/` never import
each other.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer

from distill_swarm.demo import DEMO_MODELS, run_demo
from shared.cli_support import exit_on_errors, setup_logging

app = typer.Typer(
    help="Teach small edge models to answer like a large one, over RabbitMQ.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Plain click errors: a bad option is explained on one `Error: ...` line, no box drawing.
    rich_markup_mode=None,
)


def _register() -> None:
    # Imported here so `distill-swarm pupil` on a Pi never imports the master's modules' deps.
    from distill_swarm.jobs_cli import jobs, submit
    from distill_swarm.teach_cli import teach
    from master.cli import app as master_app
    from master.cli import evaluate, exam, status
    from master.node_cli import app as node_app
    from pupil_node.cli import app as pupil_app

    app.add_typer(master_app, name="master")
    app.add_typer(pupil_app, name="pupil")
    app.add_typer(node_app, name="node")
    app.command("status")(status)
    app.command("eval")(evaluate)
    app.command("exam")(exam)
    app.command("submit")(submit)
    app.command("jobs")(jobs)
    app.command("teach")(teach)


@app.command("demo")
def demo(
    nodes: Annotated[int, typer.Option(min=1, max=8, help="How many pupil processes.")] = 2,
    prompts: Annotated[
        Path | None, typer.Option(help="Prompt set to teach from (default: the bundled one).")
    ] = None,
    workdir: Annotated[
        Path | None,
        typer.Option(help="Where logs, store and checkpoints go (default: a temp dir)."),
    ] = None,
    max_tokens: Annotated[int, typer.Option(min=8, max=1024, help="Answer length cap.")] = 64,
    timeout_s: Annotated[float, typer.Option(min=10, help="Give up after this long.")] = 1200,
    backend: Annotated[
        str,
        typer.Option(
            help="embedded: the models run in each process; ollama: the same models from the "
            "Ollama server at $OLLAMA_HOST (scripts/demo --backend ollama starts one)."
        ),
    ] = "embedded",
) -> None:
    """Run a master and N pupils on the embedded models (or Ollama) over a local RabbitMQ."""
    setup_logging("WARNING")
    if backend not in DEMO_MODELS:
        raise typer.BadParameter(f"use one of: {', '.join(DEMO_MODELS)}", param_hint="--backend")
    directory = workdir or Path(tempfile.mkdtemp(prefix="distill-swarm-demo-"))
    with exit_on_errors():
        code = run_demo(nodes, prompts, directory, max_tokens, timeout_s, backend)
    raise typer.Exit(code)


_register()


def main() -> None:
    """Console-script entry point."""
    app()
