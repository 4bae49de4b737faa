"""Nothing the project loads can run code: no pickle anywhere in the shipped packages.

Checked on the code itself (tokens and syntax trees), so a docstring that says "no pickle" is
fine and any real use fails: importing pickle-family modules, ``torch.load`` without
``weights_only=True``, ``joblib.load``, ``allow_pickle=True``, ``read_pickle``.
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("shared", "master", "pupil_node", "distill_swarm")
# Modules whose loaders deserialise arbitrary objects (and so can run arbitrary code).
PICKLING_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve"}


def _names(source: str) -> list[tuple[int, str]]:
    """(line, name) of every identifier in the code, ignoring comments and strings."""
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return [(tok.start[0], tok.string) for tok in tokens if tok.type == tokenize.NAME]


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _call_problem(call: ast.Call) -> str | None:
    name = _dotted(call.func)
    keywords = {kw.arg: kw.value for kw in call.keywords}
    if name == "torch.load" and not _is_true(keywords.get("weights_only")):
        return "torch.load() without weights_only=True"
    if _is_true(keywords.get("allow_pickle")):
        return f"{name}(allow_pickle=True)"
    return None


def _imports_torch_load(node: ast.AST) -> bool:
    if not (isinstance(node, ast.ImportFrom) and node.module == "torch"):
        return False
    return any(alias.name == "load" for alias in node.names)


def problems_in(source: str) -> list[str]:
    """Every pickle-style deserialisation in ``source``, as 'line N: what'."""
    found = [
        f"line {line}: {name}"
        for line, name in _names(source)
        if name in PICKLING_MODULES or name in {"read_pickle", "to_pickle"}
    ]
    for node in ast.walk(ast.parse(source)):
        if _imports_torch_load(node):
            found.append(f"line {getattr(node, 'lineno', 0)}: from torch import load")
        if isinstance(node, ast.Call) and (problem := _call_problem(node)):
            found.append(f"line {node.lineno}: {problem}")
    return found


def test_the_checker_catches_every_kind_of_use() -> None:
    bad = """\
import pickle
from cloudpickle import loads
model = joblib.load(path)
state = torch.load(path)
other = torch.load(path, weights_only=False)
arr = np.load(path, allow_pickle=True)
frame = pd.read_pickle(path)
from torch import load
"""
    flagged = {int(problem.split()[1].rstrip(":")) for problem in problems_in(bad)}
    assert flagged == set(range(1, 9))
    good = '''
"""Saved without pickle; never torch.load a file."""
state = torch.load(path, weights_only=True)  # pickle-free since torch 2.6
arr = np.load(path, allow_pickle=False)
'''
    assert problems_in(good) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_no_package_deserialises_with_pickle(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    found = [
        f"{path.relative_to(ROOT)} {problem}"
        for path in files
        for problem in problems_in(path.read_text())
    ]
    assert found == []
