"""Where the four packages come from: one installation, or a clear error at import.

The wheel installs four top-level packages, as the design card lays them out (docs/decisions.md
§1 and §29). ``shared`` and ``master`` are generic names: another distribution may install its
own, and a ``shared/`` folder in the current directory comes first on ``sys.path`` under
``python -m``. Python would import that one without a word and fail far from the cause. So
``shared``, ``master`` and ``pupil_node`` check on import, and the ``distill-swarm`` command
before anything else, that all four sit side by side in one directory. This module imports the
standard library only and lives in ``distill_swarm``, the one name that is this distribution's
own, so the check still runs when the shadowed package is ``shared``.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

PACKAGES = ("shared", "master", "pupil_node", "distill_swarm")
# The directory this installation put its packages in: a site-packages, or the checkout of an
# editable install. Located from this file on purpose: it is the one the check can trust.
HOME = Path(__file__).resolve().parent.parent


class ShadowedPackage(ImportError):
    """One of the four packages resolves to another installation's files."""


def foreign_packages() -> dict[str, Path]:
    """Each of :data:`PACKAGES` that resolves elsewhere than :data:`HOME`, and where it does."""
    foreign = {}
    for name in PACKAGES:
        spec = find_spec(name)  # a top-level name: found, not imported
        locations = spec.submodule_search_locations if spec is not None else None
        if not locations:
            continue  # missing: its own import fails with a plain ModuleNotFoundError
        where = Path(next(iter(locations))).resolve()
        if where.parent != HOME:
            foreign[name] = where
    return foreign


def check_installation() -> None:
    """Raise :class:`ShadowedPackage`, in one line, if a package is not this installation's."""
    for name, where in foreign_packages().items():
        raise ShadowedPackage(
            f"`{name}` resolves to {where}, not to distill-swarm's package in {HOME}: another "
            f"distribution or a folder on sys.path shadows it (a ./{name}/ folder counts under "
            f"`python -m`); uninstall that distribution or run from another directory"
        )
