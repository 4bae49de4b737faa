"""`distill-swarm eval`: per-node, per-method figures over eval lessons, with bootstrap CIs.

Only eval lessons count (prompts no node trained on), and only reports without an error. The
methods compared on each lesson:

- ``plain``: the pupil's own answer (``similarity_before``), the baseline;
- ``adapter-vector``: the adapter's *prediction* in embedding space (``similarity_adapted``). It
  changes no output, so it is context, not something a user ever reads;
- every guided method a node measured (``Report.guided``, e.g. ``best_of_k``, ``retrieval``):
  answers the pupil actually gives.

Improvement over ``plain`` is paired: d = sim(method) - sim(plain) on the same lesson and node.
Its 95% interval is a percentile bootstrap that resamples *lessons*, with all of a lesson's node
pairs together (a cluster bootstrap): nodes answer the same prompts, so in the pooled ``all`` row
their pairs are not independent, and resampling pairs would make that interval too narrow. For a
single node every lesson holds one pair, and this is the ordinary paired bootstrap.

This module reads the store and computes; it writes nothing. The CLI writes the files.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from master.store import Store
from shared.messages import Report

PLAIN = "plain"
ADAPTER_VECTOR = "adapter-vector"
ALL_NODES = "all"
BASE_METHODS = (PLAIN, ADAPTER_VECTOR)

DEFAULT_RESAMPLES = 10_000
DEFAULT_SEED = 0
CONFIDENCE = 0.95
# Resampled indices are drawn in chunks of at most this many, so 10,000 resamples of a large
# benchmark stay within a few tens of MB.
_BOOTSTRAP_CHUNK_CELLS = 2_000_000

# (lesson, node, method) -> judge score, None when the judge's output held no parseable score.
Judgements = Mapping[tuple[str, str, str], int | None]


def guided_label(name: str) -> str:
    """The method label of a guided method; renamed if it would shadow a built-in one."""
    return f"guided-{name}" if name in BASE_METHODS else name


@dataclass(frozen=True)
class Sample:
    """One similarity figure: one method on one eval lesson at one node."""

    lesson_id: str
    node_id: str
    method: str
    similarity: float
    adapter_version: int  # lessons the node had learned before this eval lesson


@dataclass(frozen=True)
class EvalData:
    """Everything `eval` computes from, read out of the master's store."""

    samples: tuple[Sample, ...]
    ceilings: Mapping[str, float]  # lesson_id -> the master's self-agreement
    losses: Mapping[str, tuple[float, ...]]  # node -> training losses per optimizer step
    decoding: str | None  # the master's decoding settings, which the ceiling depends on
    master_model: str | None = None

    @property
    def nodes(self) -> tuple[str, ...]:
        """Every node with at least one eval figure, sorted."""
        return tuple(sorted({s.node_id for s in self.samples}))

    @property
    def methods(self) -> tuple[str, ...]:
        """``plain``, ``adapter-vector``, then the guided methods by name."""
        seen = {s.method for s in self.samples}
        return (*BASE_METHODS, *sorted(seen - set(BASE_METHODS)))


@dataclass(frozen=True)
class Row:
    """One line of the eval table: one node (or ``all``) and one method."""

    node: str
    method: str
    n: int  # eval lessons (node pairs, for ``all``) with a figure for this method
    mean_similarity: float | None
    n_paired: int  # of those, how many also have a plain figure
    improvement: float | None  # mean paired difference to plain; None for plain itself
    ci_low: float | None
    ci_high: float | None
    ceiling: float | None  # mean master self-agreement over the same lessons
    n_ceiling: int
    judge_n: int | None = None  # judged answers, unparseable ones included
    judge_mean: float | None = None  # mean score of the parseable ones
    judge_unparsed: int | None = None


@dataclass(frozen=True)
class Evaluation:
    """The rows plus what a reader needs to interpret them."""

    rows: tuple[Row, ...]
    decoding: str | None
    ceiling_note: str
    resamples: int
    seed: int
    master_model: str | None = None
    judge: Mapping[str, object] | None = None


def load(store: Store, exam_reports: Sequence[Report] | None = None) -> EvalData:
    """Read eval figures, ceilings, training losses and decoding settings from the store.

    The eval figures are the online ones (each eval lesson as it arrived, interleaved with
    training) unless ``exam_reports`` is given: then they are that exam's (master/exam.py).
    """
    samples: list[Sample] = []
    train: dict[str, list[tuple[int, list[float]]]] = defaultdict(list)
    reports = store.reports()
    for r in reports:
        if r.error is None and r.split == "train" and r.trained and r.losses:
            train[r.node_id].append((r.adapter_version, list(r.losses)))
    for r in reports if exam_reports is None else exam_reports:
        if r.error is not None or r.split == "train":
            continue
        figures: list[tuple[str, float | None]] = [
            (PLAIN, r.similarity_before),
            (ADAPTER_VECTOR, r.similarity_adapted),
            *((guided_label(m), v) for m, v in r.guided.items()),
        ]
        samples.extend(
            Sample(r.lesson_id, r.node_id, method, float(value), r.adapter_version)
            for method, value in figures
            if value is not None
        )
    losses = {
        node: tuple(step for _, steps in sorted(items, key=lambda x: x[0]) for step in steps)
        for node, items in train.items()
    }
    meta = store.meta()
    return EvalData(
        samples=tuple(samples),
        ceilings=store.lesson_ceilings(),
        losses=losses,
        decoding=meta.get("master_decoding"),
        master_model=meta.get("master_model"),
    )


