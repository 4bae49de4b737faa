"""Benchmark: does a new node that starts from the swarm adapter beat one that starts from scratch?

    .venv/bin/python bench/lora_fedavg.py [--steps 40] [--out bench/results/lora-fedavg]

Issue 12's stretch item. The benchmark's 108 train lessons (the embedded master's greedy
answers) are dealt to three nodes: A gets the first 44, B the next 44, and C, the newcomer, the
last 20. A and B each study one round from scratch; their adapters are averaged, weighted by
lessons (``pupil_node.study.fedavg``: the best rank-r approximation of the mean update).
Then, on the 36 eval prompts no node trained on, greedy plain answers (64 tokens) are scored
against the master's answers for:

- the base model;
- C after one round on its 20 lessons from scratch;
- the swarm adapter as imported, before C studies anything;
- C after one round on its 20 lessons resuming from the swarm adapter;
- for reference, plain FedAvg of the parameters (mean of the A factors, mean of the B factors).

Each is compared, paired by prompt with a 95% bootstrap CI, with C from scratch. Prints the
table and writes ``OUT/fedavg.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from lora_round import benchmark_lessons, heldout_loss, round_in_child  # noqa: E402
from lora_sweep import greedy_answers, similarities  # noqa: E402

from master.evaluation import bootstrap_ci  # noqa: E402
from pupil_node.study.data import StudyLesson  # noqa: E402
from pupil_node.study.fedavg import Source, average_adapters, read_adapter  # noqa: E402

ANSWERS = ROOT / "bench" / "results" / "lora-round"  # the master's answers, shared with it
DEAL = {"A": (0, 44), "B": (44, 88), "C": (88, 108)}


def options(steps: int, threads: int, previous: Path | None = None) -> list[str]:
    """The round child's options: the study defaults, bounded steps."""
    return [
        "--steps", str(steps), "--epochs", "1", "--batch", "4", "--rank", "16",
        "--alpha", "32", "--lr", "2e-4", "--max-len", "256", "--threads", str(threads),
        "--dtype", "bfloat16", "--gguf-dtype", "f16", "--targets", "all",
        *(["--previous", str(previous)] if previous else []),
    ]  # fmt: skip


def naive_average(sources: list[Source], out: Path, base_gguf: Path) -> Path:
    """Plain FedAvg of the parameters: each factor averaged on its own, then exported."""
    from safetensors.numpy import save_file

    from pupil_node.study.export import export_lora_gguf

    total = sum(s.lessons for s in sources)
    read = [read_adapter(s.peft_dir) for s in sources]
    config, first = read[0]
    tensors = {
        f"{name}.lora_{ab}.weight": sum(
            (s.lessons / total) * m[name][ab] for s, (_, m) in zip(sources, read, strict=True)
        ).astype(np.float32)
        for name in first
        for ab in ("A", "B")
    }
    peft = out / "peft"
    peft.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(peft / "adapter_model.safetensors"))
    (peft / "adapter_config.json").write_text(json.dumps(config))
    return export_lora_gguf(peft, base_gguf, out / "adapter.gguf")


def score(
    name: str,
    gguf: Path | None,
    eval_lessons: list[StudyLesson],
    references: np.ndarray,
    threads: int,
) -> dict[str, Any]:
    """Greedy plain answers with ``gguf`` (None: the base) scored against the master's."""
    sims = similarities(greedy_answers(eval_lessons, gguf, threads), references)
    loss = heldout_loss(eval_lessons, gguf, 256, threads)[1] if gguf else None
    print(f"{name:34s} similarity {sims.mean():.3f}", flush=True)
    return {"name": name, "similarities": sims.tolist(), "heldout_loss": loss}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "lora-fedavg")
    args = parser.parse_args()
    from pupil_node.study.base import embedded_gguf_path
    from shared.backends.embedded import EmbeddedEmbedder

    base_gguf = embedded_gguf_path()
    train, eval_lessons = benchmark_lessons(ANSWERS, 10_000, 36)
    nodes = {name: train[lo:hi] for name, (lo, hi) in DEAL.items()}
    rounds: dict[str, dict[str, Any]] = {}
    for name in ("A", "B", "C"):
        rounds[name] = round_in_child(
            args.out / f"node-{name}", nodes[name], options(args.steps, args.threads)
        )
        print(f"node {name}: {len(nodes[name])} lessons, {rounds[name]['steps']} steps", flush=True)
    sources = [Source(Path(rounds[n]["peft_dir"]), len(nodes[n]), base_gguf) for n in ("A", "B")]
    swarm = average_adapters(sources, args.out / "swarm", base_gguf)
    naive = naive_average(sources, args.out / "naive", base_gguf)
    rounds["C+swarm"] = round_in_child(
        args.out / "node-C-from-swarm",
        nodes["C"],
        options(args.steps, args.threads, Path(swarm.peft_dir)),
    )

    references = EmbeddedEmbedder().embed([x.master_answer for x in eval_lessons])
    references = references / np.linalg.norm(references, axis=1, keepdims=True)
    variants = {
        "base model": None,
        "C from scratch (20 lessons)": Path(rounds["C"]["gguf_path"]),
        "swarm adapter, as imported": Path(swarm.gguf_path),
        "C from the swarm adapter": Path(rounds["C+swarm"]["gguf_path"]),
        "plain FedAvg of the factors": naive,
    }
    scores = {
        name: score(name, gguf, eval_lessons, references, args.threads)
        for name, gguf in variants.items()
    }
    scratch = np.array(scores["C from scratch (20 lessons)"]["similarities"])
    print(f"\n{'':34s} {'similarity':>10s} {'held-out loss':>13s}  vs C from scratch [95% CI]")
    for name, row in scores.items():
        sims = np.array(row["similarities"])
        diff = sims - scratch
        ci = bootstrap_ci(diff, np.ones_like(diff))
        row["vs_scratch"], row["vs_scratch_ci"] = float(diff.mean()), ci
        loss = "" if row["heldout_loss"] is None else f"{row['heldout_loss']:.3f}"
        print(
            f"{name:34s} {sims.mean():10.3f} {loss:>13s}  {diff.mean():+.3f} "
            f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"
            if ci
            else ""
        )
    print(
        f"swarm adapter keeps {swarm.energy_kept_mean:.1%} of the mean update "
        f"(least {swarm.energy_kept_min:.1%} of a module)"
    )
    payload = {
        "deal": DEAL,
        "rounds": rounds,
        "swarm": {"energy_kept_mean": swarm.energy_kept_mean, "min": swarm.energy_kept_min},
        "scores": scores,
    }
    (args.out / "fedavg.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
