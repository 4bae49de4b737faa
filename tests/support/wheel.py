"""A wheel of this checkout, for tests that install the project the way a user does."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("shared", "master", "pupil_node", "distill_swarm")


def build_wheel(work: Path) -> Path:
    """Build the wheel under ``work`` from a copy of the sources (setuptools writes build/ into
    its source tree, which must stay clean) and return its path."""
    src = work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    build = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation"]
    result = subprocess.run(
        [*build, str(src), "-w", str(work / "dist")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    (built,) = (work / "dist").glob("distill_swarm-*.whl")
    return built
