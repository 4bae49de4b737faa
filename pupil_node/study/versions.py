"""The node's LoRA adapter versions on disk: which one is served, promotion, rollback, pruning.

Layout under ``<state_dir>/lora/``::

    v0001/ v0002/ ...     one directory per promoted version: peft/, adapter.gguf, round.json
    round-<n>.partial/    a round in progress (deleted when it is rejected or fails)
    served.json           {"version": 2, "gguf_sha256": "...", "promoted_at": "..."}

``served.json`` is replaced atomically (write, fsync, rename, fsync the directory), so a crash
leaves either the old or the new version served, never a half-written pointer. Loading checks the
GGUF's sha256 against it: a damaged file falls back to the newest older version that verifies,
as the embedding adapter's checkpoints do, and says so in the log. Nothing is unpickled: peft
weights are safetensors and the rest is JSON.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pupil_node.study.base import file_sha256
from shared.durable import fsync_directory, fsync_tree

log = logging.getLogger(__name__)

SERVED_FILE = "served.json"
ROUND_FILE = "round.json"
GGUF_FILE = "adapter.gguf"
PEFT_DIR = "peft"
_VERSION_DIR = re.compile(r"^v(\d{4,})$")


@dataclass(frozen=True)
class AdapterVersion:
    """One promoted adapter version: where its files are and what it measured."""

    version: int
    directory: Path
    gguf_sha256: str
    val_loss: float | None

    @property
    def gguf_path(self) -> Path:
        """The llama.cpp LoRA GGUF that the runtime serves."""
        return self.directory / GGUF_FILE

    @property
    def peft_dir(self) -> Path:
        """The peft adapter the next round resumes from."""
        return self.directory / PEFT_DIR


def version_dir_problem(source: Path) -> str | None:
    """Why ``source`` is not a version directory (round.json, adapter.gguf, peft/), or None."""
    for needed in (ROUND_FILE, GGUF_FILE, PEFT_DIR):
        if not (Path(source) / needed).exists():
            return f"'{source}' is not an adapter version directory (no {needed})"
    return None


class AdapterStore:
    """Promoted LoRA versions of one node, under ``root`` (``<state_dir>/lora``)."""

    def __init__(self, root: Path, keep_versions: int = 3) -> None:
        self.root = root
        self.keep_versions = keep_versions
        root.mkdir(parents=True, exist_ok=True)

    def candidate_dir(self, round_number: int) -> Path:
        """A fresh directory for a round in progress (an older leftover is removed)."""
        path = self.root / f"round-{round_number}.partial"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def discard(self, candidate: Path) -> None:
        """Delete a rejected or failed round's files."""
        shutil.rmtree(candidate, ignore_errors=True)

    def versions(self) -> list[int]:
        """Every promoted version still on disk, oldest first."""
        found = (_VERSION_DIR.match(p.name) for p in self.root.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m)

    def _dir(self, version: int) -> Path:
        return self.root / f"v{version:04d}"

    def served(self) -> AdapterVersion | None:
        """The served version, verified; falls back to an older one that verifies; None if none.

        A fallback is written back as the served version, so the next start does not redo it.
        """
        pointer = self.root / SERVED_FILE
        if not pointer.exists():
            return None
        try:
            wanted = int(json.loads(pointer.read_text())["version"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning(
                "LoRA: %s is unreadable (%s); looking for a version that verifies", pointer, exc
            )
            wanted = max(self.versions(), default=0)
        for version in sorted((v for v in self.versions() if v <= wanted), reverse=True):
            candidate = self._load(version)
            if candidate is not None:
                if version != wanted:
                    log.warning(
                        "LoRA: version %d does not verify; falling back to version %d",
                        wanted,
                        version,
                    )
                    self._point_to(candidate)
                return candidate
        log.warning("LoRA: no adapter version verifies; serving the base model")
        return None

    def _load(self, version: int) -> AdapterVersion | None:
        directory = self._dir(version)
        try:
            meta = json.loads((directory / ROUND_FILE).read_text())
            expected = str(meta["gguf_sha256"])
            actual = file_sha256(directory / GGUF_FILE)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("LoRA: version %d is incomplete: %s", version, exc)
            return None
        if actual != expected:
            log.warning("LoRA: version %d's adapter.gguf fails its checksum", version)
            return None
        val_loss = meta.get("val_loss_after")
        return AdapterVersion(
            version, directory, expected, None if val_loss is None else float(val_loss)
        )

    def promote(self, candidate: Path, version: int) -> AdapterVersion:
        """Make a finished round's files version ``version`` and serve it; prune old versions.

        Raises ValueError if the round's files do not verify (nothing changes then).
        """
        target = self._dir(version)
        shutil.rmtree(target, ignore_errors=True)  # a leftover of a crash mid-promotion
        fsync_tree(candidate)
        os.replace(candidate, target)
        fsync_directory(self.root)
        promoted = self._load(version)
        if promoted is None:
            raise ValueError(f"round files for LoRA version {version} do not verify")
        self._point_to(promoted)
        self._prune(version)
        return promoted

    def import_version(self, source: Path) -> AdapterVersion:
        """Copy a version directory made elsewhere (a swarm adapter) in as the next version.

        It is served from the node's next start, and the next round resumes from it; the
        versions before it stay for rollback. Raises ValueError if its files do not verify.
        """
        problem = version_dir_problem(source)
        if problem is not None:
            raise ValueError(problem)
        version = max(self.versions(), default=0) + 1
        candidate = self.candidate_dir(version)
        shutil.copytree(source, candidate, dirs_exist_ok=True)
        meta = json.loads((candidate / ROUND_FILE).read_text())
        meta["version"] = version  # the version this node knows it by
        (candidate / ROUND_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        try:
            return self.promote(candidate, version)
        except ValueError:
            self.discard(candidate)
            raise

    def rollback(self) -> AdapterVersion | None:
        """Serve the newest version older than the served one (None: back to the base model)."""
        current = self.served()
        if current is None:
            return None
        for version in sorted((v for v in self.versions() if v < current.version), reverse=True):
            older = self._load(version)
            if older is not None:
                self._point_to(older)
                return older
        (self.root / SERVED_FILE).unlink(missing_ok=True)
        fsync_directory(self.root)
        return None

    def _point_to(self, version: AdapterVersion) -> None:
        pointer = self.root / SERVED_FILE
        partial = pointer.with_name(f"{SERVED_FILE}.{os.getpid()}.partial")
        body = {
            "version": version.version,
            "gguf_sha256": version.gguf_sha256,
            "promoted_at": datetime.now(UTC).isoformat(),
        }
        with partial.open("w") as handle:
            handle.write(json.dumps(body) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, pointer)
        fsync_directory(self.root)

    def _prune(self, served: int) -> None:
        # Keep the served version and the newest others up to keep_versions, for rollback.
        keep = set(sorted(self.versions())[-self.keep_versions :]) | {served}
        for version in self.versions():
            if version not in keep:
                shutil.rmtree(self._dir(version), ignore_errors=True)
