"""A study round on the real model: train a LoRA, export it, and let llama.cpp serve it.

The proof that the export is right: llama.cpp, loading the base Q4 GGUF with the exported adapter
through ``lora_path=``, scores the trained answers better than the base alone, by about as much
as torch does with the peft adapter. The exporter refuses lora_a and lora_b swapped
(llama-cpp-python 0.3.36 crashes on such a file); one with the wrong alpha moves llama.cpp's
loss by a different amount than torch's (a test checks that the comparison catches alpha x 2).

Kept small for a shared 2-core machine: 6 short lessons, a handful of steps. The first run
dequantises the GGUF into the study cache (about a minute); later runs load it in seconds.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("llama_cpp")

from pupil_node.study import StudyLesson, StudySettings, TrainSettings, run_study_round
from pupil_node.study.base import (
    default_cache_dir,
    embedded_gguf_path,
    file_sha256,
    load_base,
    load_tokenizer,
)
from pupil_node.study.data import build_examples, pupil_prompt, split_validation
from pupil_node.study.export import export_lora_gguf, llama_answer_nll
from pupil_node.study.round import GGUF_FILE, PEFT_DIR, ROUND_FILE, RoundResult
from pupil_node.study.train import mean_nll

pytestmark = pytest.mark.models

THREADS = 2
MAX_LEN = 96
# nats per answer token; see agrees()
TOLERANCE = 0.05
# Random lora_B for the alpha test: moves the loss by about a nat (measured: 0.03 -> 0.55).
RANDOM_B_STD = 0.04
LESSONS = [
    StudyLesson(
        "t-bread",
        "What makes bread rise?",
        "Yeast makes bread rise.\nReason: Yeast turns sugar into carbon dioxide gas.\n"
        "Tip: Keep the dough warm.",
    ),
    StudyLesson(
        "t-sky",
        "Why is the sky blue?",
        "Air scatters blue light most.\nReason: Short wavelengths scatter more strongly.\n"
        "Tip: Look away from the sun.",
    ),
    StudyLesson(
        "t-french",
        "Translate into French: 'Good morning'",
        "Bonjour.\nReason: It is the usual morning greeting.\nTip: Say it with a smile.",
    ),
    StudyLesson(
        "t-ice",
        "Why does ice float?",
        "Ice is less dense than water.\nReason: Its crystals hold molecules further apart.\n"
        "Tip: Full bottles burst in the freezer.",
    ),
    StudyLesson(
        "t-moon",
        "Why does the moon have phases?",
        "We see different parts of its lit half.\nReason: It orbits Earth every month.\n"
        "Tip: A full moon rises at sunset.",
    ),
    StudyLesson(
        "t-salt",
        "Why do roads get salted in winter?",
        "Salt lowers the freezing point of water.\nReason: Dissolved salt disturbs ice forming.\n"
        "Tip: Rinse the car afterwards.",
    ),
    StudyLesson(
        "e-rain", "Why does it rain?", "Clouds release water.\nReason: x.\nTip: y.", split="eval"
    ),
]
SETTINGS = StudySettings(
    # alpha / r = 2, so an exporter that dropped or misread alpha would show.
    train=TrainSettings(
        rank=8,
        alpha=16.0,
        learning_rate=1e-3,
        batch_size=2,
        max_steps=4,
        epochs=2,
        threads=THREADS,
    ),
    max_len=MAX_LEN,
    validation_fraction=0.2,
)


def agrees(drops: dict[str, float], llama_after: float) -> bool:
    """llama.cpp with the adapter scores the trained answers as torch with peft does.

    The base models differ (Q4_K_M in llama.cpp, bf16 in torch) by about 0.02 nats a token on
    these answers; a correct adapter keeps them that close after training (measured: 0.002 and
    0.010 in two runs).
    """
    return abs(llama_after - drops["torch_after"]) <= TOLERANCE


@pytest.fixture(scope="module")
def first_round(tmp_path_factory: pytest.TempPathFactory) -> RoundResult:
    out = tmp_path_factory.mktemp("study") / "round-1"
    return run_study_round(LESSONS, None, out, SETTINGS)


@pytest.fixture(scope="module")
def drops(first_round: RoundResult) -> dict[str, float]:
    """Per-token NLL of the trained answers, before and after, in torch and in llama.cpp."""
    from peft import PeftModel

    base = load_base(embedded_gguf_path(), default_cache_dir(), SETTINGS.dtype)
    study, _ = split_validation(LESSONS, SETTINGS.validation_fraction)
    examples = build_examples(study, base.tokenizer, max_len=MAX_LEN)
    model = PeftModel.from_pretrained(base.model, first_round.peft_dir)
    with model.disable_adapter():
        torch_before = mean_nll(model, examples, pad_id=0)
    torch_after = mean_nll(model, examples, pad_id=0)
    gguf = embedded_gguf_path()
    return {
        "torch_before": torch_before,
        "torch_after": torch_after,
        "llama_before": llama_answer_nll(gguf, examples, n_threads=THREADS),
        "llama_after": llama_answer_nll(
            gguf, examples, Path(first_round.gguf_path), n_threads=THREADS
        ),
        "examples": len(examples),
    }


def test_prompt_tokens_are_the_runtimes() -> None:
    from llama_cpp import Llama

    tokenizer = load_tokenizer(embedded_gguf_path())
    llama = Llama(model_path=str(embedded_gguf_path()), vocab_only=True, verbose=False)
    by_id = {lesson.lesson_id: lesson for lesson in LESSONS}
    examples = build_examples(LESSONS, tokenizer, max_len=256)
    assert len(examples) == 6  # not the eval lesson
    for example in examples:
        prompt = pupil_prompt(by_id[example.lesson_id]).encode()
        # What create_completion feeds the model: BOS, then the prompt with special tokens.
        assert list(example.input_ids[: example.prompt_len]) == llama.tokenize(
            prompt, add_bos=True, special=True
        )
        assert example.input_ids[-1] == llama.token_eos()
    llama.close()


def test_round_writes_its_files(first_round: RoundResult) -> None:
    out = Path(first_round.gguf_path).parent
    assert first_round.version == 1
    assert first_round.steps == SETTINGS.train.max_steps
    assert first_round.val_examples >= 1 and first_round.train_examples >= 4
    # The eval lesson was dropped before anything else.
    assert first_round.train_examples + first_round.val_examples == 6
    assert (out / PEFT_DIR / "adapter_model.safetensors").is_file()
    assert not list((out / PEFT_DIR).glob("*.bin"))
    assert file_sha256(out / GGUF_FILE) == first_round.gguf_sha256
    manifest = json.loads((out / ROUND_FILE).read_text())
    assert manifest["gguf_sha256"] == first_round.gguf_sha256
    assert math.isfinite(first_round.val_loss_before) and math.isfinite(first_round.val_loss_after)
    assert first_round.peak_rss > 0 and first_round.gguf_bytes > 0
    # The round scored its validation slice with llama.cpp too, as served: same as torch's.
    assert first_round.llama_val_loss_before == pytest.approx(first_round.val_loss_before, abs=0.1)
    assert first_round.llama_val_loss_after == pytest.approx(first_round.val_loss_after, abs=0.1)


def test_llama_cpp_serves_what_torch_trained(drops: dict[str, float]) -> None:
    assert abs(drops["llama_before"] - drops["torch_before"]) <= TOLERANCE, drops
    assert drops["torch_before"] - drops["torch_after"] > 0.3, drops
    assert drops["llama_before"] - drops["llama_after"] > 0.3, drops
    assert agrees(drops, drops["llama_after"]), drops


def test_a_wrong_alpha_would_be_caught(tmp_path: Path) -> None:
    """llama.cpp and torch agree on an adapter's effect, sharply enough to catch alpha x 2.

    A trained adapter sits near a minimum of the loss along its own direction, where twice its
    scale costs little (measured: 0.04-0.11 nats), so this uses an adapter that moves the loss
    a lot instead: random lora_B (fixed seed). Its effect on the loss is measured in torch, then
    in llama.cpp through the exported GGUF, and through one exported with alpha x 2.
    """
    import torch

    from pupil_node.study.train import attach_lora, save_adapter

    base = load_base(embedded_gguf_path(), default_cache_dir(), SETTINGS.dtype)
    examples = build_examples(LESSONS, base.tokenizer, max_len=MAX_LEN)[:4]
    model = attach_lora(base.model, SETTINGS.train)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * RANDOM_B_STD)
    with model.disable_adapter():
        torch_base = mean_nll(model, examples, pad_id=0)
    torch_shift = mean_nll(model, examples, pad_id=0) - torch_base
    peft_dir = save_adapter(model, tmp_path / "peft")

    gguf = embedded_gguf_path()
    llama_base = llama_answer_nll(gguf, examples, n_threads=THREADS)

    def llama_shift(alpha_factor: float) -> float:
        directory = tmp_path / f"peft-{alpha_factor}"
        shutil.copytree(peft_dir, directory)
        config_path = directory / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["lora_alpha"] = alpha_factor * config["lora_alpha"]
        config_path.write_text(json.dumps(config))
        exported = export_lora_gguf(directory, gguf, tmp_path / f"{alpha_factor}.gguf")
        return llama_answer_nll(gguf, examples, exported, n_threads=THREADS) - llama_base

    def close(shift: float) -> bool:
        return abs(shift - torch_shift) <= 0.2 * torch_shift + TOLERANCE

    right, doubled = llama_shift(1.0), llama_shift(2.0)
    assert torch_shift > 0.5, torch_shift
    assert close(right), (torch_shift, right)
    assert not close(doubled), (torch_shift, doubled)


def test_a_round_resumes_from_the_previous_adapter(
    first_round: RoundResult, tmp_path: Path
) -> None:
    settings = StudySettings(
        train=TrainSettings(
            rank=8, alpha=16.0, learning_rate=1e-3, batch_size=2, max_steps=1, threads=THREADS
        ),
        max_len=MAX_LEN,
        validation_fraction=SETTINGS.validation_fraction,
    )
    second = run_study_round(LESSONS, Path(first_round.peft_dir), tmp_path / "round-2", settings)
    assert second.version == 2
    assert second.steps == 1
    # It started from the first round's adapter: same validation loss as that one ended with.
    assert second.val_loss_before == pytest.approx(first_round.val_loss_after, abs=1e-3)
