"""Wire messages: pydantic v2 models with one encode/decode path.

Every message carries ``schema_version``, a unique id and a UTC timestamp. Embeddings travel as
lists of float32 values together with the name of the model that made them and their dimension,
so a receiver can refuse a vector from another embedding space instead of training on garbage.

``encode(message) -> bytes`` and ``decode(body, expected_type) -> message`` are the only way
messages cross the wire; any failure while decoding becomes :class:`shared.errors.DecodeError`.
"""

from __future__ import annotations

import json
import math
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal, TypeVar, overload

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from shared.errors import DecodeError, NotJson, one_line

SCHEMA_VERSION = 1

# Bounds that keep one message from hurting a node: a 270M model on a Pi cannot use a 100 kB prompt,
# and a multi-megabyte JSON body is more likely an attack or a bug than a lesson.
MAX_PROMPT_CHARS = 16_000
MAX_ANSWER_CHARS = 32_000
MAX_EMBEDDING_DIM = 8_192
MAX_MESSAGE_BYTES = 1_000_000
FLOAT32_MAX = float(np.finfo(np.float32).max)

NodeId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")]
Split = Literal["train", "eval"]
ExamId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
# What a node says it is doing: "ok", or "model down" while its model server is out and it takes
# no lessons or jobs (shared/health.py). More states may come; a master must know them first.
NodeState = Literal["ok", "model down"]
MODEL_DOWN: NodeState = "model down"
MethodName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_+-]{0,31}$")]
Similarity = Annotated[float, Field(ge=-1.0001, le=1.0001, allow_inf_nan=False)]
JobKindName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,47}$")]
ParamName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
# Who answered a job: a pupil's node id, or this word for the master itself.
MASTER = "master"


def new_id() -> str:
    """A fresh random message id (hex UUID4)."""
    return uuid.uuid4().hex


def utc_now() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


def _in_utc(value: datetime, field: str) -> datetime:
    """A timezone-aware datetime converted to UTC; a naive one is refused (its zone is a guess)."""
    if value.tzinfo is None:
        raise ValueError(f"{field} must carry a timezone (UTC)")
    return value.astimezone(UTC)


class Message(BaseModel):
    """Fields every message shares. Subclasses set ``kind``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: ClassVar[str]
    schema_version: int = SCHEMA_VERSION
    message_id: str = Field(default_factory=new_id, min_length=1, max_length=64)
    created_at: datetime = Field(default_factory=utc_now)

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, value: int) -> int:
        if value != SCHEMA_VERSION:
            raise ValueError(f"unknown schema_version {value}; this node speaks {SCHEMA_VERSION}")
        return value

    _utc = field_validator("created_at")(lambda value: _in_utc(value, "created_at"))


class Embedding(BaseModel):
    """A float32 vector with the name of the model that made it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    dim: int = Field(gt=0, le=MAX_EMBEDDING_DIM)
    values: list[float]

    @model_validator(mode="after")
    def _check(self) -> Embedding:
        if len(self.values) != self.dim:
            raise ValueError(f"embedding has {len(self.values)} values but dim says {self.dim}")
        if not all(math.isfinite(v) for v in self.values):
            raise ValueError("embedding contains NaN or infinity")
        # The vector travels and trains as float32: a value that is finite as a double but past
        # float32's range (1e39) would become infinity the moment it is used.
        if any(abs(v) > FLOAT32_MAX for v in self.values):
            raise ValueError("embedding has a value outside float32's range (|v| > 3.4e38)")
        return self

    @classmethod
    def from_array(cls, model: str, vector: np.ndarray) -> Embedding:
        """Build from a 1-D numpy vector; values are rounded to float32 precision."""
        flat = np.asarray(vector, dtype=np.float32).reshape(-1)
        return cls(model=model, dim=int(flat.shape[0]), values=flat.tolist())

    def to_array(self) -> np.ndarray:
        """The vector as float32 numpy."""
        return np.asarray(self.values, dtype=np.float32)


