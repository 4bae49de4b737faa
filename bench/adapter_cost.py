"""Benchmark: what the default adapter costs per train step and per checkpoint, against bounds.

For each embedding size (default 1024 and 384 dims) the default adapter of ``AdapterConfig``
(hidden 256, AdamW, batch 16, replay buffer of 512 pairs, full) is timed:

- **train step**: forward, cosine loss, backward and the AdamW step on one fixed mini-batch
  (the median step), split into forward / backward / optimizer (the median of each); and the
  step as a node takes it, ``AdapterTrainer.learn(steps=8) / 8`` (replay sampling included);
- **checkpoint**: file size, and the median time of ``save_checkpoint`` (tensors, sha256
  checksum, write, fsync, verifying the file it replaces, rename) with its parts.

    .venv/bin/python bench/adapter_cost.py [--dims 1024 384] [--threads 1] [--steps 2000]

**The memory-bandwidth bound.** A step cannot be faster than the time it takes to move the bytes
it must touch. With P parameters (float32, 4 bytes), W2 the output layer's weights and biases:

    bytes per step >= 4 * (P        forward: read every weight once
                           + |W2|   backward: read W2 again to reach the hidden layer
                           + P      backward: write every gradient once
                           + 7 P)   AdamW: read weight, gradient, both moments; write weight
                                    and both moments

Activations (batch x width, about 2% of that at batch 16) are left out, which only makes the
bound lower and the ratio stricter. The bandwidth is measured here, single-threaded like the
step, as a numpy copy (bytes read + bytes written per second):

- *main memory*: arrays of 256 MiB, far larger than every cache; this is the bound the target
  (issue #6: a step within 3x of the memory-bandwidth bound) is judged against;
- *cache at this size*: arrays as large as the step's working set (weights, gradients and both
  moments, 16 P bytes), which may fit in the last-level cache: a tighter reference, printed
  beside it.

The compute bound (matrix FLOPs of the step / the peak float32 matmul rate measured with
``torch.mm`` on one thread) is printed too: at batch 16 the step is near the balance point of
this machine, so neither bound alone is the whole story.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from harness import format_table

from shared import checkpoint
from shared.adapter import AdapterTrainer, cosine_loss
from shared.config import AdapterConfig

TARGET_RATIO = 3.0
FLOAT_BYTES = 4
MAIN_MEMORY_BYTES = 256 << 20
ADAMW_TOUCHES = 7  # reads: weight, gradient, exp_avg, exp_avg_sq; writes: weight and both moments


@dataclass
class StepCost:
    """The figures of one embedding size."""

    dim: int
    params: int
    step_ms: float
    forward_ms: float
    backward_ms: float
    optimizer_ms: float
    learn_step_ms: float
    bytes_per_step: int
    working_set: int
    flops_per_step: int
    checkpoint_bytes: int
    checkpoint_ms: float
    checkpoint_parts_ms: dict[str, float]


def median_ms(function: Callable[[], object], repeats: int) -> float:
    """Median wall-clock milliseconds of ``repeats`` calls (after one warm-up call)."""
    function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def copy_bandwidth(nbytes: int, budget_s: float = 1.0) -> float:
    """Best single-threaded numpy copy rate for arrays of ``nbytes``, in bytes moved per second.

    The best of many short timings, so that a preempted one (a shared machine) does not count.
    """
    source = np.ones(max(nbytes // FLOAT_BYTES, 1), dtype=np.float32)
    target = np.empty_like(source)
    repeats = max(1, int(1e7 // max(nbytes, 1)))  # each timing moves at least ~10 MB
    best = float("inf")
    deadline = time.perf_counter() + budget_s
    while time.perf_counter() < deadline or best == float("inf"):
        started = time.perf_counter()
        for _ in range(repeats):
            np.copyto(target, source)
        best = min(best, (time.perf_counter() - started) / repeats)
    return 2 * source.nbytes / best


def matmul_flops() -> float:
    """Peak float32 matmul rate of torch on its current threads, in FLOP/s (best of a few)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(10))
    return 2 * 1024**3 / best


