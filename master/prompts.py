"""Prompt sets: the goals the master teaches from, read from JSONL or YAML.

Each item follows the seed's goal fields: ``goal_text`` is required; ``id``, ``task``,
``preferences``, ``instructions`` and ``split`` are optional; other seed fields (``goal_type``,
``focus_area``, ``strategy``, ``difficulty``) are kept as metadata.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import AbstractContextManager
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.errors import ConfigError


class PromptItem(BaseModel):
    """One goal of a prompt set."""

    model_config = ConfigDict(extra="allow", frozen=True)

    id: str = Field(default="", max_length=64)
    goal_text: str = Field(min_length=1, max_length=16_000)
    task: str = Field(default="general", min_length=1, max_length=64)
    preferences: list[str] = Field(default_factory=list)
    instructions: list[str] = Field(default_factory=list)
    split: Literal["train", "eval"] | None = None


def bundled_prompt_set(name: str) -> AbstractContextManager[Path]:
    """A prompt set shipped in the package (``"demo.jsonl"``, ``"benchmark.jsonl"``) as a path.

    Found with importlib.resources, so it is the installed package's file wherever that is; the
    path lasts as long as the context (a zipped install extracts it to a temporary file).
    """
    return resources.as_file(resources.files("master").joinpath("prompt_sets", name))


def load_prompts(path: Path) -> list[PromptItem]:
    """Read a ``.jsonl``, ``.yaml`` or ``.yml`` prompt set; ids default to a hash of the goal.

    Raises ConfigError naming the file, the item and the field at fault.
    """
    if not path.is_file():
        raise ConfigError(f"prompt set {path} does not exist")
    return validate_items(_read_items(path), str(path))


def prompts_from_jsonl(text: str, where: str) -> list[PromptItem]:
    """The prompts of JSONL ``text`` (one item a line, as a ``.jsonl`` prompt set holds).

    ``where`` names the source in errors (a file name, or ``stdin``). Raises ConfigError naming
    the line, item or field at fault.
    """
    raw_items: list[Any] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw_items.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: line {number} is not valid JSON: {exc.msg}") from None
    return validate_items(raw_items, where)


def validate_items(raw_items: list[Any], where: str) -> list[PromptItem]:
    """Prompt items from parsed JSON/YAML values; ids default to a hash of the goal.

    Raises ConfigError naming ``where``, the item and the field at fault.
    """
    path = where
    items: list[PromptItem] = []
    seen: set[str] = set()
    for number, raw in enumerate(raw_items, start=1):
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: item {number} is not a mapping")
        try:
            item = PromptItem.model_validate(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"])
            raise ConfigError(f"{path}: item {number}, field '{field}': {err['msg']}") from None
        if not item.id:
            item = item.model_copy(update={"id": _text_id(item.goal_text)})
        if item.id in seen:
            raise ConfigError(f"{path}: item {number} repeats id '{item.id}'")
        seen.add(item.id)
        items.append(item)
    if not items:
        raise ConfigError(f"{path} holds no prompts")
    return items


def _read_items(path: Path) -> list[Any]:
    text = path.read_text()
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        if path.suffix in {".yaml", ".yml"}:
            data = yaml.safe_load(text)
            if isinstance(data, dict):
                data = data.get("prompts", data.get("goals"))
            if not isinstance(data, list):
                raise ConfigError(f"{path}: expected a list of prompts (or a 'prompts:' list)")
            return data
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path} is not valid: {str(exc).splitlines()[0]}") from None
    raise ConfigError(f"prompt set {path}: use a .jsonl, .yaml or .yml file")


def _text_id(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def assign_split(item: PromptItem, eval_fraction: float, seed: int) -> Literal["train", "eval"]:
    """The item's fixed split if it has one, else a stable pseudo-random one from its id.

    Stable means a restarted master, or a different machine, puts every prompt on the same side.
    """
    if item.split is not None:
        return item.split
    digest = hashlib.sha256(f"{seed}:{item.id}".encode()).digest()
    fraction = int.from_bytes(digest[:8], "big") / 2**64
    return "eval" if fraction < eval_fraction else "train"
