"""One study round, end to end: base GGUF -> LoRA trained on train lessons -> adapter GGUF.

    result = run_study_round(lessons, previous_adapter_dir, out_dir, StudySettings())
    if result.improved: promote result.gguf_path (serve it with lora_path=...)

The round never sees eval lessons (they are dropped before anything else), holds out a
validation slice of the train lessons chosen by a hash of each lesson id, and reports the
validation loss of the previous adapter (or of the bare base) and of the new one, so the caller
can promote only what is better. ``out_dir`` gets:

- ``peft/``: the new adapter (safetensors + config), the ``previous_adapter_dir`` of the next
  round;
- ``adapter.gguf``: the same adapter for llama.cpp;
- ``round.json``: the ``RoundResult`` (version, checksums, figures).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pupil_node.study import rss
from pupil_node.study.data import LessonLike, build_examples, split_validation
from pupil_node.study.train import TrainSettings, has_adapter

log = logging.getLogger(__name__)

ROUND_FILE = "round.json"
PEFT_DIR = "peft"
GGUF_FILE = "adapter.gguf"


@dataclass(frozen=True)
class StudySettings:
    """Everything a round needs besides its lessons and directories."""

    train: TrainSettings = field(default_factory=TrainSettings)
    # The GGUF the runtime serves; None: the embedded backend's shipped model.
    base_gguf: Path | None = None
    cache_dir: Path | None = None
    dtype: str = "bfloat16"
    gguf_dtype: str = "f16"
    max_len: int = 256
    validation_fraction: float = 0.15
    template: str = "pupil.j2"
    system: str | None = None
    # Score the validation slice with llama.cpp too, base GGUF + adapter GGUF as served: the loss
    # of what the runtime will say, and proof in this (disposable) process that the file loads.
    llama_check: bool = True
    llama_threads: int | None = None


@dataclass(frozen=True)
class RoundResult:
    """What a round produced and measured (``round.json``)."""

    version: int
    val_loss_before: float
    val_loss_after: float
    gguf_path: str
    gguf_sha256: str
    gguf_bytes: int
    peft_dir: str
    base_gguf: str
    base_sha256: str
    steps: int
    seconds: float
    train_seconds: float
    load_seconds: float
    base_from_cache: bool
    peak_rss: int
    train_examples: int
    val_examples: int
    train_losses: tuple[float, ...]
    # llama.cpp's validation loss with the previous adapter GGUF (or none) and with the new one;
    # NaN when the check is off or llama-cpp-python is not installed.
    llama_val_loss_before: float = math.nan
    llama_val_loss_after: float = math.nan

    @property
    def improved(self) -> bool:
        """The new adapter is better than the previous one on the validation slice."""
        return self.val_loss_after < self.val_loss_before

    @property
    def seconds_per_step(self) -> float:
        return self.train_seconds / self.steps if self.steps else 0.0


def previous_version(previous_adapter_dir: Path | None) -> int:
    """The version recorded beside a previous round's ``peft/`` directory (0 if none)."""
    if previous_adapter_dir is None:
        return 0
    manifest = Path(previous_adapter_dir).parent / ROUND_FILE
    try:
        return int(json.loads(manifest.read_text())["version"])
    except (OSError, ValueError, KeyError):
        return 0


