"""A node studies, promotes only what is better, and then *says* something else.

The study round runs as it does in a pupil: in a child process started by the scheduler, on the
real Gemma 270M, with the adapter served by llama.cpp in this process through
:class:`pupil_node.study.serving.LoraServing`. Kept small for 2 shared cores: six short lessons,
a few steps (about a minute per round once the base weights are cached).
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("llama_cpp")

from pupil_node.study.data import StudyLesson
from pupil_node.study.serving import LoraServing
from shared.backends import GenerationParams
from shared.backends.embedded import EmbeddedGenerator
from shared.backends.templates import render_prompt
from shared.config import PupilConfig, StudyConfig
from shared.study_metrics import StudyMetrics
from tests.integration.test_study_lora import LESSONS

pytestmark = pytest.mark.models

GREEDY = GenerationParams(temperature=0.0, max_tokens=24, seed=0)
HELD_OUT = "Why do leaves change colour in autumn?"
STUDY = dict(
    enabled="on",
    min_lessons=4,
    max_steps=6,
    batch_size=2,
    rank=8,
    alpha=16.0,
    learning_rate=2e-3,
    max_len=96,
    validation_fraction=0.2,
    threads=2,
    nice=0,
)


def train_lessons(_limit: int) -> list[StudyLesson]:
    return [lesson for lesson in LESSONS if lesson.split == "train"]


def node_config(state_dir: Path, **study: object) -> PupilConfig:
    return PupilConfig(
        node_id="pi-study",
        state_dir=state_dir,
        study=StudyConfig.model_validate({**STUDY, **study}),
    )


def answer(generator: object, goal: str) -> str:
    prompt = render_prompt("pupil.j2", goal, (), ())
    return generator.generate(prompt, GREEDY)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def base() -> EmbeddedGenerator:
    return EmbeddedGenerator(n_threads=2)


def test_a_better_adapter_is_promoted_served_and_survives_a_restart(
    base: EmbeddedGenerator, tmp_path: Path
) -> None:
    from prometheus_client import CollectorRegistry

    base_answer = answer(base, HELD_OUT)
    metrics = StudyMetrics(CollectorRegistry())
    serving = LoraServing(node_config(tmp_path), tmp_path, base, train_lessons, metrics)
    assert serving.scheduler is not None and serving.generator() is None

    outcome = serving.scheduler.run_round()
    assert outcome is not None and outcome.outcome == "promoted", outcome
    assert outcome.val_loss_after is not None and outcome.val_loss_before is not None
    assert outcome.val_loss_after < outcome.val_loss_before
    served = serving.generator()
    assert served is not None and served.model_name.endswith("+lora-v1")
    assert serving.version == 1 and metrics.lora_version._value.get() == 1

    # The adapter changes what the node says; the base model, sharing the same weights in
    # memory, says exactly what it said before.
    lora_answer = answer(served, HELD_OUT)
    assert lora_answer != base_answer
    assert answer(base, HELD_OUT) == base_answer

    # A restarted node serves the promoted version from disk, without studying again.
    again = LoraServing(node_config(tmp_path), tmp_path, base, train_lessons)
    assert again.version == 1
    restarted = again.generator()
    assert restarted is not None and answer(restarted, HELD_OUT) == lora_answer


def test_a_worse_adapter_is_rejected_and_the_served_one_stays(
    base: EmbeddedGenerator, tmp_path: Path
) -> None:
    # A learning rate this large wrecks the weights in a step: validation loss goes up.
    serving = LoraServing(node_config(tmp_path, learning_rate=1.0), tmp_path, base, train_lessons)
    assert serving.scheduler is not None
    outcome = serving.scheduler.run_round()
    assert outcome is not None and outcome.outcome == "rejected", outcome
    assert "keeping the base model" in outcome.reason
    assert serving.generator() is None and serving.version == 0
    assert serving.store.versions() == []
    assert not list((tmp_path / "lora").glob("round-*"))  # the candidate's files are gone


def test_too_few_lessons_do_not_start_a_round(base: EmbeddedGenerator, tmp_path: Path) -> None:
    serving = LoraServing(node_config(tmp_path, min_lessons=50), tmp_path, base, train_lessons)
    assert serving.scheduler is not None
    assert serving.scheduler.run_round() is None
    assert serving.store.versions() == []
