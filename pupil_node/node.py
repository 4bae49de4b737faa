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
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pupil_node.disk import StateWriteFailed, free_bytes, is_storage_failure, state_write
from pupil_node.guidance import Answer, Goal, Guide
from pupil_node.journal import Journal
from pupil_node.memory import LessonMemory
from pupil_node.state import NodeState, resolve_state_dir
from pupil_node.study.data import StudyLesson
from pupil_node.study.serving import LoraServing
from shared import __version__
from shared.adapter import AdapterTrainer
from shared.backends import Embedder, GenerationParams, TextGenerator
from shared.checkpoint import load_latest, save_checkpoint
from shared.config import LORA_METHODS, PupilConfig
from shared.errors import EmbeddingMismatch
from shared.messages import Lesson, NodeInfo, Report, Timings, decode, encode, new_id
from shared.similarity import cosine
from shared.study_metrics import StudyMetrics

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
        self,
        node_id: str,
        config: PupilConfig,
        generator: TextGenerator,
        embedder: Embedder,
        state: NodeState | None = None,
        study_metrics: StudyMetrics | None = None,
    ) -> None:
        """Open the node's state directory and load its adapters, journal and memory.

        ``state`` is the state directory already opened (locked, owned) by the caller, as
        ``pupil run`` does before loading models; without it the node opens
        ``config.state_dir`` (or the per-node default) itself. Either way :meth:`close`
        releases it. Raises StateDirInUse or ConfigError for a directory it may not use.
        """
        self.node_id = node_id
        # New at every process start, never stored: a cloned SD card copies the state directory,
        # so only a per-process id tells the master two machines apart that share a node id.
        self.instance_id = new_id()[:16]
        self.config = config
        self.generator = generator
        self.embedder = embedder
        if state is None:
            state = NodeState.open(resolve_state_dir(config.state_dir, node_id), node_id)
        assert state.node_id == node_id, "the state directory was opened for another node"
        self.state = state
        state_dir = state.path
        retention = config.retention
        self.checkpoint_path = state_dir / CHECKPOINT_NAME
        self.prompt_checkpoint_path = state_dir / PROMPT_CHECKPOINT_NAME
        self.journal = Journal(state_dir / JOURNAL_NAME, retention.journal_max_lessons)
        # Answer adapter: the seed's, pupil answer embedding -> master answer embedding.
        self.trainer = self._load_or_create(self.checkpoint_path)
        # Prompt adapter: goal embedding -> master answer embedding, what best-of-K aims at.
        self.prompt_trainer = self._load_or_create(self.prompt_checkpoint_path)
        self.memory = LessonMemory(
            state_dir / MEMORY_NAME,
            embedder.dim,
            retention.memory_max_lessons,
            retention.retrieval_max_lessons,
        )
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
        # The node's own model with its served LoRA adapter, and the study rounds that train it.
        self.lora = LoraServing(config, state_dir, generator, self.study_lessons, study_metrics)
        self.guide = Guide(
            config.guidance, gen, generator, embedder, self.params, self.memory,
            self._predict_master, self.lora.generator,
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
            instance_id=self.instance_id,
            lora_version=self.lora.version,
        )

    def study_lessons(self, limit: int) -> list[StudyLesson]:
        """The newest ``limit`` train lessons this node remembers (the memory holds no eval)."""
        return [
            StudyLesson(lesson_id, goal, answer)
            for lesson_id, goal, answer in self.memory.recent(limit)
        ]

    # -- the lesson flow -------------------------------------------------------------------

    def check(self, lesson: Lesson) -> None:
        """Refuse a lesson from another embedding space (raises EmbeddingMismatch)."""
        ref = lesson.reference
        if ref.model != self.reference_model or ref.dim != self.reference_dim:
            raise EmbeddingMismatch(
                f"lesson {lesson.lesson_id} is embedded with {ref.model} ({ref.dim} dims) but "
                f"node {self.node_id} expects {self.reference_model} ({self.reference_dim} dims)"
            )

    def process(self, body: bytes, offset: int | None = None) -> Outcome:
        """Do one lesson (its encoded message); raises DecodeError (incl. EmbeddingMismatch) for
        a lesson to refuse. ``offset``: where the lesson sits in the lesson stream, journalled
        with it (None from a per-node queue)."""
        lesson = decode(body, Lesson)
        self.check(lesson)

        # An exam repeats an eval lesson's id: the journal knows it by lesson and exam.
        work_id = lesson.work_id
        done = self.journal.entry(work_id)
        if done is not None:
            log.info(
                "lesson %s already done; %s",
                work_id[:8],
                "its report was confirmed, acking" if done.reported else "sending its report again",
            )
            if offset is not None:
                with state_write(f"note stream offset {offset}"):
                    self.journal.advance(offset)
            return Outcome(work_id, done.report, replayed=True, reported=done.reported)
        self._check_free_space()
        if lesson.exam_id is not None:
            self.lora.wait_for_round(self.config.study.round_timeout_s)
        # Says which lesson is in hand: an operator (or a fault test) can tell a lesson that
        # was cut short from one that never started.
        log.info("lesson %s (%s): started", lesson.lesson_id[:8], _kind(lesson))

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
            serving_lora = self.lora.generator() is not None
            for method in self.config.guidance.eval_methods:
                if method in LORA_METHODS and not serving_lora:
                    continue  # nothing studied yet: it would only repeat the base model
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
            lora_version=self.lora.version,
            trained=lesson.split == "train",
            exam_id=lesson.exam_id,
        )
        body = encode(report)
        # 4. Journal before publishing: from here on a redelivery replays this report.
        with state_write(f"journal lesson {lesson.lesson_id}"):
            self.journal.record(work_id, body, offset)
        self.lora.lesson_done(trained=lesson.split == "train")
        log.info(
            "lesson %s (%s): before=%s adapted=%.3f%s%s",
            lesson.lesson_id[:8],
            _kind(lesson),
            "-" if before is None else f"{before:.3f}",
            adapted,
            "".join(f" {m}={s:.3f}" for m, s in guided.items()),
            f" loss={losses[-1]:.4f}" if losses else "",
        )
        return Outcome(work_id, body, replayed=False)

    def _learn(
        self, lesson: Lesson, pupil_vec: np.ndarray, goal_vec: np.ndarray, master_vec: np.ndarray
    ) -> list[float]:
        """Train both adapters on a train lesson, checkpoint them, remember the lesson.

        Returns the answer adapter's losses (empty if it held the lesson already).

        Each adapter is skipped if its checkpoint already holds this lesson (one of its pending
        lessons): after a crash, or a full disk, between checkpoint and journal, the lesson is not
        learned twice when it comes back, even after other lessons. The two checkpoints are
        written at the same time: each is atomic on its own, and most of a write is waiting for
        the disk (fsync), which two writes can share. A failed write rolls the adapters back
        (:meth:`_save`); a full disk raises :class:`StateWriteFailed`, an outage of the state
        disk: the consumer holds the lesson and retries it once the disk has room.
        """
        assert lesson.split == "train", "eval lessons are never learned"
        adapters = {
            "answer": (self.trainer, self.checkpoint_path, pupil_vec),
            "prompt": (self.prompt_trainer, self.prompt_checkpoint_path, goal_vec),
        }
        losses: dict[str, list[float]] = {}
        with self.state_lock:
            to_save = []
            for name, (trainer, path, x) in adapters.items():
                self._forget_journalled(trainer)
                if trainer.holds(lesson.lesson_id):
                    log.info("lesson %s is in %s already", lesson.lesson_id[:8], path.name)
                    losses[name] = []
                    continue
                losses[name] = self._train(trainer, lesson, x, master_vec)
                to_save.append((trainer, path))
            self._save(lesson, to_save)
        with state_write(f"remember lesson {lesson.lesson_id}"):
            self.memory.add(lesson.lesson_id, lesson.goal_text, lesson.master_answer, goal_vec)
        # The report's losses are the answer adapter's: it is the one similarity_adapted reads.
        return losses["answer"]

    def _forget_journalled(self, trainer: AdapterTrainer) -> None:
        # A pending lesson the journal holds is done: the next checkpoint need not carry it.
        done = [i for i in trainer.pending_lesson_ids if self.journal.entry(i) is not None]
        trainer.forget_pending(done)

    def _save(self, lesson: Lesson, to_save: list[tuple[AdapterTrainer, Path]]) -> None:
        """Write the trainers' checkpoints side by side; if any write fails, roll back to disk.

        The adapters in memory must never run ahead of their files: a lesson trained in memory
        only would be reported as trained though a restart would not find it, or be saved along
        with a later lesson and then trained again when it came back. So a failed write reloads
        both adapters from their last durable checkpoints (weights, optimizer, replay buffer,
        version and pending lessons alike), and the lesson is trained again from there when it
        is retried. Runs under ``state_lock``.
        """
        futures = [self._writer.submit(save_checkpoint, t, p) for t, p in to_save]
        wait(futures)  # both writes are over before the files are read back
        errors = [error for f in futures if (error := f.exception()) is not None]
        if not errors:
            return
        self.trainer = self._load_or_create(self.checkpoint_path)
        self.prompt_trainer = self._load_or_create(self.prompt_checkpoint_path)
        log.warning(
            "lesson %s: checkpoint not written (%s); adapters rolled back to versions %d and %d, "
            "as on disk",
            lesson.lesson_id[:8],
            errors[0],
            self.trainer.version,
            self.prompt_trainer.version,
        )
        with state_write(f"checkpoint lesson {lesson.lesson_id}"):
            raise errors[0]  # a full disk holds the lesson back; anything else is a bug: as is

    def state_free_bytes(self) -> int:
        """Bytes still free for the node's state (checkpoints, journal, memory)."""
        return free_bytes(self.checkpoint_path.parent)

    def _check_free_space(self, needed: int | None = None) -> None:
        # Every new lesson writes state: a train lesson two checkpoints, the memory and the
        # journal. Short of the minimum, take none: the lesson waits rather than be answered only
        # to fail at its checkpoint.
        needed = self.config.min_free_bytes if needed is None else needed
        free = self.state_free_bytes()
        if free < needed:
            raise StateWriteFailed(
                f"the state directory {self.checkpoint_path.parent} has {free} bytes free, "
                f"{needed} needed (pupil.min_free_bytes is {self.config.min_free_bytes}); "
                "lessons wait until space is freed"
            )

    def probe_state_disk(self) -> None:
        """Raise StateWriteFailed unless the state disk has room for a train lesson's writes.

        Room means ``pupil.min_free_bytes``, and at least the size of the adapters' checkpoints:
        a train lesson writes each anew before the old one goes, so a disk that refused a write
        is not worth another try with less. The lesson consumer's prober calls this while the
        state disk is down.
        """
        paths = (self.checkpoint_path, self.prompt_checkpoint_path)
        written = sum(path.stat().st_size for path in paths if path.exists())
        self._check_free_space(max(self.config.min_free_bytes, written))

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
        """Note that the broker confirmed the lesson's report: a redelivery is then only acked.

        On a full disk the note is skipped with a warning: the report is confirmed, so the
        lesson is acked all the same, and the only cost is that a redelivery (rare: the ack was
        lost) would send the journalled report again.
        """
        try:
            self.journal.mark_reported(lesson_id)
        except Exception as exc:
            if not is_storage_failure(exc):
                raise
            log.warning("lesson %s: report confirmed but not noted (%s)", lesson_id[:8], exc)

    def close(self) -> None:
        """Release the journal, the memory, the checkpoint writers and the state directory."""
        self.lora.stop()  # a study round in progress is cut short; it reads the memory
        self._writer.shutdown(wait=True)
        self.journal.close()
        self.memory.close()
        self.state.close()  # last: another process may take the directory from here on


def _kind(lesson: Lesson) -> str:
    return lesson.split if lesson.exam_id is None else f"exam {lesson.exam_id}"


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0
