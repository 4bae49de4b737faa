"""A real, small tmpfs for tests about a full disk, and ways to fill it.

A full disk is hard to fake faithfully (SQLite and the checkpoint writer each fail in their own way
when a write, an fsync or a WAL append hits ENOSPC), so these tests use a real one. Mounting needs
root (CAP_SYS_ADMIN); without it the test skips, or fails under CI=true.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.private_broker import skip_or_fail

# Filling writes in pages: tmpfs hands out space a page at a time.
PAGE_BYTES = 4096


class TmpfsUnavailable(RuntimeError):
    """This process may not mount a tmpfs (not root, or no mount(8))."""


@contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` (mount(8) syntax: ``"2m"``) at ``path`` until the block ends.

    Unmounted lazily, so a process still holding a file there (a killed pupil's last moments)
    cannot make the clean-up fail. Raises TmpfsUnavailable if it cannot be mounted.
    """
    path.mkdir(parents=True, exist_ok=True)
    mount = shutil.which("mount")
    if mount is None or os.geteuid() != 0:
        raise TmpfsUnavailable("mounting a tmpfs needs root and mount(8)")
    done = subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise TmpfsUnavailable(f"cannot mount a tmpfs at {path}: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


def require_tmpfs() -> None:
    """Skip the test (fail it under CI=true) unless this process can mount a tmpfs."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        skip_or_fail("mounting a tmpfs needs root and mount(8)")


def fill(directory: Path, leave_bytes: int = 0, name: str = "filler") -> Path:
    """Fill the file system holding ``directory`` with a file, leaving about ``leave_bytes`` free.

    The file is written until the disk is full, then cut back by ``leave_bytes`` (rounded up to
    whole pages), so what is left free does not depend on what else the disk holds. Delete the
    returned file to give the space back.
    """
    filler = directory / name
    page = b"\0" * PAGE_BYTES
    with open(filler, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(page)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    if leave_bytes:
        pages = -(-leave_bytes // PAGE_BYTES)
        size = filler.stat().st_size
        os.truncate(filler, max(0, size - pages * PAGE_BYTES))
    return filler
