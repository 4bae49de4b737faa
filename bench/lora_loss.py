"""Benchmark: the frozen output layer's loss in chunks vs autograd through full logits.

    .venv/bin/python bench/lora_loss.py [--steps 6] [--batch 4] [--threads 2]

On the real base (Gemma 3 270M, bf16, cached) with a fresh r16 LoRA and batches of the
benchmark's train lessons with the embedded master's answers (``bench/lora_round.py`` makes
them), each way runs in a fresh process: ``--steps`` forward + backward passes, then the peak
RSS and the mean seconds a step. The two ways must give the same loss and the same LoRA
gradients (printed: the largest relative difference); only time and memory may differ.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

ANSWERS = ROOT / "bench" / "results" / "lora-round"


def full_logits_nll(model: object, batch: list, pad_id: int) -> tuple[object, int]:
    """The previous loss: the output layer through autograd, all labelled positions at once."""
    import torch

    from pupil_node.study.data import IGNORE, collate
    from pupil_node.study.train import _causal_lm

    lm = _causal_lm(model)
    ids, mask, labels = (torch.tensor(x) for x in collate(batch, pad_id))
    hidden = lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE
    logits = lm.lm_head(hidden[:, :-1][keep]).float()
    loss = torch.nn.functional.cross_entropy(logits, targets[keep], reduction="sum")
    return loss, int(keep.sum())


def child(way: str, steps: int, batch_size: int, threads: int) -> None:
    """Time ``steps`` forward + backward passes one way; print figures and the gradients."""
    import torch
    from lora_round import benchmark_lessons

    from pupil_node.study import rss
    from pupil_node.study.base import default_cache_dir, embedded_gguf_path, load_base
    from pupil_node.study.data import build_examples
    from pupil_node.study.train import TrainSettings, answer_nll, attach_lora, cap_threads

    cap_threads(threads)
    lessons, _ = benchmark_lessons(ANSWERS, steps * batch_size, 0)
    base = load_base(embedded_gguf_path(), default_cache_dir())
    model = attach_lora(base.model, TrainSettings(rank=16, alpha=32))
    examples = build_examples(lessons, base.tokenizer, max_len=256)
    loss_fn = answer_nll if way == "chunked" else full_logits_nll
    rss.reset_peak()
    losses, seconds = [], []
    for i in range(steps):
        batch = examples[i * batch_size : (i + 1) * batch_size]
        started = time.monotonic()
        loss, n = loss_fn(model, batch, 0)
        (loss / n).backward()
        seconds.append(time.monotonic() - started)
        losses.append(float(loss.detach()) / n)
    grads = {k: p.grad.float() for k, p in model.named_parameters() if p.grad is not None}
    torch.save(grads, f"/tmp/lora_loss_{way}.pt")
    print(json.dumps({"peak": rss.peak_bytes(), "seconds": seconds, "losses": losses}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--way", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.way:
        child(args.way, args.steps, args.batch, args.threads)
        return 0
    import torch

    figures = {}
    for way in ("full logits", "chunked"):
        out = subprocess.run(
            [sys.executable, __file__, "--way", way.split()[0], "--steps", str(args.steps),
             "--batch", str(args.batch), "--threads", str(args.threads)],
            check=True, capture_output=True, text=True, cwd=ROOT,
        )  # fmt: skip
        figures[way] = json.loads(out.stdout.strip().splitlines()[-1])
        row = figures[way]
        steady = row["seconds"][1:] or row["seconds"]
        print(
            f"{way:12s} {sum(steady) / len(steady):5.2f} s a step (forward + backward, "
            f"batch {args.batch})  peak RSS {row['peak'] / 2**30:.2f} GiB"
        )
    full, chunked = torch.load("/tmp/lora_loss_full.pt"), torch.load("/tmp/lora_loss_chunked.pt")
    worst = max(float((full[k] - chunked[k]).norm() / full[k].norm()) for k in full)
    pairs = zip(figures["full logits"]["losses"], figures["chunked"]["losses"], strict=True)
    loss_gap = max(abs(a - b) for a, b in pairs)
    print(f"largest loss difference {loss_gap:.2e}; largest relative LoRA-gradient gap {worst:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
