"""`distill-swarm eval --judge`: the master model rates pupil answers against its own, 1 to 10.

This is the seed's third-party judging, kept honest: the judge decodes greedily with a small token
budget; an output with no score in it is stored as unparseable (score NULL) and counted, never
dropped or replaced by a default; and every verdict is cached in the store's ``judgements`` table
under the judge's model name, so a rerun asks only about answers it has not judged yet.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources

import jinja2
from tqdm import tqdm

from master.evaluation import PLAIN, guided_label
from master.store import Store
from shared.backends import GenerationParams, TextGenerator
from shared.messages import Report

log = logging.getLogger(__name__)

TEMPLATE = "judge.j2"
DEFAULT_LIMIT_PER_NODE = 30
# "Score: 10" is a handful of tokens; a little slack lets a chatty model get there.
MAX_TOKENS = 12
# Answers are cut to this many characters in the prompt, so two long answers cannot overflow a
# small judge's context window (the embedded model has 2048 tokens).
MAX_ANSWER_CHARS = 2_000
EMPTY_ANSWER = "(no answer)"
MIN_SCORE, MAX_SCORE = 1, 10

# Mentions of the scale itself ("1-10", "out of 10", "/10") would otherwise read as scores.
_SCALE = re.compile(r"\b1\s*(?:-|\u2013|to)\s*10\b|(?:/|\bout of)\s*10\b", re.IGNORECASE)
_AFTER_SCORE = re.compile(
    r"score[^0-9a-z\n]{0,12}(?:(?:is|of|would be|=)[^0-9a-z\n]{0,6})?(\d+(?:\.\d+)?)",
    re.IGNORECASE,
)
_NUMBER = re.compile(r"(?<![\d.])\d+(?:\.\d+)?(?![\d])")


@dataclass(frozen=True)
class JudgeTask:
    """One answer to judge: a method's answer to one eval lesson at one node."""

    lesson_id: str
    node_id: str
    method: str
    question: str
    master_answer: str
    pupil_answer: str

    @property
    def key(self) -> tuple[str, str, str]:
        """(lesson_id, node_id, method): what the cache and the figures are keyed by."""
        return self.lesson_id, self.node_id, self.method


def _as_score(number: str) -> int | None:
    if "." in number:
        return None  # "7.5" is not one of the integers the judge was asked for
    value = int(number)
    return value if MIN_SCORE <= value <= MAX_SCORE else None


def parse_score(text: str) -> int | None:
    """The judge's score in ``text``, or None if there is none.

    The first number after the word "score" decides; if it is not an integer from 1 to 10 the
    output is unparseable. Without a number after "score", the first integer from 1 to 10
    anywhere counts. Mentions of the scale ("1-10", "out of 10", "/10") are ignored.
    """
    cleaned = _SCALE.sub(" ", text)
    match = _AFTER_SCORE.search(cleaned)
    if match is not None:
        return _as_score(match.group(1))
    for number in _NUMBER.finditer(cleaned):
        score = _as_score(number.group(0))
        if score is not None:
            return score
    return None


@functools.cache
def _template() -> jinja2.Template:
    source = resources.files("shared.backends").joinpath("prompts", TEMPLATE)
    env = jinja2.Environment(
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True, autoescape=False
    )
    return env.from_string(source.read_text(encoding="utf-8"))


def _cut(answer: str) -> str:
    answer = answer.strip() or EMPTY_ANSWER
    return answer if len(answer) <= MAX_ANSWER_CHARS else answer[:MAX_ANSWER_CHARS] + " [...]"


def render_judge_prompt(question: str, master_answer: str, pupil_answer: str) -> str:
    """The judge's prompt for one pupil answer."""
    return (
        _template()
        .render(
            question=question.strip(),
            master_answer=_cut(master_answer),
            pupil_answer=_cut(pupil_answer),
        )
        .strip()
    )


def _answers(report: Report) -> Iterator[tuple[str, str]]:
    yield PLAIN, report.pupil_answer
    for method, answer in sorted(report.guided_answers.items()):
        yield guided_label(method), answer


def judge_tasks(store: Store, limit_per_node: int = DEFAULT_LIMIT_PER_NODE) -> list[JudgeTask]:
    """Every answer to judge: plain and guided, for each node's first ``limit_per_node`` eval
    lessons (in the order their reports arrived, so a rerun picks the same ones)."""
    taken: dict[str, int] = {}
    tasks: list[JudgeTask] = []
    missing = 0
    for report in store.reports():
        if report.split != "eval" or report.error is not None:
            continue
        if taken.get(report.node_id, 0) >= limit_per_node:
            continue
        stored = store.get_lesson(report.lesson_id)
        if stored is None:
            missing += 1
            continue
        taken[report.node_id] = taken.get(report.node_id, 0) + 1
        lesson = stored[0]
        tasks.extend(
            JudgeTask(
                report.lesson_id,
                report.node_id,
                method,
                lesson.goal_text,
                lesson.master_answer,
                answer,
            )
            for method, answer in _answers(report)
        )
    if missing:
        log.warning("%d eval reports name a lesson this store does not hold: not judged", missing)
    return tasks


def run_judge(
    store: Store,
    generator: TextGenerator,
    limit_per_node: int = DEFAULT_LIMIT_PER_NODE,
    max_tokens: int = MAX_TOKENS,
    progress: bool = True,
) -> dict[tuple[str, str, str], int | None]:
    """Judge every answer :func:`judge_tasks` selects that the cache does not hold yet.

    Returns (lesson_id, node_id, method) -> score (None: unparseable) for every selected answer,
    cached or new. Each verdict is stored as soon as it is made, so an interrupted run resumes.

    Raises:
        BackendError: the judge model failed; verdicts made before the failure are kept.
    """
    judge_model = generator.model_name
    tasks = judge_tasks(store, limit_per_node)
    cached = store.judgements(judge_model)
    todo = [t for t in tasks if t.key not in cached]
    params = GenerationParams(temperature=0.0, max_tokens=max_tokens, seed=0)
    log.info(
        "judge %s: %d answers selected, %d cached", judge_model, len(tasks), len(tasks) - len(todo)
    )
    show = progress and bool(todo)
    bar = tqdm(todo, desc=f"judging with {judge_model}", unit="answer", disable=not show)
    for task in bar:
        prompt = render_judge_prompt(task.question, task.master_answer, task.pupil_answer)
        raw = generator.generate(prompt, params)
        score = parse_score(raw)
        store.add_judgement(task.lesson_id, task.node_id, task.method, judge_model, score, raw)
        cached[task.key] = score
    return {t.key: cached[t.key] for t in tasks}
