"""The job kinds the master can offload, and how a job becomes a goal.

Each kind has a packaged template (``shared/backends/prompts/jobs/<kind>.j2``) that turns a job's
payload (``text`` plus a few named ``params``) into a *goal* phrased exactly like the lessons of
the same task in the prompt sets ("Summarise in one sentence: ..."). That is the point: the
pupil answers a job's goal the way it answers a lesson's, with its alignment (retrieval of the
master's answers to the nearest lessons, best-of-K), and the master answers it with its own
template, exactly as it answers lessons. A job is done "the way the master would" only as far as
the pupil learned that kind of goal from lessons.

The critical flags follow the seed's table: complex reasoning and legal/medical decisions are
never offloaded; the master's config may mark more kinds critical (``master.jobs``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from importlib import resources

import jinja2

from shared.errors import DecodeError, ReasonCode


class InvalidJob(DecodeError):
    """A job's kind or payload cannot be done (unknown kind, missing parameter...).

    A DecodeError: a consumer dead-letters such a job with the reason, and the submitter is told.
    """

    code = ReasonCode.INVALID_JOB


class Fallback(StrEnum):
    """Why the master answered a job itself: a stable code beside the fallback's text.

    The values are the `reason` label of ``distill_swarm_job_fallbacks_total``, which the
    dashboard and alert rules (deploy/) know: never rename one.
    """

    CRITICAL = "critical"  # a critical kind: never offloaded
    DEADLINE = "deadline"  # no pupil answered in time (or the deadline had passed on arrival)
    PUPIL_FAILED = "pupil_failed"  # the pupil that took it reported an error
    UNROUTABLE = "unroutable"  # no job queue for its kind (no pupil does it)


@dataclass(frozen=True)
class JobKind:
    """One kind of job: its name, whether it is critical, and the parameters it needs."""

    name: str
    description: str
    critical: bool
    required: tuple[str, ...] = ()
    defaults: Mapping[str, str] = field(default_factory=dict)
    # Answer length cap for this kind (tokens); short kinds stay short on a Pi.
    max_tokens: int = 96


KINDS: dict[str, JobKind] = {
    k.name: k
    for k in (
        JobKind("answer_scoring", "rate an answer to a question from 1 to 10", False,
                required=("question",), max_tokens=48),
        JobKind("summarisation", "summarise a text in one sentence", False),
        JobKind("translation", "translate a short text", False, required=("language",)),
        JobKind("query_routing", "pick the team (route) that should handle a query", False,
                required=("routes",), max_tokens=32),
        JobKind("keyword_tagging", "give keyword tags for a title or text (monitoring)", False,
                defaults={"count": "3"}, max_tokens=32),
        JobKind("hypothesis_summarisation", "summarise a hypothesis in one sentence", False),
        JobKind("complex_reasoning", "a decision that needs complex reasoning", True,
                max_tokens=256),
        JobKind("legal_medical", "a legal or medical decision", True, max_tokens=256),
    )
}  # fmt: skip

OFFLOADABLE = tuple(name for name, kind in KINDS.items() if not kind.critical)
CRITICAL = tuple(name for name, kind in KINDS.items() if kind.critical)

_ENV = jinja2.Environment(
    undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True, autoescape=False
)


def job_kind(name: str) -> JobKind:
    """The kind called ``name``; raises :class:`InvalidJob` naming the known kinds."""
    kind = KINDS.get(name)
    if kind is None:
        raise InvalidJob(f"unknown job kind '{name}'; known kinds: {', '.join(KINDS)}")
    return kind


def render_goal(kind_name: str, text: str, params: Mapping[str, str]) -> str:
    """The goal text of one job, from its kind's template.

    Raises:
        InvalidJob: unknown kind, a required parameter missing or empty, an unknown parameter,
            or an empty ``text``.
    """
    kind = job_kind(kind_name)
    if not text.strip():
        raise InvalidJob(f"{kind.name} job has an empty text")
    missing = [p for p in kind.required if not params.get(p, "").strip()]
    if missing:
        raise InvalidJob(f"{kind.name} job needs the parameter(s): {', '.join(missing)}")
    known = set(kind.required) | set(kind.defaults)
    unknown = sorted(set(params) - known)
    if unknown:
        allowed = ", ".join(sorted(known)) or "none"
        raise InvalidJob(
            f"{kind.name} job does not take the parameter(s) {', '.join(unknown)}; "
            f"it takes: {allowed}"
        )
    context: dict[str, object] = {**kind.defaults, **params, "text": text.strip()}
    if "routes" in context:
        routes = [r.strip() for r in str(context["routes"]).split(",") if r.strip()]
        if not routes:
            raise InvalidJob("query_routing job needs at least one route in 'routes'")
        context["routes"] = routes
    return _template(kind.name).render(context).strip()


@functools.cache
def _template(name: str) -> jinja2.Template:
    source = resources.files("shared.backends").joinpath("prompts", "jobs", f"{name}.j2")
    return _ENV.from_string(source.read_text(encoding="utf-8"))
