"""``deploy/Dockerfile`` (the master's image) and ``.dockerignore``, read statically."""

from __future__ import annotations

import fnmatch
import json
import tomllib

from tests.support.deploy_files import ROOT

DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = ROOT / "pyproject.toml"
TORCH_PIN = "torch==2.13.0"


# -- the master image -------------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined, no comments."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        instructions.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continuation line"
    return instructions


def _final_stage() -> list[tuple[str, str]]:
    instructions = _instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def _global_args() -> dict[str, str]:
    """ARGs before the first FROM (usable in FROM lines), name -> default."""
    args = {}
    for word, rest in _instructions():
        if word == "FROM":
            break
        if word == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default.strip('"')
    return args


def test_master_image_installs_no_torch_and_the_pupil_extra_pins_it() -> None:
    runs = "\n".join(args for word, args in _instructions() if word == "RUN")
    assert "torch==" not in runs and "TORCH_SPEC" not in DOCKERFILE.read_text()
    # The build fails if any dependency brought torch in after all.
    assert "find_spec('torch')" in runs
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    assert not any(dep.startswith("torch") for dep in project["dependencies"])
    extras = project["optional-dependencies"]
    for extra in ("pupil", "embedded", "study"):
        torch_deps = [dep for dep in extras[extra] if dep.startswith("torch")]
        assert torch_deps == [TORCH_PIN], f"[{extra}] must pin {TORCH_PIN} exactly"


def test_build_inputs_for_an_air_gapped_build() -> None:
    stage = _instructions()
    copies = [args for word, args in stage if word == "COPY"]
    assert "deploy/build-inputs/ /build-inputs/" in copies
    run = next(args for word, args in stage if word == "RUN" and '".[master]"' in args)
    assert "PIP_CERT=/build-inputs/ca.crt" in run
    assert "PIP_NO_INDEX=1 PIP_FIND_LINKS=/build-inputs/wheels" in run
    readme = ROOT / "deploy" / "build-inputs" / "README.md"
    assert "ca.crt" in readme.read_text() and "wheels/" in readme.read_text()


def test_dockerfile_uses_pypi_only_and_the_master_extra() -> None:
    runs = [args for word, args in _instructions() if word in {"RUN", "ARG", "ENV"}]
    joined = "\n".join(runs)
    for forbidden in ("--index-url", "--extra-index-url", "--find-links", " -i ", "://"):
        assert forbidden not in joined, f"{forbidden!r}: the build may use PyPI only"
    assert any('pip install ".[master]"' in run for run in runs)
    assert "embedded" not in joined


def test_dockerfile_runs_as_a_non_root_user() -> None:
    stage = _final_stage()
    assert stage[0] == ("FROM", "${PYTHON_IMAGE}")
    assert _global_args() == {"PYTHON_IMAGE": "python:3.11-slim"}
    users = [args for word, args in stage if word == "USER"]
    assert users, "the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    bases = [args.split(" ")[0] for word, args in _instructions() if word == "FROM"]
    assert set(bases) == {"${PYTHON_IMAGE}"}


def test_dockerfile_entrypoint_workdir_and_data_volume() -> None:
    stage = _final_stage()

    def last(word: str) -> str:
        return [args for w, args in stage if w == word][-1]

    assert json.loads(last("ENTRYPOINT")) == ["distill-swarm"]
    assert json.loads(last("CMD")) == ["master", "run"]
    assert last("WORKDIR") == "/app"
    assert json.loads(last("VOLUME")) == ["/data"]
    env = " ".join(args for w, args in stage if w == "ENV")
    assert "DISTILL_SWARM__MASTER__STORE=/data/master.sqlite3" in env
    scripts = tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]
    assert "distill-swarm" in scripts


def test_dockerignore_keeps_secrets_and_clutter_out_but_the_package_in() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for required in (".git", ".venv", "runs", ".env", "**/__pycache__", ".mypy_cache"):
        assert required in patterns, f".dockerignore should exclude {required}"
    needed = ["pyproject.toml", "README.md", "shared", "master", "pupil_node", "distill_swarm"]
    for path in needed:
        hits = [p for p in patterns if not p.startswith("!") and fnmatch.fnmatch(path, p)]
        assert not hits, f".dockerignore drops {path}, which the image build needs"
