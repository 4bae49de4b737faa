"""`distill-swarm status`: one row per node, read from the master's store."""

from __future__ import annotations

import json
from dataclasses import asdict

from master.store import NodeStatus

COLUMNS = (
    ("node", 12),
    ("state", 10),  # online, offline, or "model down" (the node's model server is out)
    ("last seen (UTC)", 19),
    ("lessons", 7),
    ("missed", 6),
    ("errors", 6),
    ("loss", 7),
    ("lora", 4),
    ("eval n", 6),
    ("sim before", 10),
    ("sim adapted", 11),
    ("sim guided", 10),
    ("job kinds", 9),
    ("offset", 8),
    ("lag", 6),
)


# Lesson ids listed per node under the table; `--json` lists every one.
MISSED_SHOWN = 8


def _num(value: float | None, width: int) -> str:
    return ("-" if value is None else f"{value:.4f}").rjust(width)


def format_table(rows: list[NodeStatus]) -> str:
    """A fixed-width table; similarity means are over eval lessons only."""
    header = "  ".join(name.ljust(width) for name, width in COLUMNS)
    lines = [header, "-" * len(header)]
    for r in rows:
        cells = [
            r.node_id.ljust(12),
            r.state.ljust(10),
            r.last_seen[:19].replace("T", " "),
            str(r.lessons_done).rjust(7),
            str(len(r.missed)).rjust(6),
            str(r.errors).rjust(6),
            _num(r.latest_loss, 7),
            (f"v{r.lora_version}" if r.lora_version else "-").rjust(4),
            str(r.eval_lessons).rjust(6),
            _num(r.mean_before, 10),
            _num(r.mean_adapted, 11),
            _num(r.mean_guided, 10),
            str(len(r.job_kinds)).rjust(9),
            ("-" if r.stream_offset is None else str(r.stream_offset)).rjust(8),
            ("-" if r.stream_lag is None else str(r.stream_lag)).rjust(6),
        ]
        lines.append("  ".join(cells))
    if not rows:
        lines.append("(no node has said hello yet)")
    for r in rows:
        if r.missed:
            shown = ", ".join(lesson[:8] for lesson in r.missed[:MISSED_SHOWN])
            more = (
                f" and {len(r.missed) - MISSED_SHOWN} more" if len(r.missed) > MISSED_SHOWN else ""
            )
            lines.append(f"{r.node_id} missed {len(r.missed)} lessons: {shown}{more}")
        if r.stream_lost is not None:
            first, last = r.stream_lost
            lines.append(
                f"{r.node_id} lost lessons at stream offsets {first}-{last} (up to "
                f"{last - first + 1}): retention dropped them before the node got them"
            )
        if r.state == "duplicate":
            lines.append(
                f"{r.node_id}: two processes speak for this node id (two machines with one id?); "
                "give each machine its own node id"
            )
    lines.append(
        "sim = mean cosine to the master's answer on eval lessons (never trained on): before = "
        "plain answer, adapted = adapter's vector (changes no output), guided = what the pupil "
        "says with its guidance method; job kinds = how many kinds of job the node takes "
        "(`--json` lists them); lora = the LoRA version the node serves (- : its base model); "
        "missed = lessons published before the master first heard from "
        "the node, which its queue never got (`--json` lists them); offset = the highest lesson "
        "stream offset the node has done, lag = offsets between it and the stream's head (an "
        "upper bound of the lessons it has to catch up on; - : per-node queues)"
    )
    return "\n".join(lines)


def format_json(rows: list[NodeStatus]) -> str:
    """The same rows as a JSON list."""
    return json.dumps([{**asdict(r), "stream_lag": r.stream_lag} for r in rows], indent=2)
