"""Property tests: whatever arrives on the wire, decoding ends in a message or a DecodeError.

Never another exception (which would look like a handler bug and cost a retry), never a message
that violates the contract (NaN, wrong dims, unknown schema), and never an unbounded payload.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.errors import DecodeError
from shared.messages import (
    MAX_MESSAGE_BYTES,
    MAX_PROMPT_CHARS,
    SCHEMA_VERSION,
    Embedding,
    Heartbeat,
    Lesson,
    Message,
    NodeInfo,
    Report,
    decode,
    encode,
)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def valid_lesson() -> dict[str, Any]:
    lesson = Lesson(
        lesson_id="l1", task="t", prompt="p", goal_text="g", master_model="m",
        master_answer="a", reference=Embedding.from_array("e", np.ones(4, dtype=np.float32)),
        split="train",
    )  # fmt: skip
    raw: dict[str, Any] = json.loads(encode(lesson))
    return raw


def valid_report() -> dict[str, Any]:
    report = Report(lesson_id="l1", node_id="n", split="eval", pupil_model="m")
    raw: dict[str, Any] = json.loads(encode(report))
    return raw


def valid_heartbeat() -> dict[str, Any]:
    node = NodeInfo(node_id="n", software_version="1", pupil_model="m", embedding_model="e",
                    embedding_dim=4)  # fmt: skip
    raw: dict[str, Any] = json.loads(encode(Heartbeat(node=node)))
    return raw


def check_contract(message: Message) -> None:
    """What a decoded message guarantees to every handler."""
    assert message.schema_version == SCHEMA_VERSION
    if isinstance(message, Lesson):
        values = message.reference.values
        assert len(values) == message.reference.dim
        assert all(math.isfinite(v) for v in values)
        assert len(message.prompt) <= MAX_PROMPT_CHARS


def decode_or_refuse(body: bytes) -> None:
    try:
        message = decode(body)
    except DecodeError as exc:
        assert str(exc) and "\n" not in str(exc)  # a one-line reason for the dead-letter header
        return
    check_contract(message)


@SETTINGS
@given(st.binary(max_size=4096))
def test_random_bytes(body: bytes) -> None:
    decode_or_refuse(body)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=50),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)


@SETTINGS
@given(
    base=st.sampled_from([valid_lesson, valid_report, valid_heartbeat]),
    field=st.sampled_from(
        ["schema_version", "message_id", "created_at", "lesson_id", "prompt", "reference",
         "split", "losses", "node", "similarity_before", "guided", "kind", "node_id"]
    ),
    value=json_values,
)  # fmt: skip
def test_any_field_replaced_by_any_json_value(base: Any, field: str, value: object) -> None:
    raw = base()
    raw[field] = value
    try:
        body = json.dumps(raw, allow_nan=True).encode()
    except (ValueError, TypeError):
        return
    decode_or_refuse(body)


@SETTINGS
@given(
    values=st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=16),
    dim=st.integers(min_value=-2, max_value=20),
)
def test_embeddings_with_any_values_and_dims(values: list[float], dim: int) -> None:
    raw = valid_lesson()
    raw["reference"] = {"model": "e", "dim": dim, "values": values}
    body = json.dumps(raw, allow_nan=True).encode()
    bad = dim != len(values) or dim <= 0 or not all(math.isfinite(v) for v in values)
    if bad:
        try:
            decode(body)
        except DecodeError:
            return
        raise AssertionError("an invalid embedding was accepted")
    decode_or_refuse(body)


@SETTINGS
@given(version=st.integers().filter(lambda v: v != SCHEMA_VERSION))
def test_unknown_schema_versions_are_refused(version: int) -> None:
    raw = valid_lesson()
    raw["schema_version"] = version
    try:
        decode(json.dumps(raw).encode())
    except DecodeError as exc:
        assert "schema_version" in str(exc)
        return
    raise AssertionError("an unknown schema version was accepted")


@settings(max_examples=20, deadline=None)
@given(extra=st.integers(min_value=1, max_value=50_000))
def test_oversized_prompts_and_payloads_are_refused(extra: int) -> None:
    raw = valid_lesson()
    raw["prompt"] = "x" * (MAX_PROMPT_CHARS + extra)
    try:
        decode(json.dumps(raw).encode())
    except DecodeError as exc:
        assert "prompt" in str(exc)
    else:
        raise AssertionError("an oversized prompt was accepted")
    raw = valid_lesson()
    raw["master_answer"] = "y" * (MAX_MESSAGE_BYTES + extra)
    try:
        decode(json.dumps(raw).encode())
    except DecodeError as exc:
        assert "limit" in str(exc)
    else:
        raise AssertionError("an oversized payload was accepted")