def run_study_round(
    lessons: Iterable[LessonLike],
    previous_adapter_dir: Path | None,
    out_dir: Path,
    settings: StudySettings | None = None,
) -> RoundResult:
    """Train one LoRA round and export it; see the module docstring.

    Args:
        lessons: the node's lessons; only ``split == "train"`` ones are used.
        previous_adapter_dir: the ``peft/`` directory of the serving adapter, or None.
        out_dir: a new directory for this round's files.
        settings: defaults to ``StudySettings()``.
    """
    from pupil_node.study.base import (
        default_cache_dir,
        embedded_gguf_path,
        file_sha256,
        load_base,
    )
    from pupil_node.study.export import export_lora_gguf
    from pupil_node.study.train import (
        attach_lora,
        cap_threads,
        mean_nll,
        save_adapter,
        train,
    )

    settings = settings or StudySettings()
    started = time.monotonic()
    rss.reset_peak()
    cap_threads(settings.train.threads)
    gguf_path = Path(settings.base_gguf) if settings.base_gguf else embedded_gguf_path()
    base = load_base(gguf_path, settings.cache_dir or default_cache_dir(), settings.dtype)
    _phase("base loaded", started, cached=base.from_cache)
    tokenizer = base.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    study, validation = split_validation(list(lessons), settings.validation_fraction)
    train_examples, val_examples = (
        build_examples(
            part,
            tokenizer,
            max_len=settings.max_len,
            template=settings.template,
            system=settings.system,
        )
        for part in (study, validation)
    )

    previous = (
        Path(previous_adapter_dir)
        if previous_adapter_dir is not None and has_adapter(previous_adapter_dir)
        else None
    )
    model = attach_lora(base.model, settings.train, previous)
    batch = settings.train.eval_batch_size
    val_before = mean_nll(model, val_examples, pad_id, batch)
    _phase("validation before", started, loss=round(val_before, 4))
    stats = train(model, train_examples, pad_id, settings.train)
    _phase("trained", started, steps=stats.steps, s_per_step=round(stats.seconds_per_step, 1))
    val_after = mean_nll(model, val_examples, pad_id, batch)
    _phase("validation after", started, loss=round(val_after, 4))

    out_dir = Path(out_dir)
    peft_dir = save_adapter(model, out_dir / PEFT_DIR)
    gguf_out = export_lora_gguf(peft_dir, gguf_path, out_dir / GGUF_FILE, settings.gguf_dtype)
    # The torch model is done with: free it before llama.cpp loads its own copy of the base.
    base_sha256, load_seconds, from_cache = base.gguf_sha256, base.load_seconds, base.from_cache
    del model, base
    gc.collect()
    rss.release_freed_memory()
    _phase("torch model freed", started)

    llama_before = llama_after = math.nan
    if settings.llama_check and _has_llama_cpp():
        from pupil_node.study.export import llama_answer_nll

        old_gguf = previous.parent / GGUF_FILE if previous is not None else None
        threads = settings.llama_threads or settings.train.threads
        llama_before = llama_answer_nll(
            gguf_path,
            val_examples,
            old_gguf if old_gguf is not None and old_gguf.is_file() else None,
            n_threads=threads,
        )
        llama_after = llama_answer_nll(gguf_path, val_examples, gguf_out, n_threads=threads)
        _phase("llama.cpp check", started, before=llama_before, after=llama_after)

    result = RoundResult(
        version=previous_version(previous) + 1,
        val_loss_before=val_before,
        val_loss_after=val_after,
        gguf_path=str(gguf_out),
        gguf_sha256=file_sha256(gguf_out),
        gguf_bytes=gguf_out.stat().st_size,
        peft_dir=str(peft_dir),
        base_gguf=str(gguf_path),
        base_sha256=base_sha256,
        steps=stats.steps,
        seconds=time.monotonic() - started,
        train_seconds=stats.seconds,
        load_seconds=load_seconds,
        base_from_cache=from_cache,
        peak_rss=rss.peak_bytes(),
        train_examples=len(train_examples),
        val_examples=len(val_examples),
        train_losses=stats.train_losses,
        llama_val_loss_before=llama_before,
        llama_val_loss_after=llama_after,
    )
    (out_dir / ROUND_FILE).write_text(json.dumps(asdict(result), indent=2) + "\n")
    _phase("exported", started, gguf_bytes=result.gguf_bytes)
    return result


def _phase(name: str, started: float, **figures: object) -> None:
    details = " ".join(f"{k}={v}" for k, v in figures.items())
    log.info(
        "study round: %s after %.1f s, rss %.2f GiB (peak %.2f) %s",
        name, time.monotonic() - started, rss.current_bytes() / 2**30, rss.peak_bytes() / 2**30,
        details,
    )  # fmt: skip


def _has_llama_cpp() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None