class Lesson(Message):
    """A prompt with the master's answer and its embedding, fanned out to every pupil."""

    kind: ClassVar[str] = "lesson"
    lesson_id: str = Field(min_length=1, max_length=64)
    task: str = Field(min_length=1, max_length=64)
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    # The un-rendered goal lets a pupil render it with its own template.
    goal_text: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    preferences: list[str] = Field(default_factory=list, max_length=32)
    instructions: list[str] = Field(default_factory=list, max_length=32)
    master_model: str = Field(min_length=1, max_length=200)
    master_answer: str = Field(min_length=1, max_length=MAX_ANSWER_CHARS)
    reference: Embedding
    split: Split
    # Set when the master sends an eval lesson again as part of an exam (`distill-swarm exam`):
    # every node answers it with what it serves *now*, by every method, and learns nothing.
    exam_id: ExamId | None = None

    @model_validator(mode="after")
    def _exams_are_eval(self) -> Lesson:
        if self.exam_id is not None and self.split != "eval":
            raise ValueError("an exam lesson must be an eval lesson")
        return self

    @property
    def work_id(self) -> str:
        """What a node's journal knows this piece of work by: an exam repeats a lesson id."""
        return self.lesson_id if self.exam_id is None else f"{self.lesson_id}@{self.exam_id}"


class Timings(BaseModel):
    """Wall-clock milliseconds a pupil spent on each part of a lesson."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    generate_ms: float = Field(ge=0, default=0.0)
    embed_ms: float = Field(ge=0, default=0.0)
    train_ms: float = Field(ge=0, default=0.0)
    guide_ms: float = Field(ge=0, default=0.0)  # guided answers on eval lessons


class Report(Message):
    """What a pupil did with one lesson. ``error`` is set instead of figures when it failed."""

    kind: ClassVar[str] = "report"
    lesson_id: str = Field(min_length=1, max_length=64)
    node_id: NodeId
    split: Split
    pupil_model: str = Field(min_length=1, max_length=200)
    pupil_answer: str = Field(default="", max_length=MAX_ANSWER_CHARS)
    similarity_before: float | None = Field(default=None, ge=-1.0001, le=1.0001)
    similarity_adapted: float | None = Field(default=None, ge=-1.0001, le=1.0001)
    similarity_guided: float | None = Field(default=None, ge=-1.0001, le=1.0001)
    # Eval lessons only: every guided method the node measured, method -> similarity / answer.
    # ``similarity_guided`` is the entry of the method the node itself answers with.
    guided: dict[MethodName, Similarity] = Field(default_factory=dict, max_length=16)
    guided_answers: dict[MethodName, Annotated[str, Field(max_length=MAX_ANSWER_CHARS)]] = Field(
        default_factory=dict, max_length=16
    )
    losses: list[float] = Field(default_factory=list, max_length=10_000)
    timings: Timings = Field(default_factory=Timings)
    adapter_version: int = Field(ge=0, default=0)
    # The LoRA version the node served when it answered (0: its base model alone).
    lora_version: int = Field(ge=0, default=0)
    trained: bool = False
    # The exam this report answers (see Lesson.exam_id); None for the lesson's first delivery.
    exam_id: ExamId | None = None
    error: str | None = Field(default=None, max_length=2_000)

    @field_validator("losses")
    @classmethod
    def _finite_losses(cls, value: list[float]) -> list[float]:
        if not all(math.isfinite(v) for v in value):
            raise ValueError("losses contain NaN or infinity")
        return value

    @model_validator(mode="after")
    def _eval_is_never_trained(self) -> Report:
        if self.split == "eval" and self.trained:
            raise ValueError("an eval lesson must never be trained on")
        if self.exam_id is not None and self.split != "eval":
            raise ValueError("an exam report must be for an eval lesson")
        if set(self.guided_answers) - set(self.guided):
            raise ValueError("guided_answers names a method that has no similarity in guided")
        return self


class NodeInfo(BaseModel):
    """What a pupil says about itself in hello and heartbeat messages."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    node_id: NodeId
    software_version: str = Field(max_length=64)
    pupil_model: str = Field(max_length=200)
    embedding_model: str = Field(max_length=200)
    embedding_dim: int = Field(gt=0, le=MAX_EMBEDDING_DIM)
    hardware: str = Field(default="", max_length=500)
    adapter_version: int = Field(ge=0, default=0)
    lora_version: int = Field(ge=0, default=0)
    lessons_done: int = Field(ge=0, default=0)
    # Random per process start: two instances speaking for one node id at once are two machines
    # with the same id (a cloned SD card), which the master reports. None from older nodes.
    instance_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    # The job kinds this node consumes (its `pupil.jobs`), so an operator can see who does what.
    job_kinds: list[JobKindName] = Field(default_factory=list, max_length=64)
    # Defaulted, so the hello and heartbeat of a node that does not send it still validate.
    state: NodeState = "ok"
    # The lesson stream (docs/stream.md); all None from a node on per-node queues or an older
    # release. The highest stream offset the node has done, the stream's head when the node last
    # looked (lag = head - offset), and the offsets of the lessons that retention dropped before
    # the node got them: it can no longer learn those.
    stream_offset: int | None = Field(default=None, ge=0)
    stream_head: int | None = Field(default=None, ge=0)
    stream_lost_first: int | None = Field(default=None, ge=0)
    stream_lost_last: int | None = Field(default=None, ge=0)


