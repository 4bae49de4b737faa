"""`distill-swarm submit KIND --input FILE` and `distill-swarm jobs`."""

from __future__ import annotations

import json
import logging
import sqlite3
import sys
from pathlib import Path
from typing import Annotated

import typer

from distill_swarm.client import JobClient, JobFailed
from shared.cli_options import ConfigOpt, StoreOpt, master_store
from shared.cli_support import ExitCode, exit_on_errors, fail, settings_from, setup_logging
from shared.jobs import KINDS, InvalidJob, render_goal
from shared.messages import JobResult


def _read_input(source: str) -> str:
    if source == "-":
        return sys.stdin.read()
    path = Path(source)
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read --input {path}: {getattr(exc, 'strerror', None) or exc}")


def _parse_params(pairs: list[str]) -> dict[str, str]:
    params: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            fail(f"--param {pair!r}: use KEY=VALUE, e.g. --param language=French")
        params[key.strip()] = value.strip()
    return params


def submit(
    kind: Annotated[str, typer.Argument(help=f"Job kind: {', '.join(KINDS)}.")],
    input_: Annotated[
        str, typer.Option("--input", "-i", help="File holding the job's text; '-' reads stdin.")
    ] = "-",
    param: Annotated[
        list[str] | None,
        typer.Option("--param", "-p", help="A kind's parameter as KEY=VALUE (repeatable)."),
    ] = None,
    deadline_s: Annotated[
        float | None,
        typer.Option("--deadline", min=0.1, help="Seconds a pupil has before the master answers."),
    ] = None,
    timeout_s: Annotated[
        float | None, typer.Option("--timeout", min=1, help="Give up waiting after this long.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Submit one job to the swarm and print the answer (who answered goes to stderr)."""
    setup_logging("WARNING")
    # pika logs every failed connection attempt at ERROR; the one-line error below says it all.
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    settings = settings_from(config, {})
    text = _read_input(input_)
    params = _parse_params(param or [])
    try:
        render_goal(kind, text, params)
    except InvalidJob as exc:
        fail(str(exc))
    with exit_on_errors(), JobClient(settings) as client:
        try:
            result = client.submit(kind, {"text": text, **params}, deadline_s, timeout_s)
        except JobFailed as exc:
            _print(exc.result, as_json)
            fail(str(exc), ExitCode.FAILURE)
        except TimeoutError:
            fail(
                "no answer in time: is the master running? (--timeout to wait longer)",
                ExitCode.FAILURE,
            )
    _print(result, as_json)


def _print(result: JobResult, as_json: bool) -> None:
    if as_json:
        typer.echo(result.model_dump_json(indent=2))
        return
    if result.error is None:
        typer.echo(result.output)
    why = f" (fallback: {result.fallback})" if result.fallback else ""
    typer.echo(
        f"job {result.job_id}: answered by {result.answered_by} in {result.elapsed_s:.2f}s{why}",
        err=True,
    )


COLUMNS = (
    ("submitted (UTC)", 19),
    ("job", 12),
    ("kind", 24),
    ("state", 7),
    ("answered by", 12),
    ("seconds", 7),
    ("agreement", 9),
    ("fallback", 0),
)


def jobs(
    config: ConfigOpt = None,
    store: StoreOpt = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="How many jobs to list.")] = 20,
    kind: Annotated[str | None, typer.Option(help="Only jobs of this kind.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Recent jobs with who answered them, and the sampled agreement per kind and node."""
    from master.job_store import JobStore
    from master.store import Store
    from master.teach_store import TeachStore

    _, path = master_store(config, store)
    if kind is not None and kind not in KINDS:
        fail(f"--kind {kind!r}: not a job kind; use one of {', '.join(KINDS)}")
    try:
        db = Store(path)
        job_store = JobStore(db)
        rows = job_store.recent(limit, kind)
        agreement = job_store.agreement()
        lessons = TeachStore(db).counts("job")
    except sqlite3.DatabaseError as exc:
        fail(f"{path} is not a readable master store: {exc}")
    if as_json:
        typer.echo(json.dumps({
            "jobs": [{
                "job_id": r.job_id, "kind": r.kind, "state": r.state,
                "submitted_at": r.submitted_at.isoformat(), "answered_by": r.answered_by,
                "elapsed_s": r.elapsed_s, "fallback": r.fallback, "agreement": r.agreement,
                "error": r.error, "output": r.output,
            } for r in rows],
            "agreement": [
                {"kind": k, "node": n, "samples": c, "mean": m} for k, n, c, m in agreement
            ],
            "lessons": [
                {"kind": k, "outcome": o, "count": c} for (k, o), c in lessons.items()
            ],
        }, indent=2))  # fmt: skip
        return
    header = "  ".join(name.ljust(width) for name, width in COLUMNS)
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append("  ".join([
            r.submitted_at.isoformat()[:19].replace("T", " "),
            r.job_id[:12].ljust(12),
            r.kind.ljust(24),
            r.state.ljust(7),
            (r.answered_by or "-").ljust(12),
            ("-" if r.elapsed_s is None else f"{r.elapsed_s:.2f}").rjust(7),
            ("-" if r.agreement is None else f"{r.agreement:.3f}").rjust(9),
            r.fallback or r.error or "",
        ]))  # fmt: skip
    if not rows:
        lines.append("(no jobs yet)")
    lines.append("")
    lines.append("agreement with the master on sampled jobs (cosine of answer embeddings)")
    lines.append(f"{'kind':24}  {'node':12}  {'samples':>7}  {'mean':>6}")
    for k, node, count, mean in agreement:
        lines.append(f"{k:24}  {node:12}  {count:7d}  {mean:6.3f}")
    if not agreement:
        lines.append("(no samples yet: master.jobs.sample_rate decides how many jobs are sampled)")
    lines.append("")
    lines.append("lessons made from the master's own job answers (master.jobs.to_lessons)")
    lines.append(f"{'kind':24}  {'outcome':17}  {'count':>7}")
    for (k, outcome), count in lessons.items():
        lines.append(f"{k:24}  {outcome:17}  {count:7d}")
    if not lessons:
        lines.append("(none yet: list job kinds in master.jobs.to_lessons to opt in)")
    typer.echo("\n".join(lines))
