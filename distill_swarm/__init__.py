"""The `distill-swarm` command line and the local demo."""

from __future__ import annotations

import sys

from distill_swarm.origin import ShadowedPackage, check_installation

# ExitCode.BAD_INPUT (shared/cli_support.py), which cannot be imported when `shared` is the
# package shadowed: fix the environment, restarting does not help.
SHADOWED_EXIT_CODE = 2


def main() -> None:
    """Console-script entry point: check where the packages come from, then run the command."""
    try:
        check_installation()
    except ShadowedPackage as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(SHADOWED_EXIT_CODE) from None
    from distill_swarm.cli import main as run_command

    run_command()
