"""The master's side runs without torch (issue 15): its image installs none.

Each check runs in a fresh interpreter where ``import torch`` fails, as in the master image: every
module of ``master`` imports, every command the master's operators use answers ``--help``, and
torch and the other pupil-only libraries are never imported. ``distill-swarm pupil run``
there says what to install instead of a traceback.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from shared.cli_support import ExitCode

# Set before anything else imports: ``import torch`` then raises ImportError, as with no torch.
NO_TORCH = "import sys; sys.modules['torch'] = None; "
PUPIL_ONLY = "{'torch', 'transformers', 'peft', 'sentence_transformers', 'llama_cpp'}"
MASTER_COMMANDS = [
    ["master", "run"],
    ["status"],
    ["eval"],
    ["exam"],
    ["submit"],
    ["jobs"],
    ["node", "add"],
    ["node", "remove"],
    ["pupil", "run"],  # only its help: typer builds it without importing the pupil's code
]


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", NO_TORCH + code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_every_master_module_imports_without_torch() -> None:
    result = _run(
        "import importlib, pkgutil, master; "
        "modules = pkgutil.walk_packages(master.__path__, 'master.'); "
        "[importlib.import_module(m.name) for m in modules]; "
        f"bad = {PUPIL_ONLY} & {{k for k, v in sys.modules.items() if v is not None}}; "
        "sys.exit(f'imported {sorted(bad)}' if bad else 0)"
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("command", MASTER_COMMANDS, ids=" ".join)
def test_master_commands_answer_help_without_torch(command: list[str]) -> None:
    result = _run(
        f"sys.argv = ['distill-swarm', *{command!r}, '--help']; "
        "from distill_swarm import main\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    code = exc.code\n"
        f"bad = {PUPIL_ONLY} & {{k for k, v in sys.modules.items() if v is not None}}\n"
        "sys.exit(f'exit {code}, imported {sorted(bad)}' if code or bad else 0)"
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def test_pupil_run_without_torch_says_what_to_install() -> None:
    result = _run(
        "sys.argv = ['distill-swarm', 'pupil', 'run', '--node-id', 'n1']; "
        "from distill_swarm import main; main()"
    )
    assert result.returncode == ExitCode.BAD_INPUT, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: torch is not installed: a pupil needs it; pip install 'distill-swarm[pupil]'"
    )
