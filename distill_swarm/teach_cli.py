"""`distill-swarm teach [FILE|-]`: prompts for a running master to teach the swarm."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from distill_swarm.teach import DEFAULT_TIMEOUT_S, TeachClient
from master.prompts import prompts_from_jsonl
from shared.cli_options import ConfigOpt
from shared.cli_support import ExitCode, exit_on_errors, fail, settings_from, setup_logging
from shared.errors import ConfigError
from shared.messages import TeachResult


def _read(source: str) -> tuple[str, str]:
    """(text, name for errors) of FILE, or of stdin for ``-``."""
    if source == "-":
        return sys.stdin.read(), "stdin"
    path = Path(source)
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}")


def _line(result: TeachResult) -> str:
    lesson = "-" if result.lesson_id is None else result.lesson_id
    split = f" ({result.split})" if result.split else ""
    detail = f": {result.detail}" if result.detail else ""
    return f"{result.prompt_id}\t{result.outcome}\t{lesson}{split}{detail}"


def teach(
    source: Annotated[
        str, typer.Argument(help="JSONL prompts (as master/prompt_sets/*.jsonl); '-' reads stdin.")
    ] = "-",
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Wait for the master's answer to each.")
    ] = True,
    timeout_s: Annotated[
        float, typer.Option("--timeout", min=1, help="With --wait: give up after this long.")
    ] = DEFAULT_TIMEOUT_S,
    as_json: Annotated[bool, typer.Option("--json", help="Print the answers as JSON.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Send prompts to the running master, which answers and publishes them as lessons.

    Teaching a prompt again (same id and text, same master model) publishes nothing new and
    says so (`already_published`).
    """
    setup_logging("WARNING")
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    settings = settings_from(config, {})
    text, where = _read(source)
    try:
        items = prompts_from_jsonl(text, where)
    except ConfigError as exc:
        fail(str(exc))
    with exit_on_errors(), TeachClient(settings) as client:
        sent = client.send(items, wait=wait)
        if not wait:
            typer.echo(f"sent {len(sent)} prompts; the master answers them as it can", err=True)
            return
        on_result = None if as_json else (lambda result: typer.echo(_line(result)))
        try:
            results = client.results(sent, timeout_s, on_result)
        except TimeoutError as exc:
            fail(f"{exc}: is the master running? (--timeout to wait longer)", ExitCode.FAILURE)
    if as_json:
        typer.echo(json.dumps([r.model_dump(mode="json") for r in results], indent=2))
    counts: dict[str, int] = {}
    for result in results:
        counts[result.outcome] = counts.get(result.outcome, 0) + 1
    summary = ", ".join(f"{n} {outcome.replace('_', ' ')}" for outcome, n in sorted(counts.items()))
    typer.echo(f"{len(results)} prompts: {summary}", err=True)
    bad = counts.get("refused", 0) + counts.get("failed", 0)
    if bad:
        fail(f"{bad} of {len(results)} prompts were not taught (see above)", ExitCode.FAILURE)
