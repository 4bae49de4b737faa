"""Options and checks more than one command shares, spelt once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from shared.cli_support import fail, settings_from
from shared.config import Settings

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML or YAML config file.")]
StoreOpt = Annotated[Path | None, typer.Option(help="SQLite store path.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def master_store(config: Path | None, store: Path | None) -> tuple[Settings, Path]:
    """The settings and the master's store path, for commands that read the store.

    Exits with one line if there is no store at that path yet.
    """
    settings = settings_from(config, {"master.store": store})
    path = settings.master.store
    if not path.is_file():
        fail(f"no master store at {path}: has the master run here? (--store PATH)")
    return settings, path
