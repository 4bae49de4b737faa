"""Making files and renames durable: fsync of files and of the directories that name them."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_directory(directory: Path) -> None:
    """Flush a directory's entries, so a rename or a new file in it survives a power cut.

    Some platforms cannot open a directory for fsync; there a rename is as durable as the OS
    makes it.
    """
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def fsync_tree(root: Path) -> None:
    """Flush every file under ``root``, then every directory, ``root`` included."""
    for path in sorted(root.rglob("*")):
        if path.is_file():
            descriptor = os.open(path, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
    for directory in [root, *sorted(p for p in root.rglob("*") if p.is_dir())]:
        fsync_directory(directory)
