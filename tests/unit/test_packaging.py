"""The wheel's top-level names, its bundled data, and a clear error when a package is shadowed."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from distill_swarm import SHADOWED_EXIT_CODE
from distill_swarm.origin import HOME, PACKAGES, foreign_packages
from shared.cli_support import ExitCode

SOURCES = ("pyproject.toml", "README.md", *PACKAGES)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[zipfile.ZipFile]:
    """The project's wheel, built offline from a copy of the sources (the checkout stays clean)."""
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        if (HOME / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
            shutil.copytree(HOME / name, source / name, ignore=ignore)
        else:
            shutil.copy2(HOME / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(out), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )  # fmt: skip
    (path,) = out.glob("distill_swarm-*.whl")
    with zipfile.ZipFile(path) as opened:
        yield opened


def test_the_wheel_installs_exactly_the_four_packages(wheel: zipfile.ZipFile) -> None:
    names = {name.split("/")[0] for name in wheel.namelist()}
    top_level = {name for name in names if not name.endswith(".dist-info")}
    assert top_level == set(PACKAGES)  # no tests/, bench/ or stray module beside them


def test_the_wheel_bundles_the_data_read_through_importlib_resources(
    wheel: zipfile.ZipFile,
) -> None:
    files = set(wheel.namelist())
    assert {"master/prompt_sets/demo.jsonl", "master/prompt_sets/benchmark.jsonl"} <= files
    for template in ("master.j2", "pupil.j2", "judge.j2", "jobs/summarisation.j2"):
        assert f"shared/backends/prompts/{template}" in files


def test_the_command_checks_the_installation_first(wheel: zipfile.ZipFile) -> None:
    (entry_points,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    assert "distill-swarm = distill_swarm:main" in wheel.read(entry_points).decode()


def test_this_installation_is_one_piece() -> None:
    assert foreign_packages() == {}


@pytest.fixture
def foreign_shared(tmp_path: Path) -> Path:
    """A directory holding an unrelated ``shared`` package, as another project's checkout may."""
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "__init__.py").write_text('"""Somebody else\'s shared code."""\n')
    return tmp_path


def test_the_command_names_a_shadowed_package_in_one_line(foreign_shared: Path) -> None:
    # `python -m` puts the current directory first on sys.path, so ./shared wins the import.
    result = subprocess.run(
        [sys.executable, "-m", "distill_swarm", "status"],
        cwd=foreign_shared,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == SHADOWED_EXIT_CODE == ExitCode.BAD_INPUT
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: `shared` resolves to ")
    assert str((foreign_shared / "shared").resolve()) in line


def test_importing_a_role_under_a_shadowed_shared_fails_at_once(foreign_shared: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import master.store"],
        cwd=foreign_shared,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    assert "ShadowedPackage: `shared` resolves to" in result.stderr.splitlines()[-1]
