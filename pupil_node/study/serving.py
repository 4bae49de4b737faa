"""What a node serves: its base model plus the promoted LoRA adapter, and the study that feeds it.

:class:`LoraServing` is the pupil's one handle on its LoRA: it loads the served version at start
(verified; see :mod:`pupil_node.study.versions`), hands out the generator that answers with it,
swaps in a newly promoted version between two generations, and owns the background
:class:`~pupil_node.study.scheduler.StudyScheduler`. The lesson flow only tells it when a train
lesson is done and asks it for the served generator.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from pupil_node.study.data import StudyLesson
from pupil_node.study.scheduler import StudyScheduler, study_settings
from pupil_node.study.versions import AdapterStore, AdapterVersion
from shared.backends import TextGenerator
from shared.config import PupilConfig
from shared.errors import BackendError, ConfigError
from shared.study_metrics import StudyMetrics

log = logging.getLogger(__name__)

STUDY_PACKAGES = ("transformers", "peft", "gguf")
LORA_DIR = "lora"


class LoraCapable(Protocol):
    """A generator that can answer with a LoRA adapter on top of its model."""

    model_name: str

    def with_lora(self, path: Path, label: str) -> TextGenerator:
        """A generator for this model plus the adapter at ``path``."""
        ...


def study_packages_missing() -> list[str]:
    """The packages of the ``study`` extra that are not installed."""
    return [name for name in STUDY_PACKAGES if importlib.util.find_spec(name) is None]


def base_gguf_of(generator: TextGenerator) -> Path | None:
    """The GGUF file the runtime serves for ``generator``, or None if it cannot be found here.

    Embedded: the file it loaded. Ollama: the model's blob, found through the Ollama API; only
    readable when the daemon runs on this machine (the usual Pi set-up).
    """
    path = getattr(generator, "gguf_path", None)
    if isinstance(path, Path):
        return path
    model, url = getattr(generator, "model", None), getattr(generator, "url", None)
    if isinstance(model, str):
        from pupil_node.study.base import ollama_gguf_path

        try:
            return ollama_gguf_path(model, url)
        except (BackendError, ConfigError) as exc:
            log.warning("study: cannot find the GGUF of Ollama model '%s': %s", model, exc)
    return None


class LoraServing:
    """The served LoRA version of one node, and (when studying) its scheduler."""

    def __init__(
        self,
        config: PupilConfig,
        state_dir: Path,
        base: TextGenerator,
        lessons: Callable[[int], list[StudyLesson]],
        metrics: StudyMetrics | None = None,
    ) -> None:
        """Load the served version (if any) and decide whether this node studies.

        Raises ConfigError when ``pupil.study.enabled = "on"`` cannot be honoured (the study
        extra is missing, or the base model's GGUF cannot be found).
        """
        self._base = base
        self._metrics = metrics
        self._lock = threading.Lock()
        self._served: TextGenerator | None = None
        self._retired: TextGenerator | None = None
        self.version = 0
        self.store = AdapterStore(state_dir / LORA_DIR, config.study.keep_versions)
        served = self.store.served()
        if served is not None:
            self._serve(served)
        self.scheduler = self._scheduler(config, state_dir, lessons)

    def _scheduler(
        self, config: PupilConfig, state_dir: Path, lessons: Callable[[int], list[StudyLesson]]
    ) -> StudyScheduler | None:
        study = config.study
        if study.enabled == "off":
            return None
        why_not = None
        missing = study_packages_missing()
        base_gguf = None
        if missing:
            why_not = (
                f"the study extra is not installed ({', '.join(missing)} missing): "
                "pip install 'distill-swarm[study]'"
            )
        elif not hasattr(self._base, "with_lora"):
            why_not = f"{self._base.model_name} cannot serve a LoRA adapter"
        elif (base_gguf := base_gguf_of(self._base)) is None:
            why_not = f"the GGUF file behind {self._base.model_name} cannot be found on this node"
        if why_not is not None:
            if study.enabled == "on":
                raise ConfigError(f"config field 'pupil.study.enabled' is on, but {why_not}")
            log.info("study: off (%s)", why_not)
            return None
        # One cache per user, not per node: every node of a machine studies the same base
        # weights, and a reset state directory should not cost the dequantisation again.
        from pupil_node.study.base import default_cache_dir

        cache = study.cache_dir or default_cache_dir()
        settings = study_settings(
            study, base_gguf, cache, config.generator.template, config.generator.system
        )
        log.info(
            "study: on; a LoRA round every %d train lessons (or after %.0fs idle), serving %s",
            study.every_lessons,
            study.idle_s,
            f"LoRA v{self.version}" if self.version else "the base model",
        )
        return StudyScheduler(study, self.store, lessons, settings, self._serve, self._metrics)

    def generator(self) -> TextGenerator | None:
        """The model answering with the served adapter, or None while there is none."""
        with self._lock:
            return self._served

    def _serve(self, version: AdapterVersion) -> None:
        """Answer with ``version`` from the next generation on (runs on the study thread)."""
        capable: LoraCapable = self._base  # type: ignore[assignment]
        try:
            served = capable.with_lora(version.gguf_path, f"lora-v{version.version}")
        except (AttributeError, BackendError) as exc:
            log.warning(
                "LoRA v%d cannot be served (%s); keeping the current model", version.version, exc
            )
            return
        with self._lock:
            retired, self._retired = self._retired, self._served
            self._served, self.version = served, version.version
        # The adapter served until now is freed only at the *next* promotion: a lesson that took
        # it just before the swap may still be generating with it. Rounds are minutes apart.
        close = getattr(retired, "close_lora", None)
        if close is not None:
            close()
        if self._metrics is not None:
            self._metrics.lora_version.set(version.version)
        log.info("serving LoRA v%d (%s)", version.version, version.gguf_path)

    def lesson_done(self, trained: bool) -> None:
        """Tell the scheduler a lesson finished (``trained``: a train lesson, now studied)."""
        if self.scheduler is not None:
            self.scheduler.lesson_done(trained)

    def wait_for_round(self, timeout_s: float) -> None:
        """Let a study round in progress finish first (an exam is answered by the final model)."""
        if self.scheduler is not None and not self.scheduler.wait_for_round(timeout_s):
            log.warning("a study round is still running after %.0fs; answering anyway", timeout_s)

    def start(self) -> None:
        """Start studying in the background (no-op when the node does not study)."""
        if self.scheduler is not None:
            self.scheduler.start()

    def stop(self) -> None:
        """Stop studying; a round in progress is cut short and discarded."""
        if self.scheduler is not None:
            self.scheduler.stop()
