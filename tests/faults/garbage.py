"""Hypothesis strategies for bodies a pupil must refuse, one per way a lesson can be wrong.

Every strategy yields ``bytes`` that is not a lesson this pupil may learn from: random bytes,
wrong JSON types, NaN or infinity in the embedding, values past float32's range, JSON nested
deeper than the parser's stack, wrong dimensions, another embedding model, an
unknown schema version, and bodies over the size limits. They start from a valid lesson for the
pupil's space (:func:`tests.faults.lessons.synthetic_lesson`) and break exactly one thing, so a
refusal is for that reason and no other.

:func:`draw` turns a strategy into a fixed, reproducible batch (Hypothesis' generator, a fixed
seed): a process-level scenario sends one batch rather than running the property per example.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any, TypeVar

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from shared.backends.embedded import MINILM_DIM, MINILM_NAME
from shared.messages import MAX_MESSAGE_BYTES, MAX_PROMPT_CHARS, SCHEMA_VERSION, encode
from tests.faults.lessons import synthetic_lesson

T = TypeVar("T")


def _lesson_dict() -> dict[str, Any]:
    raw: dict[str, Any] = json.loads(encode(synthetic_lesson(0)))
    raw["lesson_id"] = "bad-lesson"
    return raw


def _body(change: Callable[[dict[str, Any]], None]) -> bytes:
    raw = _lesson_dict()
    change(raw)
    # allow_nan: NaN and Infinity must reach the wire as the JSON-ish tokens a sender could send.
    return json.dumps(raw, allow_nan=True).encode()


def _set(field: str, value: object) -> bytes:
    return _body(lambda raw: raw.__setitem__(field, value))


def _reference(
    model: str = MINILM_NAME, dim: int = MINILM_DIM, values: list[float] | None = None
) -> bytes:
    vector = [0.05] * MINILM_DIM if values is None else values
    return _set("reference", {"model": model, "dim": dim, "values": vector})


not_a_string = (
    st.integers()
    | st.floats(allow_nan=False)
    | st.booleans()
    | st.none()
    | st.lists(st.integers(), max_size=3)
)
random_bytes = st.binary(max_size=512)
wrong_types = st.one_of(
    st.builds(
        _set,
        st.sampled_from(["lesson_id", "prompt", "goal_text", "master_answer", "task"]),
        not_a_string,
    ),
    st.builds(_set, st.just("reference"), st.text(max_size=20) | st.integers() | st.none()),
    st.builds(
        _set,
        st.just("split"),
        st.integers() | st.none() | st.lists(st.text(max_size=5), max_size=2),
    ),
    # Valid JSON that is not an object, or an object of another message kind.
    st.builds(
        lambda v: json.dumps(v).encode(),
        st.lists(st.integers(), max_size=3) | st.integers() | st.text(max_size=20),
    ),
    st.builds(_set, st.just("kind"), st.sampled_from(["report", "heartbeat", "hello", "job"])),
)
nan_or_inf = st.builds(
    lambda index, bad: _reference(values=[bad if i == index else 0.05 for i in range(MINILM_DIM)]),
    st.integers(min_value=0, max_value=MINILM_DIM - 1),
    st.sampled_from([math.nan, math.inf, -math.inf]),
)
# A literal too big for a double parses to inf without any NaN token: caught by the validator.
huge_literal = st.builds(lambda: _reference().replace(b"0.05", b"1e999", 1))
# Finite as a double, infinite as the float32 the vector trains as.
float32_overflow = st.builds(
    lambda index, big: _reference(values=[big if i == index else 0.05 for i in range(MINILM_DIM)]),
    st.integers(min_value=0, max_value=MINILM_DIM - 1),
    st.sampled_from([1e39, -1e39, 3.5e38, 1e300]),
)
# Valid JSON nested deeper than the parser's stack, small enough to pass the size cap.
deeply_nested = st.builds(
    lambda depth, where: _body(lambda raw: raw.__setitem__(where, "@")).replace(
        b'"@"', b"[" * depth + b"]" * depth
    ),
    st.integers(min_value=10_000, max_value=200_000),
    st.sampled_from(["preferences", "reference", "goal_text"]),
)
wrong_dims = st.one_of(
    # dim and values disagree: invalid on its face
    st.builds(
        lambda dim: _reference(dim=dim),
        st.integers(min_value=-2, max_value=2 * MINILM_DIM).filter(lambda d: d != MINILM_DIM),
    ),
    # consistent, but not this pupil's dimension: refused as another embedding space
    st.builds(
        lambda dim: _reference(dim=dim, values=[0.05] * dim),
        st.integers(min_value=1, max_value=2 * MINILM_DIM).filter(lambda d: d != MINILM_DIM),
    ),
)
wrong_model = st.builds(
    lambda model: _reference(model=model),
    st.text(
        st.characters(codec="ascii", categories=["L", "N", "P"]), min_size=1, max_size=40
    ).filter(lambda m: m != MINILM_NAME),
)
unknown_schema = st.builds(
    lambda version: _set("schema_version", version),
    st.integers().filter(lambda v: v != SCHEMA_VERSION),
)
oversized = st.one_of(
    # Over the message limit: refused before parsing.
    st.builds(
        lambda extra: _set("master_answer", "x" * (MAX_MESSAGE_BYTES + extra)),
        st.integers(min_value=1, max_value=4096),
    ),
    # Under the message limit, over the prompt limit.
    st.builds(
        lambda extra: _set("prompt", "x" * (MAX_PROMPT_CHARS + extra)),
        st.integers(min_value=1, max_value=4096),
    ),
)

CATEGORIES: dict[str, st.SearchStrategy[bytes]] = {
    "random bytes": random_bytes,
    "wrong types": wrong_types,
    "NaN/inf": nan_or_inf | huge_literal,
    "float32 overflow": float32_overflow,
    "deeply nested": deeply_nested,
    "wrong dims": wrong_dims,
    "wrong embedding model": wrong_model,
    "unknown schema version": unknown_schema,
    "oversized": oversized,
}


def draw(strategy: st.SearchStrategy[T], count: int, seed: int = 0) -> list[T]:
    """``count`` examples of ``strategy``, the same ones for the same seed."""
    found: list[T] = []

    @hypothesis_seed(seed)
    @settings(
        max_examples=count,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(value: T) -> None:
        found.append(value)

    collect()
    return found[:count]


def bad_bodies(per_category: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """``per_category`` bad bodies of every category, as (category, body)."""
    return [
        (name, body)
        for index, (name, strategy) in enumerate(CATEGORIES.items())
        for body in draw(strategy, per_category, seed + index)
    ]
