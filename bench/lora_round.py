"""Benchmark: one LoRA study round on the benchmark's train lessons, on this machine's CPU.

    .venv/bin/python bench/lora_round.py [--train 100] [--eval 36] [--steps 25] [--batch 4]
        [--threads 2] [--dtype bfloat16] [--targets all|attention|mlp]
        [--out bench/results/lora-round]
    .venv/bin/python bench/lora_round.py --measure-load   # base load: cold (GGUF) vs cached

1. The master's answers: the embedded master (``master.j2``, greedy, 64 tokens), as the demo's
   master answers, generated once and kept in ``OUT/answers.jsonl``.
2. One round (``pupil_node.study.run_study_round``) on the first N train prompts, in a child
   process so its peak RSS is the round's own.
3. llama.cpp's per-token loss of the master's answers on held-out eval prompts (never trained on),
   with the base Q4 model alone and with the exported adapter (``lora_path=``).

Prints seconds per step, steps, peak RSS, adapter GGUF size, validation loss before/after and
the held-out llama.cpp loss before/after; writes ``OUT/result.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pupil_node.study.data import StudyLesson  # noqa: E402
from pupil_node.study.train import TARGETS  # noqa: E402

BENCHMARK = ROOT / "master" / "prompt_sets" / "benchmark.jsonl"
MAX_TOKENS = 64


def master_answers(out: Path, prompts: list[dict[str, str]]) -> dict[str, str]:
    """id -> the embedded master's greedy answer, generated once into ``out/answers.jsonl``."""
    path = out / "answers.jsonl"
    answers: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            answers[row["id"]] = row["answer"]
    missing = [p for p in prompts if p["id"] not in answers]
    if missing:
        from shared.backends import GenerationParams
        from shared.backends.embedded import EmbeddedGenerator
        from shared.backends.templates import render_prompt

        generator = EmbeddedGenerator()
        params = GenerationParams(temperature=0.0, max_tokens=MAX_TOKENS, seed=0)
        started = time.monotonic()
        with path.open("a") as f:
            for p in missing:
                answer = generator.generate(render_prompt("master", p["goal_text"]), params)
                answers[p["id"]] = answer
                f.write(json.dumps({"id": p["id"], "answer": answer}) + "\n")
        print(f"master answers: {len(missing)} in {time.monotonic() - started:.0f}s")
    return answers


def lessons(prompts: list[dict[str, str]], answers: dict[str, str]) -> list[StudyLesson]:
    return [
        StudyLesson(p["id"], p["goal_text"], answers[p["id"]], p["split"])
        for p in prompts
        if answers.get(p["id"])
    ]


def benchmark_lessons(
    out: Path, train_n: int, eval_n: int
) -> tuple[list[StudyLesson], list[StudyLesson]]:
    """The first ``train_n`` train and ``eval_n`` eval prompts with the master's answers."""
    out.mkdir(parents=True, exist_ok=True)
    prompts = [json.loads(line) for line in BENCHMARK.read_text().splitlines() if line.strip()]
    train = [p for p in prompts if p["split"] == "train"][:train_n]
    held_out = [p for p in prompts if p["split"] == "eval"][:eval_n]
    answers = master_answers(out, train + held_out)
    return lessons(train, answers), lessons(held_out, answers)


def round_options(args: argparse.Namespace) -> list[str]:
    """The child's command-line options for the settings in ``args``."""
    return [
        "--steps", str(args.steps), "--epochs", str(args.epochs), "--batch", str(args.batch),
        "--rank", str(args.rank), "--alpha", str(args.alpha), "--lr", str(args.lr),
        "--max-len", str(args.max_len), "--threads", str(args.threads), "--dtype", args.dtype,
        "--gguf-dtype", args.gguf_dtype, "--targets", args.targets,
        *(["--no-checkpointing"] if args.no_checkpointing else []),
    ]  # fmt: skip


def round_in_child(
    round_dir: Path, train_lessons: list[StudyLesson], options: list[str]
) -> dict[str, Any]:
    """One study round in a fresh process (its peak RSS is the round's own): the RoundResult."""
    round_dir.mkdir(parents=True, exist_ok=True)
    lessons_file = round_dir / "train_lessons.jsonl"
    lessons_file.write_text("".join(json.dumps(asdict(x)) + "\n" for x in train_lessons))
    child = [sys.executable, __file__, "--lessons-file", str(lessons_file), "--round-dir"]
    with (round_dir / "round.log").open("w") as log:  # the round's phases, with RSS
        out = subprocess.run(
            [*child, str(round_dir / "out"), *options],
            check=True, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT,
        )  # fmt: skip
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def heldout_loss(
    eval_lessons: list[StudyLesson], gguf: Path, max_len: int, threads: int
) -> tuple[float, float, int]:
    """llama.cpp's per-token loss of the master's held-out answers: base, then with ``gguf``."""
    from pupil_node.study.base import embedded_gguf_path, load_tokenizer
    from pupil_node.study.data import build_examples
    from pupil_node.study.export import llama_answer_nll

    base_gguf = embedded_gguf_path()
    examples = build_examples(
        [StudyLesson(x.lesson_id, x.goal_text, x.master_answer) for x in eval_lessons],
        load_tokenizer(base_gguf), max_len=max_len,
    )  # fmt: skip
    before = llama_answer_nll(base_gguf, examples, n_threads=threads)
    after = llama_answer_nll(base_gguf, examples, gguf, n_threads=threads)
    return before, after, len(examples)


