"""Prompt rendering from Jinja2 templates, as in the seed.

A template is named in one of three ways:
- a packaged template: ``"master"`` or ``"pupil"`` (``.j2`` optional), shipped in ``prompts/``;
- a filesystem path to a user template (anything containing a path separator or ending in
  ``.j2``/``.jinja``/``.txt``);
- the template text itself (anything containing ``{{`` or ``{%``).

Templates see ``goal.goal_text`` (the seed's spelling), ``goal_text``, ``preferences``,
``instructions`` and ``examples`` (``question``/``answer`` pairs). Undefined variables are
errors (``StrictUndefined``), so a typo in a user template fails loudly instead of silently
producing a prompt with a hole in it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import jinja2

from shared.errors import ConfigError

PACKAGED_TEMPLATES = ("master", "pupil")
_PROMPTS_DIR = "prompts"
_TEMPLATE_SUFFIX = ".j2"
_PATH_SUFFIXES = (".j2", ".jinja", ".jinja2", ".txt")
_VARIABLES = "goal.goal_text, goal_text, preferences, instructions, examples"

_ENV = jinja2.Environment(
    undefined=jinja2.StrictUndefined,
    # Block tags on their own line leave no blank lines behind, as the seed's output expects.
    trim_blocks=True,
    lstrip_blocks=True,
    autoescape=False,
)


def render_prompt(
    template_name_or_text: str,
    goal_text: str,
    preferences: Sequence[str] = (),
    instructions: Sequence[str] = (),
    examples: Sequence[tuple[str, str]] = (),
) -> str:
    """Render a prompt template for one goal.

    Args:
        template_name_or_text: a packaged template name (``"master"``, ``"pupil"``), a path to a
            template file, or the template text itself.
        goal_text: the question or task.
        preferences: optional style preferences, listed in the prompt when given.
        instructions: optional extra instructions, listed in the prompt when given.
        examples: optional (question, answer) pairs shown as worked examples (retrieval).

    Returns:
        The rendered prompt, stripped of leading and trailing whitespace.

    Raises:
        ConfigError: the template does not exist, does not parse, or uses an unknown variable.
    """
    label, template = _load(template_name_or_text)
    context = {
        "goal": {"goal_text": goal_text},
        "goal_text": goal_text,
        "preferences": list(preferences),
        "instructions": list(instructions),
        "examples": [{"question": q, "answer": a} for q, a in examples],
    }
    try:
        return template.render(context).strip()
    except jinja2.UndefinedError as e:
        raise ConfigError(
            f"prompt template {label} uses an undefined variable ({e.message}); "
            f"templates can use {_VARIABLES}"
        ) from None


def _load(spec: str) -> tuple[str, jinja2.Template]:
    """Return a label for error messages and the compiled template for ``spec``."""
    name = spec.removesuffix(_TEMPLATE_SUFFIX)
    if name in PACKAGED_TEMPLATES:
        return f"'{name}'", _packaged(name)
    if "{{" in spec or "{%" in spec:
        return "(inline text)", _compile(spec, "(inline text)")
    if os.sep in spec or "/" in spec or spec.endswith(_PATH_SUFFIXES):
        return f"'{spec}'", _from_file(Path(spec))
    raise ConfigError(
        f"no prompt template '{spec}'; use one of {', '.join(PACKAGED_TEMPLATES)} "
        "or a path to a .j2 file"
    )


@functools.cache
def _packaged(name: str) -> jinja2.Template:
    prompts = resources.files("shared.backends").joinpath(_PROMPTS_DIR)
    source = prompts.joinpath(name + _TEMPLATE_SUFFIX)
    return _compile(source.read_text(encoding="utf-8"), f"'{name}'")


def _from_file(path: Path) -> jinja2.Template:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read prompt template '{path}': {e.strerror}") from None
    return _compile(text, f"'{path}'")


def _compile(text: str, label: str) -> jinja2.Template:
    try:
        return _ENV.from_string(text)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(
            f"prompt template {label} has a syntax error on line {e.lineno}: {e.message}"
        ) from None