class Hello(Message):
    """Sent by a pupil when it starts."""

    kind: ClassVar[str] = "hello"
    node: NodeInfo


class Heartbeat(Message):
    """Sent by a pupil periodically while it runs."""

    kind: ClassVar[str] = "heartbeat"
    node: NodeInfo


class Goodbye(Message):
    """Sent by a pupil when it stops cleanly."""

    kind: ClassVar[str] = "goodbye"
    node: NodeInfo


class Job(Message):
    """A piece of work for whoever does its kind: submitted to the master, or offloaded by it.

    ``reply_to`` and ``correlation_id`` travel as AMQP properties, not in the body: a submitter
    gets its :class:`JobResult` on its ``reply_to`` queue with ``correlation_id = job_id``.
    ``deadline`` is when a pupil's answer stops being useful: after it, the master answers.
    """

    kind: ClassVar[str] = "job"
    job_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    job_kind: JobKindName
    text: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    params: dict[ParamName, Annotated[str, Field(max_length=2_000)]] = Field(
        default_factory=dict, max_length=16
    )
    deadline: datetime

    _utc_deadline = field_validator("deadline")(lambda value: _in_utc(value, "deadline"))


class JobResult(Message):
    """The answer to a job, or why there is none (``error``).

    ``answered_by`` is a node id or ``"master"``; ``fallback`` says why the master answered a job
    it would have offloaded (``critical``, ``deadline``, ``pupil failed: ...``), and is empty
    when the job went where the policy sent it first.
    """

    kind: ClassVar[str] = "job_result"
    job_id: str = Field(min_length=1, max_length=64)
    job_kind: str = Field(min_length=1, max_length=64)
    answered_by: str = Field(min_length=1, max_length=64)
    model: str = Field(default="", max_length=200)
    output: str = Field(default="", max_length=MAX_ANSWER_CHARS)
    error: str | None = Field(default=None, max_length=2_000)
    fallback: str | None = Field(default=None, max_length=500)
    # Seconds from submission (or, from a pupil, from receipt) to this answer.
    elapsed_s: float = Field(ge=0, default=0.0)
    guidance: str = Field(default="", max_length=32)  # how a pupil answered (its guidance method)


