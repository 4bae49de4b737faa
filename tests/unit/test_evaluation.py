"""`distill-swarm eval`: eval-only figures, paired bootstrap CIs, the ceiling, files and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Literal

import numpy as np
import pytest

from master.evaluation import (
    ADAPTER_VECTOR,
    ALL_NODES,
    PLAIN,
    EvalData,
    Row,
    Sample,
    bootstrap_ci,
    ceiling_note,
    format_table,
    load,
    summarise,
    to_csv,
    to_json,
)
from master.plots import write_plots
from master.store import Store
from shared.messages import Embedding, Lesson, Report

N_EVAL = 40
N_TRAIN = 6
GAIN = 0.1  # best_of_k is this much better than plain on every lesson, plus noise
LOSS = -0.08  # worse is this much worse
DECODING = "temperature=0.7 top_p=0.95 max_tokens=96 seed=0"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def lesson(lesson_id: str, split: Literal["train", "eval"]) -> Lesson:
    return Lesson(
        lesson_id=lesson_id,
        task="qa",
        prompt=f"prompt {lesson_id}",
        goal_text=f"question {lesson_id}",
        master_model="m",
        master_answer=f"master answer {lesson_id}",
        reference=Embedding(model="e", dim=2, values=[1.0, 0.0]),
        split=split,
    )


def eval_report(
    lesson_id: str,
    node: str,
    version: int,
    before: float,
    adapted: float,
    guided: dict[str, float],
    error: str | None = None,
) -> Report:
    return Report(
        lesson_id=lesson_id,
        node_id=node,
        split="eval",
        pupil_model="p",
        pupil_answer=f"{node} answer {lesson_id}",
        similarity_before=before,
        similarity_adapted=adapted,
        guided=guided,
        guided_answers={m: f"{node} {m} answer {lesson_id}" for m in guided},
        adapter_version=version,
        error=error,
    )


def train_report(lesson_id: str, node: str, version: int, losses: list[float]) -> Report:
    # Extreme similarities: if a train lesson leaked into any figure, the means would show it.
    return Report(
        lesson_id=lesson_id,
        node_id=node,
        split="train",
        pupil_model="p",
        similarity_before=-1.0,
        similarity_adapted=1.0,
        guided={"best_of_k": -1.0},
        losses=losses,
        trained=True,
        adapter_version=version,
    )


class Truth:
    """What was put in the store, per node and method: lesson -> similarity."""

    def __init__(self) -> None:
        self.sims: dict[tuple[str, str], dict[str, float]] = {}
        self.ceilings: dict[str, float] = {}

    def put(self, node: str, method: str, lesson_id: str, value: float) -> None:
        self.sims.setdefault((node, method), {})[lesson_id] = value


@pytest.fixture
def filled(tmp_path: Path) -> tuple[Path, Truth]:
    """A store with 2 nodes: a reports 40 eval lessons, b 30 (and no `worse` method)."""
    rng = np.random.default_rng(7)
    path = tmp_path / "master.sqlite3"
    store = Store(path)
    store.set_meta("master_decoding", DECODING)
    truth = Truth()
    for i in range(N_TRAIN):
        # A train lesson's ceiling must never reach a figure either.
        store.save_lesson(lesson(f"t{i}", "train"), f"t{i}", i, ceiling=0.0)
    for i in range(N_EVAL):
        lesson_id = f"e{i}"
        ceiling = None if i % 5 == 0 else round(0.8 + 0.01 * (i % 7), 4)
        store.save_lesson(lesson(lesson_id, "eval"), lesson_id, N_TRAIN + i, ceiling=ceiling)
        if ceiling is not None:
            truth.ceilings[lesson_id] = ceiling
    # An eval lesson whose only report failed: neither its figures nor its ceiling count.
    store.save_lesson(lesson("bad", "eval"), "bad", 999, ceiling=0.0)
    for node, count in (("a", N_EVAL), ("b", 30)):
        for i in range(count):
            lesson_id = f"e{i}"
            plain = float(rng.uniform(0.3, 0.7))
            sims = {
                PLAIN: plain,
                ADAPTER_VECTOR: plain + float(rng.normal(0.0, 0.05)),
                "best_of_k": plain + GAIN + float(rng.normal(0.0, 0.03)),
                # Equal to plain on average: +/- 0.03 alternately, mean difference exactly 0.
                "retrieval": plain + (0.03 if i % 2 else -0.03),
            }
            if node == "a":
                sims["worse"] = plain + LOSS + float(rng.normal(0.0, 0.03))
            for method, value in sims.items():
                truth.put(node, method, lesson_id, value)
            guided = {m: v for m, v in sims.items() if m not in (PLAIN, ADAPTER_VECTOR)}
            store.add_report(
                eval_report(lesson_id, node, i // 4, plain, sims[ADAPTER_VECTOR], guided)
            )
        store.add_report(eval_report("bad", node, 0, -1.0, -1.0, {"best_of_k": -1.0}, "boom"))
        # Train reports arrive out of adapter order; losses are concatenated in adapter order.
        for version in (3, 1, 2):
            store.add_report(train_report(f"t{version}", node, version, [version, version / 2]))
    store.close()
    return path, truth


def rows_by_key(rows: tuple[Row, ...]) -> dict[tuple[str, str], Row]:
    return {(r.node, r.method): r for r in rows}


def test_means_n_and_ceiling_per_node_and_method(filled: tuple[Path, Truth]) -> None:
    path, truth = filled
    rows = rows_by_key(summarise(load(Store(path)), resamples=2000).rows)
    assert set(rows) == {
        *((node, m) for node in ("a", "b", ALL_NODES) for m in truth_methods(truth, node)),
    }
    for (node, method), values in truth.sims.items():
        row = rows[(node, method)]
        assert row.n == len(values) == (N_EVAL if node == "a" else 30)
        assert row.mean_similarity == pytest.approx(np.mean(list(values.values())))
        ceilings = [truth.ceilings[i] for i in values if i in truth.ceilings]
        assert row.n_ceiling == len(ceilings)
        assert row.ceiling == pytest.approx(np.mean(ceilings))
    assert rows[("a", PLAIN)].improvement is None


def truth_methods(truth: Truth, node: str) -> set[str]:
    return {m for n, m in truth.sims if node in (ALL_NODES, n)}


def test_improvement_ci_finds_better_equal_and_worse(filled: tuple[Path, Truth]) -> None:
    path, truth = filled
    rows = rows_by_key(summarise(load(Store(path))).rows)
    for node in ("a", "b", ALL_NODES):
        better = rows[(node, "best_of_k")]
        assert better.ci_low is not None and better.ci_high is not None
        assert better.improvement is not None and better.improvement > 0
        assert 0 < better.ci_low < GAIN < better.ci_high
        equal = rows[(node, "retrieval")]
        assert equal.ci_low is not None and equal.ci_high is not None
        assert equal.ci_low < 0 < equal.ci_high
        assert equal.improvement == pytest.approx(0.0, abs=1e-9)
    worse = rows[("a", "worse")]
    assert worse.ci_low is not None and worse.ci_high is not None
    assert worse.ci_low < LOSS < worse.ci_high < 0
    # The paired mean is exactly the mean of the per-lesson differences that went in.
    a = truth.sims
    diffs = [a[("a", "best_of_k")][i] - a[("a", PLAIN)][i] for i in a[("a", PLAIN)]]
    assert rows[("a", "best_of_k")].improvement == pytest.approx(np.mean(diffs))


def test_all_pools_every_node(filled: tuple[Path, Truth]) -> None:
    path, truth = filled
    rows = rows_by_key(summarise(load(Store(path)), resamples=500).rows)
    for method in (PLAIN, ADAPTER_VECTOR, "best_of_k", "retrieval"):
        pooled = [*truth.sims[("a", method)].values(), *truth.sims[("b", method)].values()]
        row = rows[(ALL_NODES, method)]
        assert row.n == len(pooled) == N_EVAL + 30
        assert row.mean_similarity == pytest.approx(np.mean(pooled))
    # Only node a measured `worse`: the pooled row is a's.
    assert rows[(ALL_NODES, "worse")].n == rows[("a", "worse")].n


def test_train_lessons_and_errored_reports_never_count(filled: tuple[Path, Truth]) -> None:
    path, _ = filled
    data = load(Store(path))
    assert {s.lesson_id for s in data.samples} == {f"e{i}" for i in range(N_EVAL)}
    # -1.0 is only in train and errored reports; no figure may have seen it.
    assert min(s.similarity for s in data.samples) > -0.5
    assert all(r.ceiling is None or r.ceiling > 0.5 for r in summarise(data, 200).rows)
    assert data.losses == {"a": (1, 0.5, 2, 1, 3, 1.5), "b": (1, 0.5, 2, 1, 3, 1.5)}


def test_bootstrap_is_seeded_and_needs_two_lessons() -> None:
    sums = np.array([0.1, 0.3, 0.2, 0.5])
    counts = np.ones(4)
    assert bootstrap_ci(sums, counts, 1000, seed=1) == bootstrap_ci(sums, counts, 1000, seed=1)
    assert bootstrap_ci(np.array([0.2]), np.ones(1)) is None
    low, high = bootstrap_ci(sums, counts, 5000, seed=0) or (0.0, 0.0)
    assert 0.1 <= low < float(sums.mean()) < high <= 0.5


def test_ceiling_note_says_greedy_means_one() -> None:
    greedy = "temperature=0.0 top_p=0.95 max_tokens=96 seed=0"
    assert "the ceiling is 1" in ceiling_note(greedy)
    assert "the ceiling is 1" not in ceiling_note(DECODING)
    assert "not recorded" in ceiling_note(None)


def test_table_csv_json_and_plots(filled: tuple[Path, Truth], tmp_path: Path) -> None:
    path, _ = filled
    data = load(Store(path))
    result = summarise(data, resamples=500)
    table = format_table(result)
    assert "adapter-vector*" in table and "changes no output" in table
    assert DECODING in table
    csv_lines = to_csv(result.rows).splitlines()
    assert csv_lines[0].startswith("node,method,n,mean_similarity")
    assert len(csv_lines) == 1 + len(result.rows)
    parsed = json.loads(to_json(result))
    assert parsed["master_decoding"] == DECODING
    assert len(parsed["rows"]) == len(result.rows)
    for png in write_plots(data, tmp_path / "plots"):
        assert_png(png)


def test_plots_cope_with_one_node_and_no_training(tmp_path: Path) -> None:
    data = EvalData(
        samples=(Sample("l", "solo", PLAIN, 0.5, 0),), ceilings={}, losses={}, decoding=None
    )
    for png in write_plots(data, tmp_path):
        assert_png(png)


def assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC
    height, width, _ = matplotlib.image.imread(path).shape
    assert height > 100 and width > 100


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "distill_swarm", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cli_prints_the_table_and_writes_files(filled: tuple[Path, Truth]) -> None:
    path, _ = filled
    result = run_cli("eval", "--store", str(path))
    assert result.returncode == 0, result.stderr
    header = result.stdout.splitlines()[0].split()
    assert header[:4] == ["node", "method", "n", "mean"]
    assert "best_of_k" in result.stdout and "adapter-vector*" in result.stdout
    out = path.parent / "eval"
    for name in ("eval.csv", "eval.json", "loss.png", "heldout.png"):
        assert (out / name).stat().st_size > 0
    as_json = run_cli("eval", "--store", str(path), "--json", "--bootstrap", "500")
    assert as_json.returncode == 0, as_json.stderr
    rows = json.loads(as_json.stdout)["rows"]
    assert {(r["node"], r["method"]) for r in rows} >= {("a", "best_of_k"), ("all", "plain")}


@pytest.mark.parametrize(
    ("contents", "expected"),
    [
        ("missing", "no master store"),
        ("empty", "no eval reports"),
        ("train only", "no eval reports"),
    ],
)
def test_cli_without_eval_reports_exits_2(tmp_path: Path, contents: str, expected: str) -> None:
    path = tmp_path / "master.sqlite3"
    if contents != "missing":
        store = Store(path)
        if contents == "train only":
            store.add_report(train_report("t1", "a", 1, [0.5]))
        store.close()
    result = run_cli("eval", "--store", str(path))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0]
    assert not result.stdout
