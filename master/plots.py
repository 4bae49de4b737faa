"""PNG plots for `distill-swarm eval`: the training curve and similarity on held-out lessons.

matplotlib runs on its Agg backend (no display needed) and is imported here only, so nothing
else in the master pays for it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np

from master.evaluation import ADAPTER_VECTOR, EvalData, Sample

ROLLING_WINDOW = 5  # eval lessons per rolling mean point
MAX_COLUMNS = 3  # subplots per row in heldout.png
SUBPLOT_SIZE_IN = (5.0, 3.6)
LEGEND_TITLE_IN, LEGEND_ROW_IN = 0.35, 0.22  # figure height the shared legend takes
DPI = 110


def rolling_mean(values: np.ndarray, window: int = ROLLING_WINDOW) -> np.ndarray:
    """Trailing mean over up to ``window`` values (fewer at the start)."""
    sums = np.cumsum(np.insert(values.astype(np.float64), 0, 0.0))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return np.asarray((sums[ends] - sums[starts]) / (ends - starts))


def plot_loss(data: EvalData, path: Path) -> Path:
    """Training loss per optimizer step, one line per node (train lessons in adapter order)."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for node in sorted(data.losses):
        losses = data.losses[node]
        ax.plot(np.arange(1, len(losses) + 1), losses, label=node, linewidth=1)
    if not data.losses:
        ax.text(0.5, 0.5, "no training reports", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("Adapter training loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss: 1 - cos (mini-batch mean)")
    if data.losses:
        ax.legend(title="node")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _series(samples: list[Sample]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    by_method: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_method[s.method].append(s)
    out = {}
    for method, items in by_method.items():
        # Stable sort: eval lessons at the same adapter version keep the order they arrived in.
        items.sort(key=lambda s: s.adapter_version)
        x = np.array([s.adapter_version for s in items], dtype=np.float64)
        y = np.array([s.similarity for s in items], dtype=np.float64)
        out[method] = (x, y)
    return out


def _trend(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rolling mean at each distinct x, taken at the last lesson seen there.

    Several eval lessons can share an adapter version; one value per version keeps the line from
    jumping up and down within a single x.
    """
    smooth = rolling_mean(y)
    last = np.r_[np.nonzero(np.diff(x))[0], len(x) - 1]
    return x[last], smooth[last]


def plot_heldout(data: EvalData, path: Path) -> Path:
    """Similarity on eval lessons against lessons learned, one subplot per node.

    Each method is drawn as points plus a rolling mean; the dashed line is the node's mean
    ceiling (the master's agreement with itself on the same lessons).
    """
    nodes = data.nodes
    columns = min(MAX_COLUMNS, max(1, len(nodes)))
    rows = max(1, math.ceil(len(nodes) / columns))
    width, height = SUBPLOT_SIZE_IN
    legend_columns = 3 * columns
    legend_rows = math.ceil((len(data.methods) + 1) / legend_columns)
    legend_in = LEGEND_TITLE_IN + LEGEND_ROW_IN * legend_rows
    fig, axes = plt.subplots(
        rows,
        columns,
        figsize=(width * columns, height * rows + legend_in),
        squeeze=False,
        sharey=True,
    )
    colours = {m: f"C{i}" for i, m in enumerate(data.methods)}
    handles: dict[str, Any] = {}
    for ax, node in zip(axes.flat, nodes, strict=False):
        samples = [s for s in data.samples if s.node_id == node]
        for method, (x, y) in _series(samples).items():
            colour = colours[method]
            ax.scatter(x, y, s=12, alpha=0.3, color=colour)
            label = f"{method} (prediction only)" if method == ADAPTER_VECTOR else method
            (handles[label],) = ax.plot(*_trend(x, y), color=colour, linewidth=1.6)
        ceilings = [data.ceilings[s.lesson_id] for s in samples if s.lesson_id in data.ceilings]
        if ceilings:
            handles["master ceiling (mean)"] = ax.axhline(
                float(np.mean(ceilings)), color="grey", linestyle="--"
            )
        ax.set_title(f"{node}: eval lessons (never trained on)")
        ax.set_xlabel("lessons learned (adapter version)")
        ax.set_ylabel("cos to the master's answer")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(nodes) :]:
        ax.set_visible(False)
    fig.legend(
        list(handles.values()),
        list(handles),
        loc="lower center",
        ncol=min(len(handles), legend_columns),
        title=f"points: one eval lesson; lines: rolling mean of the last {ROLLING_WINDOW}",
        fontsize="small",
    )
    fig.suptitle("Similarity to the master on held-out lessons")
    fig.tight_layout(rect=(0.0, legend_in / (height * rows + legend_in), 1.0, 1.0))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def write_plots(data: EvalData, directory: Path) -> list[Path]:
    """Write loss.png and heldout.png into ``directory``; return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    return [plot_loss(data, directory / "loss.png"), plot_heldout(data, directory / "heldout.png")]
