"""Wire messages: what a node accepts and, above all, what it refuses and why."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shared.errors import DecodeError
from shared.messages import (
    MAX_MESSAGE_BYTES,
    Embedding,
    Heartbeat,
    Hello,
    Lesson,
    NodeInfo,
    Report,
    decode,
    encode,
)


def make_lesson(**overrides: object) -> Lesson:
    vector = np.linspace(-1, 1, 8, dtype=np.float32)
    fields: dict[str, object] = dict(
        lesson_id="l1",
        task="summarisation",
        prompt="Summarise: x",
        goal_text="x",
        master_model="ollama:qwen3",
        master_answer="y",
        reference=Embedding.from_array("all-minilm-l6-v2", vector),
        split="train",
    )
    fields.update(overrides)
    return Lesson.model_validate(fields)


def node_info() -> NodeInfo:
    return NodeInfo(
        node_id="pi-7",
        software_version="0.1.0",
        pupil_model="ollama:phi4-mini",
        embedding_model="all-minilm-l6-v2",
        embedding_dim=384,
    )


def as_raw(body: bytes) -> dict[str, object]:
    raw = json.loads(body)
    assert isinstance(raw, dict)
    return raw


@pytest.mark.parametrize(
    "message",
    [
        make_lesson(),
        Report(
            lesson_id="l1",
            node_id="pi-7",
            split="eval",
            pupil_model="m",
            similarity_before=0.5,
            similarity_adapted=0.6,
            losses=[],
        ),
        Report(
            lesson_id="l1",
            node_id="pi-7",
            split="train",
            pupil_model="m",
            trained=True,
            losses=[0.3, 0.2],
        ),
        Hello(node=node_info()),
        Heartbeat(node=node_info()),
    ],
)
def test_round_trip_preserves_every_field(message: object) -> None:
    body = encode(message)  # type: ignore[arg-type]
    assert decode(body) == message


def test_embedding_round_trip_is_float32_exact() -> None:
    vector = np.random.default_rng(0).standard_normal(384).astype(np.float32)
    lesson = make_lesson(reference=Embedding.from_array("m", vector))
    decoded = decode(encode(lesson), Lesson)
    assert isinstance(decoded, Lesson)
    np.testing.assert_array_equal(decoded.reference.to_array(), vector)
    assert decoded.reference.dim == 384


def test_timestamps_are_utc() -> None:
    decoded = decode(encode(make_lesson()))
    assert decoded.created_at.utcoffset() is not None
    assert decoded.created_at.utcoffset().total_seconds() == 0  # type: ignore[union-attr]


def _mutated(**changes: object) -> bytes:
    raw = as_raw(encode(make_lesson()))
    raw.update(changes)
    return json.dumps(raw).encode()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\xff\xfe not json", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"kind": "sermon"}', "unknown message kind"),
        (_mutated(schema_version=99), "unknown schema_version 99"),
        (_mutated(split="test"), "split"),
        (_mutated(prompt="x" * 20_000), "prompt"),
        (_mutated(unexpected="field"), "unexpected"),
    ],
)
def test_bad_bodies_are_refused_with_a_reason(body: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        decode(body)


def test_missing_field_is_named() -> None:
    raw = as_raw(encode(make_lesson()))
    del raw["master_answer"]
    with pytest.raises(DecodeError, match="master_answer"):
        decode(json.dumps(raw).encode())


def test_wrong_dimension_is_refused() -> None:
    raw = as_raw(encode(make_lesson()))
    raw["reference"]["dim"] = 9  # type: ignore[index]
    with pytest.raises(DecodeError, match="8 values but dim says 9"):
        decode(json.dumps(raw).encode())


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_embedding_is_refused(constant: str) -> None:
    body = encode(make_lesson()).replace(b'"values":[-1.0', f'"values":[{constant}'.encode())
    assert constant.encode() in body
    with pytest.raises(DecodeError):
        decode(body)


def test_non_finite_values_cannot_be_built_either() -> None:
    with pytest.raises(ValueError, match="NaN"):
        Embedding(model="m", dim=2, values=[float("nan"), 0.0])


def test_wrong_kind_for_the_queue_is_refused() -> None:
    with pytest.raises(DecodeError, match="expected a lesson"):
        decode(encode(Hello(node=node_info())), Lesson)


def test_oversized_body_is_refused_before_parsing() -> None:
    with pytest.raises(DecodeError, match="over the"):
        decode(b" " * (MAX_MESSAGE_BYTES + 1))


def test_an_eval_lesson_cannot_be_reported_as_trained() -> None:
    with pytest.raises(ValueError, match="never be trained"):
        Report(lesson_id="l", node_id="n", split="eval", pupil_model="m", trained=True)


def test_bad_node_id_is_refused() -> None:
    with pytest.raises(ValueError):
        NodeInfo(
            node_id="../etc",
            software_version="1",
            pupil_model="m",
            embedding_model="e",
            embedding_dim=3,
        )


def test_a_reason_quoting_hostile_input_stays_on_one_line() -> None:
    raw = as_raw(encode(Report(lesson_id="l", node_id="n", split="eval", pupil_model="m")))
    raw["guided"] = {"x\nERROR forged log line": 0.5}
    with pytest.raises(DecodeError) as info:
        decode(json.dumps(raw).encode())
    assert "\n" not in str(info.value) and "\\n" in str(info.value)


@pytest.mark.parametrize("big", [1e39, -1e39, 3.5e38, 1e300])
def test_values_past_float32_range_are_refused(big: float) -> None:
    # Finite as a double, so the JSON check passes; infinite once cast to the float32 it trains as.
    raw = as_raw(encode(make_lesson()))
    values = raw["reference"]["values"]  # type: ignore[index]
    values[3] = big
    with pytest.raises(DecodeError, match="float32"):
        decode(json.dumps(raw).encode(), Lesson)


def test_largest_float32_is_accepted() -> None:
    raw = as_raw(encode(make_lesson()))
    raw["reference"]["values"][0] = float(np.finfo(np.float32).max)  # type: ignore[index]
    lesson = decode(json.dumps(raw).encode(), Lesson)
    assert isinstance(lesson, Lesson)
    assert np.isfinite(lesson.reference.to_array()).all()


@pytest.mark.parametrize("depth", [10_000, 200_000])
def test_deeply_nested_json_is_a_decode_error(depth: int) -> None:
    # Under the size cap, but deeper than the parser's stack: must not escape as RecursionError.
    body = b'{"kind":"lesson","preferences":' + b"[" * depth + b"]" * depth + b"}"
    assert len(body) < MAX_MESSAGE_BYTES
    with pytest.raises(DecodeError, match="nested too deeply"):
        decode(body, Lesson)
