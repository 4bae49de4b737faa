"""The study scheduler's promise to the exam: it is answered by the node's *final* model."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from pupil_node.study.round import StudySettings
from pupil_node.study.scheduler import StudyScheduler
from pupil_node.study.versions import AdapterStore
from shared.config import StudyConfig


def scheduler(tmp_path: Path) -> StudyScheduler:
    return StudyScheduler(
        StudyConfig(every_lessons=2),
        AdapterStore(tmp_path / "lora"),
        lambda _n: [],
        StudySettings(),
        lambda _version: None,
    )


def test_an_exam_waits_for_the_round_that_the_last_lessons_make_due(tmp_path: Path) -> None:
    study = scheduler(tmp_path)
    events: list[str] = []

    def rounds() -> None:
        # Round 1 runs; the curriculum's last lessons arrive meanwhile, so round 2 is due the
        # moment round 1 ends, and starts a little later (the thread wakes up).
        study._not_studying.clear()
        study.lesson_done(trained=True)
        study.lesson_done(trained=True)
        time.sleep(0.3)
        events.append("round 1 done")
        study._not_studying.set()
        time.sleep(0.3)
        study._not_studying.clear()
        events.append("round 2 started")
        with study._lock:
            study._new_train_lessons = 0
        time.sleep(0.3)
        events.append("round 2 done")
        study._not_studying.set()

    worker = threading.Thread(target=rounds)
    worker.start()
    time.sleep(0.1)
    assert study.wait_for_round(timeout_s=30)
    events.append("exam answered")
    worker.join()
    assert events == ["round 1 done", "round 2 started", "round 2 done", "exam answered"]


def test_an_exam_waits_for_nothing_when_no_round_runs_or_is_due(tmp_path: Path) -> None:
    study = scheduler(tmp_path)
    study.lesson_done(trained=True)  # one new lesson: not due (every_lessons=2)
    assert study.wait_for_round(timeout_s=0.01)


def test_the_study_section_chooses_which_projections_carry_the_lora(tmp_path: Path) -> None:
    """`targets = "mlp"` reaches the round (and a round's child) as the MLP projections only."""
    import pytest

    from pupil_node.study.scheduler import study_settings
    from pupil_node.study.worker import settings_from_json, settings_to_json
    from shared.config import load_settings
    from shared.errors import ConfigError

    def settings(targets: str) -> StudySettings:
        config = StudyConfig(targets=targets)  # type: ignore[arg-type]
        return study_settings(config, None, tmp_path, "pupil.j2", None)

    assert settings("all").train.target_modules == (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    )  # fmt: skip
    mlp = settings("mlp")
    assert mlp.train.target_modules == ("gate_proj", "up_proj", "down_proj")
    assert (
        settings_from_json(settings_to_json(mlp)).train.target_modules == mlp.train.target_modules
    )
    toml = tmp_path / "swarm.toml"
    toml.write_text('[pupil.study]\ntargets = "embeddings"\n')
    with pytest.raises(ConfigError, match="targets"):
        load_settings(toml)


def test_the_study_section_sets_the_epochs_a_round_trains(tmp_path: Path) -> None:
    """`epochs` reaches the round (and a round's child); zero epochs is refused."""
    import pytest

    from pupil_node.study.scheduler import study_settings
    from pupil_node.study.worker import settings_from_json, settings_to_json
    from shared.config import load_settings
    from shared.errors import ConfigError

    two = study_settings(StudyConfig(epochs=2), None, tmp_path, "pupil.j2", None)
    assert settings_from_json(settings_to_json(two)).train.epochs == 2
    toml = tmp_path / "swarm.toml"
    toml.write_text("[pupil.study]\nepochs = 0\n")
    with pytest.raises(ConfigError, match="epochs"):
        load_settings(toml)
