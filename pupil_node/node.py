"""One pupil node's lesson flow, top to bottom.

For each lesson:
1. decode it and check it is in our embedding space; a lesson already done replays its report
   (or, if the broker confirmed that report already, only asks for the ack);
2. answer the goal plainly with the local model, embed the answer, measure ``similarity_before``;
3. on a ``train`` lesson: train the answer adapter (pupil answer -> master answer) and the prompt
   adapter (goal -> master answer), checkpoint both, and remember the lesson for retrieval;
   on an ``eval`` lesson: nothing is learned; answer again by every configured guidance method
   and measure ``similarity_guided`` — what the pupil *says* after alignment;
4. measure ``similarity_adapted`` (the answer adapter's prediction, a vector), journal the lesson
   with its report, and hand the report back to be published; once the broker confirmed it,
   :meth:`PupilNode.mark_reported` notes that in the journal, and the consumer acks.
"""

from __future__ import annotations

import logging
import platform
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pupil_node.guidance import Answer, Goal, Guide
from pupil_node.journal import Journal
from pupil_node.memory import LessonMemory
from shared import __version__
from shared.adapter import AdapterTrainer
from shared.backends import Embedder, GenerationParams, TextGenerator
from shared.broker import Delivery
from shared.checkpoint import load_latest, save_checkpoint
from shared.config import PupilConfig
from shared.errors import EmbeddingMismatch
from shared.messages import Lesson, NodeInfo, Report, Timings, decode, encode
from shared.similarity import cosine

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "adapter.safetensors"
PROMPT_CHECKPOINT_NAME = "prompt_adapter.safetensors"
JOURNAL_NAME = "journal.sqlite3"
MEMORY_NAME = "memory.sqlite3"


@dataclass
class Outcome:
    """What the flow produced for one lesson: the encoded report, ready to publish."""

    lesson_id: str
    report: bytes
    replayed: bool  # True when the lesson was already done: its journalled report, no new work
    reported: bool = False  # True when the broker already confirmed that report: only ack