def round_child(args: argparse.Namespace) -> int:
    """Run one round from ``args.lessons_file``; print the RoundResult as JSON."""
    from pupil_node.study import StudySettings, TrainSettings, run_study_round

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rows = [json.loads(line) for line in Path(args.lessons_file).read_text().splitlines()]
    settings = StudySettings(
        train=TrainSettings(
            rank=args.rank, alpha=args.alpha, learning_rate=args.lr, batch_size=args.batch,
            max_steps=args.steps, epochs=args.epochs, threads=args.threads,
            gradient_checkpointing=not args.no_checkpointing,
            target_modules=TARGETS[args.targets],
        ),
        dtype=args.dtype, max_len=args.max_len, gguf_dtype=args.gguf_dtype,
    )  # fmt: skip
    previous = Path(args.previous) if args.previous else None
    lessons = [StudyLesson(**r) for r in rows]
    result = run_study_round(lessons, previous, Path(args.round_dir), settings)
    print(json.dumps(asdict(result)))
    return 0


def measure_load(args: argparse.Namespace) -> int:
    """Load the base cold (streamed from the GGUF), then cached, then cold through transformers'
    own GGUF loader, each in a fresh process; check the two conversions hold the same weights."""
    with tempfile.TemporaryDirectory() as tmp:
        cache, whole = Path(tmp) / "cache", Path(tmp) / "whole"
        code = (
            "import json,sys; from pathlib import Path;"
            "from pupil_node.study import rss; from pupil_node.study import base as b;"
            "rss.reset_peak(); g = b.embedded_gguf_path();"
            "r = b.load_base(g, Path(sys.argv[1]), sys.argv[2]) if sys.argv[3] == 'load' else"
            " b._load_whole_and_save(g, Path(sys.argv[1]), sys.argv[2]);"
            "print(json.dumps({'peak_rss': rss.peak_bytes()}))"
        )
        runs = (
            ("cold, streamed (convert.py)", cache, "load"),
            ("cached", cache, "load"),
            ("cold, transformers' loader", whole, "whole"),
        )
        for label, target, how in runs:
            started = time.monotonic()
            out = subprocess.run(
                [sys.executable, "-c", code, str(target), args.dtype, how],
                check=True, capture_output=True, text=True, cwd=ROOT,
            )  # fmt: skip
            row = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"{label:28s} {time.monotonic() - started:6.1f} s (process)  peak RSS "
                f"{row['peak_rss'] / 2**30:.2f} GiB  (dtype {args.dtype})"
            )
        print(
            f"largest difference between the two conversions: {_largest_difference(cache, whole)}"
        )
    return 0


def _largest_difference(cache: Path, whole: Path) -> float:
    from safetensors.torch import load_file

    streamed = load_file(str(next(cache.glob("*/*/model.safetensors"))))
    loaded = load_file(str(whole / "model.safetensors"))
    if set(streamed) != set(loaded):
        raise SystemExit(f"the conversions name different tensors: {set(streamed) ^ set(loaded)}")
    return max(float((streamed[k].float() - loaded[k].float()).abs().max()) for k in streamed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=100, help="train lessons in the round")
    parser.add_argument("--eval", type=int, default=36, help="held-out eval lessons to score")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--gguf-dtype", default="f16", choices=("f16", "f32"))
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--targets", default="all", choices=sorted(TARGETS))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "lora-round")
    parser.add_argument("--measure-load", action="store_true")
    parser.add_argument("--lessons-file", help=argparse.SUPPRESS)
    parser.add_argument("--round-dir", help=argparse.SUPPRESS)
    parser.add_argument("--previous", help=argparse.SUPPRESS)  # a peft dir to resume from
    args = parser.parse_args()
    if args.measure_load:
        return measure_load(args)
    if args.lessons_file:
        return round_child(args)

    args.out.mkdir(parents=True, exist_ok=True)
    train_lessons, eval_lessons = benchmark_lessons(args.out, args.train, args.eval)
    started = time.monotonic()
    result = round_in_child(args.out / "round", train_lessons, round_options(args))
    wall = time.monotonic() - started
    held_before, held_after, examples = heldout_loss(
        eval_lessons, Path(result["gguf_path"]), args.max_len, args.threads
    )
    summary = {
        **result,
        "round_wall_seconds": wall,
        "heldout_examples": examples,
        "heldout_llama_loss_before": held_before,
        "heldout_llama_loss_after": held_after,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    (args.out / "result.json").write_text(json.dumps(summary, indent=2) + "\n")
    steps = result["steps"]
    print(
        f"train lessons {result['train_examples']} (+{result['val_examples']} validation), "
        f"steps {steps}, {result['train_seconds'] / max(steps, 1):.1f} s/step, "
        f"round {result['seconds']:.0f} s (load {result['load_seconds']:.0f} s, "
        f"base from cache: {result['base_from_cache']})\n"
        f"peak RSS {result['peak_rss'] / 2**30:.2f} GiB, adapter GGUF "
        f"{result['gguf_bytes'] / 2**20:.1f} MiB ({args.gguf_dtype})\n"
        f"validation loss (torch)   {result['val_loss_before']:.3f} -> "
        f"{result['val_loss_after']:.3f} "
        f"(llama.cpp {result['llama_val_loss_before']:.3f} -> "
        f"{result['llama_val_loss_after']:.3f})\n"
        f"held-out loss (llama.cpp) {held_before:.3f} -> {held_after:.3f} "
        f"on {examples} eval answers"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