class Teach(Message):
    """A prompt for a running master to answer and publish as a lesson (`distill-swarm teach`).

    The fields are a prompt set item's (master/prompts.py). ``reply_to`` and ``correlation_id``
    travel as AMQP properties, as a job's do; the master answers with a :class:`TeachResult`.
    The same prompt id and text answered by the same master model is the same lesson: teaching
    it again publishes nothing new.
    """

    kind: ClassVar[str] = "teach"
    prompt_id: str = Field(min_length=1, max_length=64)
    goal_text: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    task: str = Field(default="general", min_length=1, max_length=64)
    preferences: list[Annotated[str, Field(max_length=2_000)]] = Field(
        default_factory=list, max_length=32
    )
    instructions: list[Annotated[str, Field(max_length=2_000)]] = Field(
        default_factory=list, max_length=32
    )
    split: Split | None = None


# What became of a teach request: published now, published by an earlier request (nothing new
# sent), refused (the text of an eval prompt as a train lesson), or failed (the master's model).
TeachOutcome = Literal["published", "already_published", "refused", "failed"]


class TeachResult(Message):
    """The master's answer to a :class:`Teach`: which lesson, and whether it is new."""

    kind: ClassVar[str] = "teach_result"
    prompt_id: str = Field(min_length=1, max_length=64)
    outcome: TeachOutcome
    lesson_id: str | None = Field(default=None, max_length=64)
    split: Split | None = None
    detail: str = Field(default="", max_length=2_000)


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.kind: cls
    for cls in (Lesson, Report, Hello, Heartbeat, Goodbye, Job, JobResult, Teach, TeachResult)
}

M = TypeVar("M", bound=Message)


def encode(message: Message) -> bytes:
    """Serialise a message to UTF-8 JSON with its ``kind`` as the envelope tag.

    pydantic's own serializer writes the JSON: for a lesson's embedding it is several times
    faster than ``json.dumps`` of the dumped fields, which was the largest single cost of the
    master's publishing (bench/throughput.py). It writes NaN and infinity as ``null`` instead of
    refusing them, and no message can hold either: every float field is checked finite (or
    bounded, which NaN fails) when the message is built.
    """
    body = message.model_dump_json().encode()
    return b'{"kind":' + json.dumps(message.kind).encode() + b"," + body[1:]


@overload
def decode(body: bytes) -> Message: ...


@overload
def decode(body: bytes, expected: type[M]) -> M: ...


def decode(body: bytes, expected: type[Message] | None = None) -> Message:
    """Parse ``body``; raise :class:`DecodeError` with a one-line reason on any failure.

    With ``expected`` set, a message of another kind is rejected too, and the result is typed as
    ``expected``: callers need no ``isinstance`` check.
    """
    if len(body) > MAX_MESSAGE_BYTES:
        raise DecodeError(f"message is {len(body)} bytes, over the {MAX_MESSAGE_BYTES} limit")
    try:
        raw: Any = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise NotJson(f"not valid JSON: {exc}") from None
    except RecursionError:
        # A body of 100k nested brackets fits under the size cap and exhausts the parser's stack.
        raise NotJson("not valid JSON: nested too deeply") from None
    if not isinstance(raw, dict):
        raise NotJson(f"expected a JSON object, got {type(raw).__name__}")
    kind = raw.pop("kind", None)
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise DecodeError(f"unknown message kind {kind!r}")
    if expected is not None and cls is not expected:
        raise DecodeError(f"expected a {expected.kind} message, got {kind!r}")
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        raise DecodeError(_summarise(exc)) from None
    except RecursionError:
        raise DecodeError("invalid message: nested too deeply") from None


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed")


def _summarise(exc: ValidationError) -> str:
    """One line naming each failing field, e.g. ``reference.values: embedding contains NaN``."""
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "message"
        parts.append(f"{where}: {err['msg']}")
    more = f" (+{exc.error_count() - 5} more)" if exc.error_count() > 5 else ""
    return one_line("invalid message: " + "; ".join(parts) + more)