class PupilNode:
    """The pupil's state (adapters, memory, journal) and the work it does per lesson."""

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
        self.prompt_checkpoint_path = state_dir / PROMPT_CHECKPOINT_NAME
        self.journal = Journal(state_dir / JOURNAL_NAME)
        # Answer adapter: the seed's, pupil answer embedding -> master answer embedding.
        self.trainer = self._load_or_create(self.checkpoint_path)
        # Prompt adapter: goal embedding -> master answer embedding, what best-of-K aims at.
        self.prompt_trainer = self._load_or_create(self.prompt_checkpoint_path)
        self.memory = LessonMemory(state_dir / MEMORY_NAME, embedder.dim)
        gen = config.generator
        # Nodes sharing a config must not sample identical answers: mix the node id into the seed.
        seed = None if gen.seed is None else (gen.seed + zlib.crc32(node_id.encode())) % 2**31
        self.params = GenerationParams(
            temperature=gen.temperature, top_p=gen.top_p, max_tokens=gen.max_tokens, seed=seed
        )
        # Lessons and jobs run on two worker threads: training an adapter and reading it for a
        # job's best-of-K must not interleave.
        self.state_lock = threading.Lock()
        # Writes the two adapters' checkpoints side by side (see _learn).
        self._writer = ThreadPoolExecutor(max_workers=2, thread_name_prefix="checkpoint")
        self.guide = Guide(
            config.guidance, gen, generator, embedder, self.params, self.memory,
            self._predict_master,
        )  # fmt: skip

    # -- state -----------------------------------------------------------------------------

    @property
    def reference_model(self) -> str:
        """The embedding model lessons must be embedded with (ours, unless bridging)."""
        return self.config.adapter.reference_model or self.embedder.model_name

    @property
    def reference_dim(self) -> int:
        """The dimension lessons' embeddings must have."""
        return self.config.adapter.reference_dim or self.embedder.dim

    @property
    def same_space(self) -> bool:
        """True unless bridging: pupil and master answers can then be compared directly."""
        return self.reference_model == self.embedder.model_name

    def _load_or_create(self, path: Path) -> AdapterTrainer:
        adapter = self.config.adapter
        # A checkpoint for other dims or another embedding model raises CheckpointError: the
        # operator must move it away on purpose rather than lose a trained adapter silently.
        trainer = load_latest(
            path,
            in_dim=self.embedder.dim,
            out_dim=self.reference_dim,
            embedding_model=self.reference_model,
        )
        if trainer is not None:
            log.info("loaded adapter version %d from %s", trainer.version, path)
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

    def _predict_master(self, goal_vec: np.ndarray) -> np.ndarray:
        with self.state_lock:
            return self.prompt_trainer.predict(goal_vec)

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
            job_kinds=list(self.config.jobs),
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

        done = self.journal.entry(lesson.lesson_id)
        if done is not None:
            log.info(
                "lesson %s already done; %s",
                lesson.lesson_id[:8],
                "its report was confirmed, acking" if done.reported else "sending its report again",
            )
            return Outcome(lesson.lesson_id, done.report, replayed=True, reported=done.reported)
        # Says which lesson is in hand: an operator (or a fault test) can tell a lesson that
        # was cut short from one that never started.
        log.info("lesson %s (%s): started", lesson.lesson_id[:8], lesson.split)

        # 1. Answer the goal plainly, the way this pupil would on its own.
        goal = Goal(lesson.goal_text, lesson.preferences, lesson.instructions)
        started = time.perf_counter()
        answer = self.guide.generate(self.guide.prompt(goal))
        generate_ms = _ms_since(started)

        # 2. Embed it (and the goal, which the prompt adapter and retrieval use).
        started = time.perf_counter()
        pupil_vec, goal_vec = self.guide.embed([answer, lesson.goal_text])
        embed_ms = _ms_since(started)
        master_vec = lesson.reference.to_array()
        before = cosine(pupil_vec, master_vec) if self.same_space else None

        # 3. Learn from train lessons; on eval lessons, measure what guidance makes us say.
        losses: list[float] = []
        train_ms = guide_ms = 0.0
        guided: dict[str, float] = {}
        guided_answers: dict[str, str] = {}
        if lesson.split == "train":
            started = time.perf_counter()
            losses = self._learn(lesson, pupil_vec, goal_vec, master_vec)
            train_ms = _ms_since(started)
        elif self.same_space:
            started = time.perf_counter()
            for method in self.config.guidance.eval_methods:
                guided_answer = self.guide.answer(method, goal, goal_vec)
                guided[method] = cosine(guided_answer.vector, master_vec)
                guided_answers[method] = guided_answer.text
            guide_ms = _ms_since(started)
        adapted = cosine(self.trainer.predict(pupil_vec), master_vec)

        report = Report(
            lesson_id=lesson.lesson_id,
            node_id=self.node_id,
            split=lesson.split,
            pupil_model=self.generator.model_name,
            pupil_answer=answer,
            similarity_before=before,
            similarity_adapted=adapted,
            similarity_guided=before
            if self.config.guidance.method == "plain"
            else guided.get(self.config.guidance.method),
            guided=guided,
            guided_answers=guided_answers,
            losses=losses,
            timings=Timings(
                generate_ms=generate_ms, embed_ms=embed_ms, train_ms=train_ms, guide_ms=guide_ms
            ),
            adapter_version=self.trainer.version,
            trained=lesson.split == "train",
        )
        body = encode(report)
        # 4. Journal before publishing: from here on a redelivery replays this report.
        self.journal.record(lesson.lesson_id, body)
        log.info(
            "lesson %s (%s): before=%s adapted=%.3f%s%s",
            lesson.lesson_id[:8],
            lesson.split,
            "-" if before is None else f"{before:.3f}",
            adapted,
            "".join(f" {m}={s:.3f}" for m, s in guided.items()),
            f" loss={losses[-1]:.4f}" if losses else "",
        )
        return Outcome(lesson.lesson_id, body, replayed=False)

    def _learn(
        self, lesson: Lesson, pupil_vec: np.ndarray, goal_vec: np.ndarray, master_vec: np.ndarray
    ) -> list[float]:
        """Train both adapters on a train lesson, checkpoint them, remember the lesson.

        Each adapter is skipped if its checkpoint already holds this lesson: after a crash between
        checkpoint and journal, the redelivered lesson is not learned twice. The two checkpoints
        are written at the same time: each is atomic on its own, and most of a write is waiting
        for the disk (fsync), which two writes can share.
        """
        assert lesson.split == "train", "eval lessons are never learned"
        pairs = (
            (self.trainer, self.checkpoint_path, pupil_vec),
            (self.prompt_trainer, self.prompt_checkpoint_path, goal_vec),
        )
        losses: list[list[float]] = []
        with self.state_lock:
            to_save = []
            for trainer, path, x in pairs:
                if trainer.last_lesson_id == lesson.lesson_id:
                    log.info("lesson %s is in %s already", lesson.lesson_id[:8], path.name)
                    losses.append([])
                    continue
                losses.append(self._train(trainer, lesson, x, master_vec))
                to_save.append((trainer, path))
            for future in [self._writer.submit(save_checkpoint, t, p) for t, p in to_save]:
                future.result()  # raises CheckpointError: the lesson is then not acked
        self.memory.add(lesson.lesson_id, lesson.goal_text, lesson.master_answer, goal_vec)
        return losses[0]

    def _train(
        self, trainer: AdapterTrainer, lesson: Lesson, x: np.ndarray, y: np.ndarray
    ) -> list[float]:
        adapter = self.config.adapter
        return trainer.learn(
            lesson.lesson_id, x, y, steps=adapter.steps_per_lesson, batch_size=adapter.batch_size
        )

    def answer_job(self, goal_text: str, max_tokens: int) -> Answer:
        """Answer a job's goal with this node's guidance method, as it would a lesson's goal.

        ``pupil.guidance.method`` decides how: ``retrieval`` puts the master's answers to the
        nearest trained lessons in the prompt, ``best_of_k`` reranks samples by the prompt
        adapter, ``plain`` is the model alone.
        """
        guide = self.guide.limited(max_tokens)
        goal_vec = guide.embed([goal_text])[0]
        return guide.answer(self.config.guidance.method, Goal(goal_text), goal_vec)

    def mark_reported(self, lesson_id: str) -> None:
        """Note that the broker confirmed the lesson's report: a redelivery is then only acked."""
        self.journal.mark_reported(lesson_id)

    def close(self) -> None:
        """Release the journal, the memory and the checkpoint writers."""
        self._writer.shutdown(wait=True)
        self.journal.close()
        self.memory.close()


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0
