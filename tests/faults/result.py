"""What a fault scenario measured: the figures of the fault table, and evidence for the tests."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.faults.checkpoints import trained_twice
from tests.faults.wiretap import WireTap


@dataclass
class FaultResult:
    """One scenario's row of the fault table, plus what its test asserts on.

    - ``lessons_sent``: distinct lessons published (bad bodies are counted in ``evidence``);
    - ``reports_received``: distinct (lesson, node) reports published by the pupils;
    - ``lost``: expected (lesson, node) reports that never came;
    - ``duplicated``: publishes beyond the first of a lesson or of a (lesson, node) report, as
      seen on the wire (so a duplicate the master's store absorbs still counts here);
    - ``recovery_s``: seconds from the end of the fault to the first report the affected node
      published afterwards (None if there was none);
    - ``trained_twice``: trainings beyond one per train lesson, from the pupil's adapter
      checkpoint (None where a scenario does not count them).
    """

    scenario: str
    lessons_sent: int
    reports_received: int
    lost: int
    duplicated: int
    recovery_s: float | None
    evidence: dict[str, Any] = field(default_factory=dict)
    trained_twice: int | None = None


def tally(
    scenario: str,
    tap: WireTap,
    expected_lessons: int,
    nodes: set[str],
    recovery_s: float | None,
    only: set[str] | None = None,
    state_dirs: Iterable[Path] | None = None,
    **evidence: Any,
) -> FaultResult:
    """Count lessons and reports on the wire tap against what a fault-free run would publish.

    ``only``, when given, limits the count to those lesson ids (e.g. leaves out bad input that
    happens to decode as a lesson of another embedding space). ``state_dirs``, the pupils' state
    directories, gives ``trained_twice`` from their adapter checkpoints (read now, so call this
    while they are still there).
    """
    lessons = Counter(i for i in tap.lesson_ids() if only is None or i in only)
    reports = Counter(p for p in tap.report_pairs(nodes) if only is None or p[0] in only)
    duplicated = sum(n - 1 for n in lessons.values()) + sum(n - 1 for n in reports.values())
    return FaultResult(
        scenario=scenario,
        lessons_sent=len(lessons),
        reports_received=len(reports),
        lost=max(0, expected_lessons * len(nodes) - len(reports)),
        duplicated=duplicated,
        recovery_s=recovery_s,
        evidence={"lesson_publishes": lessons, "report_publishes": reports, **evidence},
        trained_twice=None if state_dirs is None else trained_twice(state_dirs),
    )