def bootstrap_ci(
    sums: np.ndarray,
    counts: np.ndarray,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = CONFIDENCE,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of a ratio mean sum(x) / count over resampled clusters.

    ``sums[i]`` and ``counts[i]`` are the sum and number of values in cluster i (one lesson).
    Clusters are drawn with replacement, ``resamples`` times; the interval holds the central
    ``confidence`` share of the resampled means. None with fewer than 2 clusters, where a
    bootstrap says nothing about spread.
    """
    sums = np.asarray(sums, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    k = sums.shape[0]
    if k < 2:
        return None
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOTSTRAP_CHUNK_CELLS // k)
    means = np.empty(resamples, dtype=np.float64)
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        idx = rng.integers(0, k, size=(stop - start, k))
        means[start:stop] = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)


def _paired_clusters(
    method: dict[tuple[str, str], float], plain: dict[tuple[str, str], float]
) -> tuple[np.ndarray, np.ndarray]:
    """Per-lesson sums and counts of d = method - plain over (lesson, node) pairs with both."""
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for key, value in method.items():
        if key in plain:
            sums[key[0]] += value - plain[key]
            counts[key[0]] += 1
    lessons = sorted(sums)
    return (
        np.array([sums[lesson] for lesson in lessons], dtype=np.float64),
        np.array([counts[lesson] for lesson in lessons], dtype=np.float64),
    )


def _judge_figures(judgements: Judgements, node: str, method: str) -> tuple[int, float | None, int]:
    scores = [s for (_, n, m), s in judgements.items() if m == method and node in (ALL_NODES, n)]
    parsed = [s for s in scores if s is not None]
    mean = float(np.mean(parsed)) if parsed else None
    return len(scores), mean, len(scores) - len(parsed)


def _row(
    node: str,
    method: str,
    figures: dict[tuple[str, str], float],
    plain: dict[tuple[str, str], float],
    ceilings: Mapping[str, float],
    resamples: int,
    seed: int,
    judgements: Judgements | None,
) -> Row:
    values = list(figures.values())
    lesson_ceilings = [ceilings[lesson] for lesson, _ in figures if lesson in ceilings]
    improvement = ci = None
    n_paired = sum(key in plain for key in figures)
    if method != PLAIN and n_paired:
        sums, counts = _paired_clusters(figures, plain)
        improvement = float(sums.sum() / counts.sum())
        ci = bootstrap_ci(sums, counts, resamples, seed)
    judge: tuple[int | None, float | None, int | None] = (None, None, None)
    if judgements is not None and method != ADAPTER_VECTOR:
        judge = _judge_figures(judgements, node, method)
    return Row(
        node=node,
        method=method,
        n=len(values),
        mean_similarity=float(np.mean(values)) if values else None,
        n_paired=n_paired if method != PLAIN else len(values),
        improvement=improvement,
        ci_low=None if ci is None else ci[0],
        ci_high=None if ci is None else ci[1],
        ceiling=float(np.mean(lesson_ceilings)) if lesson_ceilings else None,
        n_ceiling=len(lesson_ceilings),
        judge_n=judge[0],
        judge_mean=judge[1],
        judge_unparsed=judge[2],
    )


def summarise(
    data: EvalData,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    judgements: Judgements | None = None,
    judge: Mapping[str, object] | None = None,
) -> Evaluation:
    """One row per node and method, then one per method pooling every node (``all``).

    ``judgements`` (from :func:`master.judge.run_judge`) adds the judge's mean score and counts
    beside the cosine figures; ``judge`` describes the judge (model, limits) for the output.
    """
    by: dict[tuple[str, str], dict[tuple[str, str], float]] = defaultdict(dict)
    for s in data.samples:
        by[(s.node_id, s.method)][(s.lesson_id, s.node_id)] = s.similarity
        by[(ALL_NODES, s.method)][(s.lesson_id, s.node_id)] = s.similarity
    rows = [
        _row(
            node,
            method,
            by[(node, method)],
            by[(node, PLAIN)],
            data.ceilings,
            resamples,
            seed,
            judgements,
        )
        for node in (*data.nodes, ALL_NODES)
        for method in data.methods
        if by.get((node, method))
    ]
    return Evaluation(
        rows=tuple(rows),
        decoding=data.decoding,
        ceiling_note=ceiling_note(data.decoding),
        resamples=resamples,
        seed=seed,
        master_model=data.master_model,
        judge=judge,
    )


def master_temperature(decoding: str | None) -> float | None:
    """The temperature in a ``master_decoding`` string, e.g. ``temperature=0.0 top_p=0.95``."""
    match = re.search(r"temperature=([0-9.eE+-]+)", decoding or "")
    if match is None:
        return None
    try:
        return float(match.group(1))
    except ValueError:
        return None


def ceiling_note(decoding: str | None) -> str:
    """What the ceiling means under the master's decoding settings (one sentence)."""
    if decoding is None:
        return "the master's decoding settings are not recorded in this store"
    if master_temperature(decoding) == 0.0:
        return "greedy decoding: the master always gives the same answer, so the ceiling is 1"
    return "the mean cos between two master answers to the same prompt"


# -- output formats (strings only; the CLI writes them) ------------------------------------

CSV_FIELDS = tuple(Row.__dataclass_fields__)

_TABLE = (
    ("node", 12, "<"),
    ("method", 20, "<"),
    ("n", 5, ">"),
    ("mean sim", 8, ">"),
    ("vs plain", 8, ">"),
    ("95% CI", 17, ">"),
    ("ceiling", 7, ">"),
)
_JUDGE_TABLE = (("judge n", 7, ">"), ("judge mean", 10, ">"), ("unparsed", 8, ">"))


def _num(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def _cells(row: Row, judged: bool) -> list[str]:
    ci = "-" if row.ci_low is None else f"[{row.ci_low:+.3f}, {row.ci_high:+.3f}]"
    label = row.method + ("*" if row.method == ADAPTER_VECTOR else "")
    cells = [
        row.node,
        label,
        str(row.n),
        _num(row.mean_similarity),
        _num(row.improvement, signed=True),
        ci,
        _num(row.ceiling),
    ]
    if judged:
        mean = "-" if row.judge_mean is None else f"{row.judge_mean:.2f}"
        cells += [
            "-" if row.judge_n is None else str(row.judge_n),
            mean,
            "-" if row.judge_unparsed is None else str(row.judge_unparsed),
        ]
    return cells


def format_table(evaluation: Evaluation) -> str:
    """A fixed-width table with the notes a reader needs under it."""
    judged = evaluation.judge is not None
    columns = _TABLE + (_JUDGE_TABLE if judged else ())

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if align == "<" else c.rjust(w)
            for c, (_, w, align) in zip(cells, columns, strict=True)
        ).rstrip()

    header = line([name for name, _, _ in columns])
    out = [header, "-" * len(header)]
    previous = None
    for row in evaluation.rows:
        if previous is not None and row.node != previous:
            out.append("")
        previous = row.node
        out.append(line(_cells(row, judged)))
    out += [
        "",
        "sim = mean cosine to the master's answer on eval lessons only (never trained on)",
        "vs plain = mean paired difference to the plain answer on the same lessons; "
        f"{CONFIDENCE:.0%} CI:",
        f"  percentile bootstrap over lessons, {evaluation.resamples} resamples, "
        f"seed {evaluation.seed}",
        f"* {ADAPTER_VECTOR}: the adapter's prediction in embedding space; it changes no output",
        "lora = the plain prompt answered by the node's own model with its served LoRA adapter "
        "(one sample); plain = the base model",
        "ceiling = the master's agreement with itself on the same lessons; master decoding:",
        f"  {evaluation.decoding or '(not recorded)'}",
        f"  -> {evaluation.ceiling_note}",
    ]
    if judged and evaluation.judge is not None:
        out += [
            f"judge = {evaluation.judge.get('model')} rating agreement with the master 1-10, "
            f"up to {evaluation.judge.get('limit_per_node')} lessons per node;",
            "  unparsed = outputs with no score: counted in judge n, left out of the mean",
        ]
    return "\n".join(out)


def _clean(value: object) -> object:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def to_dict(evaluation: Evaluation) -> dict[str, object]:
    """The evaluation as plain JSON-ready data."""
    return {
        "master_model": evaluation.master_model,
        "master_decoding": evaluation.decoding,
        "ceiling_note": evaluation.ceiling_note,
        "bootstrap": {
            "method": "percentile, paired differences, resampling lessons (clusters of pairs)",
            "confidence": CONFIDENCE,
            "resamples": evaluation.resamples,
            "seed": evaluation.seed,
        },
        "judge": None if evaluation.judge is None else dict(evaluation.judge),
        "rows": [{k: _clean(v) for k, v in asdict(r).items()} for r in evaluation.rows],
    }


def to_json(evaluation: Evaluation) -> str:
    """The evaluation as indented JSON."""
    return json.dumps(to_dict(evaluation), indent=2, allow_nan=False)


def to_csv(rows: Iterable[Row]) -> str:
    """One CSV line per row, every field of :class:`Row`; empty cells for missing figures."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in asdict(row).items()})
    return buffer.getvalue()