def _timed(function: Callable[[], object]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def filled_trainer(dim: int, config: AdapterConfig) -> AdapterTrainer:
    """The default adapter with a full replay buffer and optimizer state (one step taken)."""
    trainer = AdapterTrainer(
        dim,
        dim,
        config.hidden_dim,
        learning_rate=config.learning_rate,
        replay_capacity=config.buffer_capacity,
        seed=config.seed,
        embedding_model="bench",
    )
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((config.buffer_capacity, dim)).astype(np.float32)
    targets = rng.standard_normal((config.buffer_capacity, dim)).astype(np.float32)
    trainer.learn("fill", inputs, targets, steps=1, batch_size=config.batch_size)
    return trainer


def step_costs(trainer: AdapterTrainer, config: AdapterConfig, steps: int) -> dict[str, float]:
    """Milliseconds per bare step and per part, and per step as ``learn`` takes it."""
    batch_in, batch_out = trainer.replay.sample(config.batch_size, trainer.generator)
    inputs, targets = torch.from_numpy(batch_in), torch.from_numpy(batch_out)
    adapter, optimizer = trainer.adapter, trainer.optimizer
    adapter.train()
    parts: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": [], "step": []}
    warmup = 50
    for index in range(steps + warmup):
        a = time.perf_counter()
        loss = cosine_loss(adapter(inputs), targets)
        b = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        c = time.perf_counter()
        optimizer.step()
        float(loss.item())
        d = time.perf_counter()
        if index >= warmup:
            parts["forward"].append(b - a)
            parts["backward"].append(c - b)
            parts["optimizer"].append(d - c)
            parts["step"].append(d - a)
    # Medians: robust to the odd preempted step on a shared machine.
    out = {name: statistics.median(seconds) * 1e3 for name, seconds in parts.items()}
    rng = np.random.default_rng(1)
    x = rng.standard_normal(trainer.in_dim).astype(np.float32)
    y = rng.standard_normal(trainer.out_dim).astype(np.float32)
    lessons = max(steps // config.steps_per_lesson // 4, 10)

    def learn() -> None:
        trainer.learn("timed", x, y, steps=config.steps_per_lesson, batch_size=config.batch_size)

    out["learn_step"] = median_ms(learn, lessons) / config.steps_per_lesson
    return out


def checkpoint_costs(trainer: AdapterTrainer, repeats: int) -> tuple[int, float, dict[str, float]]:
    """Checkpoint size in bytes, median ``save_checkpoint`` ms, and its parts in ms."""
    with tempfile.TemporaryDirectory(prefix="distill-swarm-ckpt-") as workdir:
        path = Path(workdir) / "adapter.safetensors"
        checkpoint.save_checkpoint(trainer, path)
        total = median_ms(lambda: checkpoint.save_checkpoint(trainer, path), repeats)
        size = path.stat().st_size
        inputs, targets, ids = trainer.replay.export()
        tensors = checkpoint._tensors(trainer, inputs, targets)
        metadata = checkpoint._metadata(trainer, ids)
        parts = {
            "tensors": median_ms(lambda: checkpoint._tensors(trainer, inputs, targets), repeats),
            "checksum": median_ms(lambda: checkpoint._checksum(tensors, metadata), repeats),
            "verify previous": median_ms(lambda: checkpoint._read_verified(path), repeats),
        }
        scratch = Path(workdir) / "scratch.safetensors"

        def write_and_fsync() -> None:
            checkpoint.save_file(tensors, str(scratch), metadata=metadata)
            with open(scratch, "rb+") as handle:
                os.fsync(handle.fileno())

        parts["write + fsync"] = median_ms(write_and_fsync, repeats)
    return size, total, parts


def measure(dim: int, config: AdapterConfig, steps: int, repeats: int) -> StepCost:
    """Every figure for one embedding size."""
    trainer = filled_trainer(dim, config)
    params = sum(p.numel() for p in trainer.adapter.parameters())
    output_layer = sum(p.numel() for p in trainer.adapter.output.parameters())
    hidden = trainer.adapter.hidden_dim
    batch = config.batch_size
    costs = step_costs(trainer, config, steps)
    size, total, parts = checkpoint_costs(trainer, repeats)
    return StepCost(
        dim=dim,
        params=params,
        step_ms=costs["step"],
        forward_ms=costs["forward"],
        backward_ms=costs["backward"],
        optimizer_ms=costs["optimizer"],
        learn_step_ms=costs["learn_step"],
        bytes_per_step=FLOAT_BYTES * (params + output_layer + params + ADAMW_TOUCHES * params),
        working_set=4 * params * FLOAT_BYTES,  # weights, gradients, two moments
        # forward 2B(in*h + h*out); backward: dW1 2B*in*h, dW2 and d(hidden) 2B*h*out each.
        flops_per_step=2 * batch * (dim * hidden + hidden * dim)
        + 2 * batch * dim * hidden
        + 4 * batch * hidden * dim,
        checkpoint_bytes=size,
        checkpoint_ms=total,
        checkpoint_parts_ms=parts,
    )


def main() -> int:
    """Measure each size and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dims", type=int, nargs="+", default=[1024, 384])
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: the bandwidth is measured on one thread too)",
    )
    parser.add_argument("--steps", type=int, default=2000, help="timed train steps per size")
    parser.add_argument("--repeats", type=int, default=30, help="timed checkpoint writes per size")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = AdapterConfig()
    main_memory = copy_bandwidth(MAIN_MEMORY_BYTES)
    peak = matmul_flops()
    print(
        f"torch {torch.__version__}, {args.threads} thread(s); main-memory copy bandwidth "
        f"{main_memory / 1e9:.1f} GB/s; peak fp32 matmul {peak / 1e9:.0f} GFLOP/s; adapter: "
        f"hidden {config.hidden_dim}, batch {config.batch_size}, replay {config.buffer_capacity}",
        flush=True,
    )
    results = [measure(dim, config, args.steps, args.repeats) for dim in args.dims]
    rows = []
    verdicts = []
    for r in results:
        cache = copy_bandwidth(r.working_set // 2)  # source + target = the working set
        dram_bound = r.bytes_per_step / main_memory * 1e3
        cache_bound = r.bytes_per_step / cache * 1e3
        compute_bound = r.flops_per_step / peak * 1e3
        ratio = r.step_ms / dram_bound
        verdicts.append((r.dim, ratio))
        rows.append(
            (
                str(r.dim),
                f"{r.params:,}",
                f"{r.step_ms:.3f}",
                f"{r.forward_ms:.3f}/{r.backward_ms:.3f}/{r.optimizer_ms:.3f}",
                f"{r.learn_step_ms:.3f}",
                f"{r.bytes_per_step / 1e6:.1f}",
                f"{dram_bound:.3f}",
                f"{ratio:.1f}x",
                f"{cache_bound:.3f} ({cache / 1e9:.0f} GB/s)",
                f"{r.step_ms / cache_bound:.1f}x",
                f"{compute_bound:.3f}",
            )
        )
    print(
        format_table(
            (
                "dims",
                "params",
                "step ms",
                "fwd/bwd/opt ms",
                "learn ms/step",
                "MB/step",
                "mem bound ms",
                "ratio",
                "cache bound ms",
                "ratio",
                "compute bound ms",
            ),
            rows,
        )
    )
    print()
    checkpoint_rows = []
    for r in results:
        parts = r.checkpoint_parts_ms
        checkpoint_rows.append(
            (
                str(r.dim),
                f"{r.checkpoint_bytes / 1e6:.2f}",
                f"{r.checkpoint_ms:.2f}",
                *(f"{parts[name]:.2f}" for name in PART_NAMES),
            )
        )
    print(
        format_table(
            ("dims", "checkpoint MB", "save ms", *(f"{name} ms" for name in PART_NAMES)),
            checkpoint_rows,
        )
    )
    print()
    for dim, ratio in verdicts:
        verdict = "met" if ratio <= TARGET_RATIO else "MISSED"
        print(f"target at {dim} dims: step within {TARGET_RATIO:.0f}x of the bound: {verdict}")
    print(f"command: .venv/bin/python {' '.join(sys.argv)}")
    return 0


PART_NAMES = ("tensors", "checksum", "write + fsync", "verify previous")

if __name__ == "__main__":
    sys.exit(main())
