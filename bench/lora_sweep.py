"""Benchmark: the cheapest LoRA settings that keep the gain (issue 12, item 4).

    .venv/bin/python bench/lora_sweep.py [--train 80] [--steps 20] [--only NAME ...]
        [--out bench/results/lora-sweep]

For each setting below: one study round on the first 80 train lessons of the bundled benchmark
(``bench/lora_round.py``'s child process, so the peak RSS is the round's own); then the adapted
model answers the other 28 *train-split* prompts greedily (64 tokens), as a served pupil answers
``plain``, and the answers are embedded (all-MiniLM-L6-v2) and compared with the master's greedy
answers. The gain is paired against the base model's greedy answers to the same prompts, with a
95% bootstrap CI over prompts. Greedy decoding on both sides: the difference is the adapter's,
not sampling noise.

The sweep never looks at the benchmark's eval split: the settings it picks are then measured
on the swarm benchmark's exam (bench/lora_swarm.py) without having been tuned on it.

Prints the table and writes ``OUT/sweep.json``, ``OUT/sweep.csv`` and ``OUT/sweep.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from lora_round import (  # noqa: E402
    MAX_TOKENS,
    benchmark_lessons,
    heldout_loss,
    round_in_child,
)

from master.evaluation import bootstrap_ci  # noqa: E402
from pupil_node.study.data import StudyLesson  # noqa: E402

# name -> what differs from the default (rank 16, alpha 32, all seven projections, 256 tokens,
# bf16 base). alpha / rank stays 2, so a lower rank is not also a smaller step.
SETTINGS: dict[str, dict[str, str]] = {
    "default r16 all 256 bf16": {},
    "rank 8": {"--rank": "8", "--alpha": "16"},
    "rank 4": {"--rank": "4", "--alpha": "8"},
    "attention only": {"--targets": "attention"},
    "MLP only": {"--targets": "mlp"},
    "max_len 128": {"--max-len": "128"},
    "f32 base (no bf16 CPU)": {"--dtype": "float32"},
    # How much to train: the default round is one epoch at 2e-4 (17 steps here). Both of these
    # train more, and both generalise worse (README, "Which settings are cheapest"). A setting
    # may raise the step cap; its epochs then bound the round.
    "lr 5e-4": {"--lr": "5e-4"},
    "2 epochs": {"--epochs": "2", "--steps": "1000"},
}
DEFAULTS = {
    "--epochs": "1", "--batch": "4", "--rank": "16", "--alpha": "32", "--lr": "2e-4",
    "--max-len": "256", "--dtype": "bfloat16", "--gguf-dtype": "f16", "--targets": "all",
}  # fmt: skip


def greedy_answers(eval_lessons: list[StudyLesson], gguf: Path | None, threads: int) -> list[str]:
    """The plain greedy answers of the base model, or of the base with the adapter ``gguf``."""
    from shared.backends import GenerationParams
    from shared.backends.embedded import EmbeddedGenerator
    from shared.backends.templates import render_prompt

    base = EmbeddedGenerator(n_threads=threads)
    generator = base.with_lora(gguf, "sweep") if gguf else base
    params = GenerationParams(temperature=0.0, max_tokens=MAX_TOKENS, seed=0)
    try:
        return [
            generator.generate(render_prompt("pupil", x.goal_text), params) for x in eval_lessons
        ]
    finally:
        generator.close_lora()


def similarities(answers: list[str], references: np.ndarray) -> np.ndarray:
    """Cosine of each answer's embedding with the master's answer to the same prompt."""
    from shared.backends.embedded import EmbeddedEmbedder

    embedded = EmbeddedEmbedder().embed(answers)
    embedded = embedded / np.linalg.norm(embedded, axis=1, keepdims=True)
    return np.asarray((embedded * references).sum(axis=1))


def run_setting(
    name: str,
    changes: dict[str, str],
    args: argparse.Namespace,
    lessons: tuple[list[StudyLesson], list[StudyLesson]],
    base: tuple[np.ndarray, np.ndarray],
) -> dict[str, Any]:
    """One round with ``changes`` over the defaults, scored on the held-out prompts."""
    train_lessons, eval_lessons = lessons
    references, base_similarity = base
    options = {**DEFAULTS, "--steps": str(args.steps), **changes, "--threads": str(args.threads)}
    slug = "".join(c if c.isalnum() else "-" for c in name.lower())
    started = time.monotonic()
    result = round_in_child(
        args.out / slug, train_lessons, [x for pair in options.items() for x in pair]
    )
    wall = time.monotonic() - started
    gguf = Path(result["gguf_path"])
    loss_before, loss_after, _ = heldout_loss(
        eval_lessons, gguf, int(options["--max-len"]), args.threads
    )
    similarity = similarities(greedy_answers(eval_lessons, gguf, args.threads), references)
    gain = similarity - base_similarity
    ci = bootstrap_ci(gain, np.ones_like(gain))
    steps = max(int(result["steps"]), 1)
    return {
        "setting": name,
        "options": changes,
        "steps": result["steps"],
        "seconds_per_step": result["train_seconds"] / steps,
        "round_seconds": result["seconds"],
        "round_wall_seconds": wall,
        "peak_rss_bytes": result["peak_rss"],
        "adapter_bytes": result["gguf_bytes"],
        "val_loss": [result["val_loss_before"], result["val_loss_after"]],
        "heldout_loss": [loss_before, loss_after],
        "similarity": float(similarity.mean()),
        "gain": float(gain.mean()),
        "gain_ci": list(ci) if ci else None,
    }


def table(rows: list[dict[str, Any]], base_similarity: float) -> str:
    """The sweep as an aligned text table."""
    header = (
        f"{'setting':26s} {'s/step':>6s} {'round s':>7s} {'peak RSS':>9s} {'adapter':>8s} "
        f"{'held-out loss':>14s} {'similarity':>10s} {'gain [95% CI]':>24s}"
    )
    lines = [header, f"{'base model (no adapter)':26s} {'':>49s} {base_similarity:10.3f}"]
    for r in rows:
        ci = r["gain_ci"]
        lines.append(
            f"{r['setting']:26s} {r['seconds_per_step']:6.1f} {r['round_seconds']:7.0f} "
            f"{r['peak_rss_bytes'] / 2**30:7.2f}Gi {r['adapter_bytes'] / 2**20:6.1f}Mi "
            f"{r['heldout_loss'][0]:6.3f}->{r['heldout_loss'][1]:.3f} {r['similarity']:10.3f} "
            f"{r['gain']:+8.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, args_train: int) -> None:
    """Gain (with CI) against peak RSS, one point a setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        x, y = r["peak_rss_bytes"] / 1e9, r["gain"]
        low, high = r["gain_ci"]
        ax.errorbar(x, y, yerr=[[y - low], [high - y]], fmt="o", capsize=3)
        ax.annotate(r["setting"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.axvline(2.5, color="red", linewidth=0.8, linestyle="--", label="2.5 GB target")
    ax.set_xlabel("peak RSS of the round (GB)")
    ax.set_ylabel("similarity gain over the base (unseen prompts)")
    ax.set_title(f"LoRA settings: gain vs memory ({args_train} lessons, one round)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--train",
        type=int,
        default=80,
        help="lessons trained on; the rest of the train split is scored",
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="run only these settings (names above)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "lora-sweep")
    args = parser.parse_args()
    unknown = set(args.only or ()) - set(SETTINGS)
    if unknown:
        parser.error(f"unknown setting(s): {', '.join(sorted(unknown))}")
    split, _ = benchmark_lessons(args.out, 10_000, 0)  # the whole train split, no eval prompt
    train_lessons, eval_lessons = split[: args.train], split[args.train :]
    if not eval_lessons:
        parser.error(f"--train {args.train} leaves no train-split prompt to score")
    from shared.backends.embedded import EmbeddedEmbedder

    references = EmbeddedEmbedder().embed([x.master_answer for x in eval_lessons])
    references = references / np.linalg.norm(references, axis=1, keepdims=True)
    base_similarity = similarities(greedy_answers(eval_lessons, None, args.threads), references)
    print(
        f"base model: similarity on {len(eval_lessons)} unseen prompts "
        f"{base_similarity.mean():.3f}",
        flush=True,
    )

    rows: list[dict[str, Any]] = []
    for name, changes in SETTINGS.items():
        if args.only and name not in args.only:
            continue
        rows.append(
            run_setting(
                name, changes, args, (train_lessons, eval_lessons), (references, base_similarity)
            )
        )
        print(table(rows[-1:], float(base_similarity.mean())).splitlines()[-1], flush=True)
    print(table(rows, float(base_similarity.mean())))
    payload = {"base_similarity": float(base_similarity.mean()), "rows": rows, "args": vars(args)}
    (args.out / "sweep.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    with (args.out / "sweep.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["setting", "s_per_step", "peak_rss_bytes", "adapter_bytes", "gain"])
        for r in rows:
            writer.writerow(
                [
                    r["setting"],
                    r["seconds_per_step"],
                    r["peak_rss_bytes"],
                    r["adapter_bytes"],
                    r["gain"],
                ]
            )
    plot(rows, args.out / "sweep.png", args.train)
    return 0


if __name__ == "__main__":
    sys.exit(main())
