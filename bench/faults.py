"""Benchmark: what each fault costs the swarm, as one table.

Runs every fault scenario of the test suite (the same drivers, ``tests/faults/scenarios.py``) on
private RabbitMQ nodes with real `distill-swarm` processes, then prints, per scenario: lessons
sent, reports received, reports lost, publishes duplicated on the wire, and the recovery time.

    .venv/bin/python bench/faults.py [--only KEY ...] [--workdir DIR]

Nothing here is timed by the tests; docs/faults.md holds a measured table and how to read it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The scenario drivers live with the tests they serve; a bench script run by path has only
# bench/ on sys.path, so put the repository root there too.
sys.path.insert(0, str(ROOT))

from harness import format_table  # noqa: E402

from tests.faults.result import FaultResult  # noqa: E402
from tests.faults.scenarios import SCENARIOS, private_brokers  # noqa: E402

COLUMNS = (
    "scenario",
    "lessons sent",
    "reports received",
    "lost",
    "duplicated",
    "trained twice",
    "recovery (s)",
)


def row(result: FaultResult) -> tuple[str, ...]:
    """One table row."""
    recovery = "-" if result.recovery_s is None else f"{result.recovery_s:.1f}"
    numbers = (result.lessons_sent, result.reports_received, result.lost, result.duplicated)
    # Counted only by the scenarios that read the pupil's adapter checkpoint for it.
    twice = "-" if result.trained_twice is None else str(result.trained_twice)
    return (result.scenario, *(str(n) for n in numbers), twice, recovery)


def main() -> int:
    """Run the chosen scenarios; print the table; exit 1 if any scenario failed to run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    keys = [s.key for s in SCENARIOS]
    parser.add_argument("--only", nargs="+", choices=keys, help="run only these scenarios")
    parser.add_argument("--workdir", type=Path, help="keep logs and stores here (default: temp)")
    args = parser.parse_args()
    chosen = [s for s in SCENARIOS if not args.only or s.key in args.only]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="distill-swarm-faults-"))
    rows: list[tuple[str, ...]] = []
    failed = False
    started = time.monotonic()
    with private_brokers({s.broker for s in chosen}) as brokers:
        for scenario in chosen:
            print(f"running {scenario.key} ...", file=sys.stderr, flush=True)
            try:
                rows.append(row(scenario.run(brokers[scenario.broker], workdir / scenario.key)))
            except Exception:
                failed = True
                traceback.print_exc()
                failed_row = (f"{scenario.key} (FAILED, see above)",)
                rows.append(failed_row + ("-",) * (len(COLUMNS) - 1))
    print(format_table(COLUMNS, rows))
    print(
        f"{len(chosen)} scenarios in {time.monotonic() - started:.0f}s; logs in {workdir}",
        file=sys.stderr,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
