"""The child process of a study round: ``python -m pupil_node.study.worker REQUEST.json``.

A round runs in its own process, started by :mod:`pupil_node.study.scheduler`:
- its 1-3 GB of torch, transformers and model weights go back to the system when it exits,
  instead of staying in the long-running pupil (a Pi 4 has 4 GB for everything);
- it runs at a lower CPU priority (``nice``), so lessons and jobs keep their pace;
- a crash or an out-of-memory kill in training ends the round, not the node.

The request file names the lessons file (JSON lines of :class:`StudyLesson` fields, train
lessons only), the previous adapter, the output directory and the settings. The round writes
``round.json`` in the output directory; exit code 0 means it is there.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pupil_node.study.data import StudyLesson
from pupil_node.study.round import StudySettings, run_study_round
from pupil_node.study.train import TrainSettings


@dataclass(frozen=True)
class RoundRequest:
    """Everything the child needs, written by the parent as JSON."""

    lessons_file: str
    out_dir: str
    previous_adapter_dir: str | None
    settings: dict[str, Any]
    nice: int = 0

    def write(self, path: Path) -> None:
        """Write the request as JSON."""
        path.write_text(json.dumps(asdict(self)) + "\n")

    @classmethod
    def read(cls, path: Path) -> RoundRequest:
        """Read a request written by :meth:`write`."""
        return cls(**json.loads(path.read_text()))


def settings_to_json(settings: StudySettings) -> dict[str, Any]:
    """StudySettings as plain JSON values (paths as strings)."""
    data = asdict(settings)
    data["train"]["target_modules"] = list(settings.train.target_modules)
    for key in ("base_gguf", "cache_dir"):
        data[key] = None if data[key] is None else str(data[key])
    return data


def settings_from_json(data: dict[str, Any]) -> StudySettings:
    """The inverse of :func:`settings_to_json`."""
    fields = dict(data)
    train = dict(fields.pop("train"))
    train["target_modules"] = tuple(train["target_modules"])
    for key in ("base_gguf", "cache_dir"):
        fields[key] = None if fields[key] is None else Path(fields[key])
    return StudySettings(train=TrainSettings(**train), **fields)


def write_lessons(path: Path, lessons: list[StudyLesson]) -> None:
    """Write lessons as JSON lines for the child."""
    with path.open("w") as handle:
        for lesson in lessons:
            handle.write(json.dumps(asdict(lesson)) + "\n")


def read_lessons(path: Path) -> list[StudyLesson]:
    """Read lessons written by :func:`write_lessons`."""
    lessons = []
    for line in path.read_text().splitlines():
        if line.strip():
            raw = json.loads(line)
            raw["preferences"] = tuple(raw.get("preferences", ()))
            raw["instructions"] = tuple(raw.get("instructions", ()))
            lessons.append(StudyLesson(**raw))
    return lessons


def main(argv: list[str]) -> int:
    """Run the round the request file describes; one ``error:`` line and exit 1 on failure."""
    if len(argv) != 1:
        print("error: usage: python -m pupil_node.study.worker REQUEST.json", file=sys.stderr)
        return 2
    request = RoundRequest.read(Path(argv[0]))
    if request.nice:
        os.nice(request.nice)
    previous = None if request.previous_adapter_dir is None else Path(request.previous_adapter_dir)
    try:
        result = run_study_round(
            read_lessons(Path(request.lessons_file)),
            previous,
            Path(request.out_dir),
            settings_from_json(request.settings),
        )
    except Exception as exc:  # the parent reads this line; the traceback helps nobody on a Pi
        print(f"error: study round failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(
        f"round done: version {result.version}, validation loss {result.val_loss_before:.4f} -> "
        f"{result.val_loss_after:.4f}, {result.steps} steps in {result.train_seconds:.0f}s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
