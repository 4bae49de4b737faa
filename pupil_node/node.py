"""One pupil node's lesson flow, top to bottom.

For each lesson: decode and check it, answer with the local model, embed the answer, measure
``similarity_before``; then on an ``eval`` lesson measure ``similarity_adapted`` without training,
and on a ``train`` lesson train the adapter, checkpoint it, and measure again. Journal the lesson,
publish the report (confirmed), and only then let the consumer ack.
"""

from __future__ import annotations

import logging
import platform
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from pupil_node.journal import Journal
from shared import __version__
from shared.adapter import AdapterTrainer
from shared.backends import Embedder, GenerationParams, TextGenerator
from shared.backends.templates import render_prompt
from shared.broker import Delivery
from shared.checkpoint import load_latest, save_checkpoint
from shared.config import PupilConfig
from shared.errors import EmbeddingMismatch
from shared.messages import Lesson, NodeInfo, Report, Timings, decode, encode
from shared.similarity import cosine

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "adapter.safetensors"
JOURNAL_NAME = "journal.sqlite3"


@dataclass
class Outcome:
    """What the flow produced for one lesson: the encoded report, ready to publish."""

    lesson_id: str
    report: bytes
    replayed: bool  # True when the lesson was already done and its old report is sent again


class PupilNode:
    """The pupil's state (adapter, journal) and the work it does per lesson."""

    def __init__(
        self, node_id: str, config: PupilConfig, generator: TextGenerator, embedder: Embedder
    ) -> None:
        self.node_id = node_id
        self.config = config
        self.generator = generator
        self.embedder = embedder
        state_dir = Path(config.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_path = state_dir / CHECKPOINT_NAME
        self.journal = Journal(state_dir / JOURNAL_NAME)
        self.trainer = self._load_or_create_adapter()
        gen = config.generator
        # Nodes sharing a config must not sample identical answers: mix the node id into the seed.
        seed = None if gen.seed is None else (gen.seed + zlib.crc32(node_id.encode())) % 2**31
        self.params = GenerationParams(
            temperature=gen.temperature, top_p=gen.top_p, max_tokens=gen.max_tokens, seed=seed
        )

    # -- state -----------------------------------------------------------------------------

    @property
    def reference_model(self) -> str:
        """The embedding model lessons must be embedded with (ours, unless bridging)."""
        return self.config.adapter.reference_model or self.embedder.model_name

    @property
    def reference_dim(self) -> int:
        """The dimension lessons' embeddings must have."""
        return self.config.adapter.reference_dim or self.embedder.dim

    def _load_or_create_adapter(self) -> AdapterTrainer:
        adapter = self.config.adapter
        # A checkpoint for other dims or another embedding model raises CheckpointError: the
        # operator must move it away on purpose rather than lose a trained adapter silently.
        trainer = load_latest(
            self.checkpoint_path,
            in_dim=self.embedder.dim,
            out_dim=self.reference_dim,
            embedding_model=self.reference_model,
        )
        if trainer is not None:
            log.info("loaded adapter version %d from %s", trainer.version, self.checkpoint_path)
            return trainer
        return AdapterTrainer(
            in_dim=self.embedder.dim,
            out_dim=self.reference_dim,
            hidden_dim=adapter.hidden_dim,
            learning_rate=adapter.learning_rate,
            replay_capacity=adapter.buffer_capacity,
            seed=adapter.seed,
            embedding_model=self.reference_model,
        )

    def info(self) -> NodeInfo:
        """What this node tells the master in hello and heartbeat messages."""
        return NodeInfo(
            node_id=self.node_id,
            software_version=__version__,
            pupil_model=self.generator.model_name,
            embedding_model=self.embedder.model_name,
            embedding_dim=self.embedder.dim,
            hardware=f"{platform.machine()} {platform.system()} {platform.release()}",
            adapter_version=self.trainer.version,
            lessons_done=self.journal.count(),
        )

    # -- the lesson flow -------------------------------------------------------------------

    def check(self, lesson: Lesson) -> None:
        """Refuse a lesson from another embedding space (raises EmbeddingMismatch)."""
        ref = lesson.reference
        if ref.model != self.reference_model or ref.dim != self.reference_dim:
            raise EmbeddingMismatch(
                f"lesson {lesson.lesson_id} is embedded with {ref.model} ({ref.dim} dims) but "
                f"node {self.node_id} expects {self.reference_model} ({self.reference_dim} dims)"
            )

    def process(self, delivery: Delivery) -> Outcome:
        """Do one lesson; raises DecodeError (incl. EmbeddingMismatch) for a lesson to refuse."""
        lesson = decode(delivery.body, Lesson)
        assert isinstance(lesson, Lesson)
        self.check(lesson)

        done = self.journal.report_for(lesson.lesson_id)
        if done is not None:
            log.info("lesson %s already done; sending its report again", lesson.lesson_id[:8])
            return Outcome(lesson.lesson_id, done, replayed=True)

        # 1. Answer the goal the way this pupil would, with its own template.
        started = time.perf_counter()
        prompt = render_prompt(
            self.config.generator.template,
            lesson.goal_text,
            lesson.preferences,
            lesson.instructions,
        )
        answer = self.generator.generate(prompt, self.params, system=self.config.generator.system)
        generate_ms = _ms_since(started)

        # 2. Embed it and compare with the master's answer.
        started = time.perf_counter()
        pupil_vec = self.embedder.embed([answer or " "])[0]
        embed_ms = _ms_since(started)
        master_vec = lesson.reference.to_array()
        before = cosine(pupil_vec, master_vec) if self._same_space else None

        # 3. Train on train lessons only; eval lessons measure generalisation.
        losses: list[float] = []
        train_ms = 0.0
        trained = False
        if lesson.split == "train":
            already = self.trainer.last_lesson_id == lesson.lesson_id
            if already:
                # Died after the checkpoint but before the journal: the training is in the
                # checkpoint, so doing it again would count this lesson twice.
                log.info("lesson %s is in the checkpoint already", lesson.lesson_id[:8])
            else:
                started = time.perf_counter()
                adapter = self.config.adapter
                losses = self.trainer.learn(
                    lesson.lesson_id,
                    pupil_vec,
                    master_vec,
                    steps=adapter.steps_per_lesson,
                    batch_size=adapter.batch_size,
                )
                save_checkpoint(self.trainer, self.checkpoint_path)
                train_ms = _ms_since(started)
            trained = True
        adapted = cosine(self.trainer.predict(pupil_vec), master_vec)

        report = Report(
            lesson_id=lesson.lesson_id,
            node_id=self.node_id,
            split=lesson.split,
            pupil_model=self.generator.model_name,
            pupil_answer=answer,
            similarity_before=before,
            similarity_adapted=adapted,
            losses=losses,
            timings=Timings(generate_ms=generate_ms, embed_ms=embed_ms, train_ms=train_ms),
            adapter_version=self.trainer.version,
            trained=trained,
        )
        body = encode(report)
        # 4. Journal before publishing: from here on a redelivery replays this report.
        self.journal.record(lesson.lesson_id, body)
        log.info(
            "lesson %s (%s): before=%s adapted=%.3f%s",
            lesson.lesson_id[:8],
            lesson.split,
            "-" if before is None else f"{before:.3f}",
            adapted,
            f" loss={losses[-1]:.4f}" if losses else "",
        )
        return Outcome(lesson.lesson_id, body, replayed=False)

    @property
    def _same_space(self) -> bool:
        # Without a bridge, pupil and master answers live in one embedding space and can be
        # compared directly; with one, only the adapter's output is comparable.
        return self.reference_model == self.embedder.model_name

    def close(self) -> None:
        """Release the journal."""
        self.journal.close()


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0
