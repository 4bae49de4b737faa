"""Saving and loading an :class:`~shared.adapter.AdapterTrainer`, atomically and without pickle.

Format: one safetensors file. Tensors:

- ``adapter.<parameter>``: the adapter's weights (``adapter.hidden.weight``, ...);
- ``optimizer.<parameter>.<slot>``: AdamW's per-parameter state (``step``, ``exp_avg``,
  ``exp_avg_sq``), absent before the first step;
- ``replay.inputs`` / ``replay.targets``: the replay buffer, oldest pair first;
- ``rng.state``: the sampling generator's state, so training resumes exactly where it stopped.

Metadata (all strings): ``format``, ``format_version``, ``in_dim``, ``out_dim``, ``hidden_dim``,
``version``, ``last_lesson_id`` (empty when none), ``lessons_trained``, ``loss_name``,
``embedding_model``, ``created_at`` (UTC, ISO 8601), the optimizer's hyper-parameters,
``replay_capacity``, ``replay_lesson_ids`` (a JSON list), ``pending_lesson_ids`` (a JSON list:
lessons trained in this file that the node had not journalled yet; absent in files written before
it, which count their ``last_lesson_id`` as pending) and ``checksum_sha256``: a SHA-256 over
every tensor (name, dtype, shape, bytes) and every other metadata entry, so a flipped bit anywhere
that still parses is caught.

safetensors files hold only raw tensor bytes and a JSON header, and nothing here calls
``torch.load`` or ``pickle``: loading a file cannot run code, whoever wrote it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from shared.adapter import AdapterTrainer
from shared.checkpoint_format import (
    CHECKSUM_KEY,
    FORMAT_NAME,
    FORMAT_VERSION,
    CorruptCheckpoint,
    checksum,
    read_verified,
)
from shared.durable import fsync_directory
from shared.errors import CheckpointError
from shared.replay import ReplayBuffer

log = logging.getLogger(__name__)

PREVIOUS_SUFFIX = ".prev"

_ADAPTER = "adapter."
_OPTIMIZER = "optimizer."
_REPLAY_INPUTS = "replay.inputs"
_REPLAY_TARGETS = "replay.targets"
_RNG_STATE = "rng.state"
# How safetensors quotes the OS error behind a failed write: "... (os error 28)".
_OS_ERROR = re.compile(r"\(os error (\d+)\)")


# Files this process wrote, by path: (inode, size, mtime in ns) right after the rename. The next
# save may then rotate the file to .prev without reading and re-hashing it (half of a save's
# cost, docs/performance.md): it is the file we verified as we wrote it, unless its inode, size or
# mtime moved. A file replaced or rewritten by anyone else is verified as before.
_WRITTEN: dict[Path, tuple[int, int, int]] = {}


def previous_path(path: str | os.PathLike[str]) -> Path:
    """Where :func:`save_checkpoint` keeps the last good checkpoint before ``path``."""
    path = Path(path)
    return path.with_name(path.name + PREVIOUS_SUFFIX)


def save_checkpoint(trainer: AdapterTrainer, path: str | os.PathLike[str]) -> Path:
    """Write ``trainer`` to ``path`` atomically, keeping the file it replaces as ``<path>.prev``.

    The new file is written to a temporary file in the same directory, fsynced, then renamed over
    ``path``, so a crash at any moment leaves a complete checkpoint at ``path`` or at its
    ``.prev`` (which :func:`load_latest` falls back to). The current file only becomes ``.prev``
    if it verifies, so a damaged file never pushes out a good one.

    Returns:
        The path written.
    """
    path = Path(path)
    inputs, targets, lesson_ids = trainer.replay.export()
    tensors = _tensors(trainer, inputs, targets)
    metadata = _metadata(trainer, lesson_ids)
    metadata[CHECKSUM_KEY] = _checksum(tensors, metadata)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        _save_file(tensors, temporary, metadata)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        if path.exists() and (_written_here(path) or _is_valid(path)):
            os.replace(path, previous_path(path))
        os.replace(temporary, path)
        _WRITTEN[path.resolve()] = _fingerprint(path)
    except OSError as error:
        _WRITTEN.pop(path.resolve(), None)
        raise CheckpointError(f"could not write checkpoint {path}: {error}") from error
    finally:
        temporary.unlink(missing_ok=True)
    fsync_directory(path.parent)
    return path


def _save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file``, raising OSError when the OS refused a write.

    safetensors reports an I/O failure as a SafetensorError whose message ends in "(os error
    28)"; turned back into the OSError it was, a full disk can be told from a bug by the caller
    (the pupil requeues a lesson whose checkpoint the disk refused, docs/decisions.md).
    """
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as error:
        found = _OS_ERROR.search(str(error))
        if found is None:
            raise CheckpointError(f"could not serialise checkpoint {path}: {error}") from None
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from error


def _fingerprint(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _written_here(path: Path) -> bool:
    """True if ``path`` is still exactly the file this process last wrote there."""
    try:
        return _WRITTEN.get(path.resolve()) == _fingerprint(path)
    except OSError:
        return False


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    in_dim: int | None = None,
    out_dim: int | None = None,
    embedding_model: str | None = None,
) -> AdapterTrainer:
    """Rebuild the trainer saved at ``path``: weights, optimizer state, replay buffer, counters.

    ``in_dim``, ``out_dim`` and ``embedding_model``, when given, are what the caller needs; a
    checkpoint made for anything else is refused rather than trained on.

    Raises:
        CheckpointError: the file is missing, unreadable, truncated, fails its checksum, was
            written by another format version, or does not fit the expected dims or model.
    """
    path = Path(path)
    tensors, metadata = _read_verified(path)
    expected = {"in_dim": in_dim, "out_dim": out_dim}
    try:
        actual = {name: int(metadata[name]) for name in ("in_dim", "out_dim", "hidden_dim")}
    except (KeyError, ValueError) as error:
        raise CorruptCheckpoint(f"checkpoint {path} has bad dimension metadata: {error}") from None
    wrong = [
        f"{name}={actual[name]} (expected {want})"
        for name, want in expected.items()
        if want is not None and want != actual[name]
    ]
    if wrong:
        raise CheckpointError(
            f"checkpoint {path} does not fit this adapter: it has {', '.join(wrong)}. "
            "Point the node at a checkpoint for this embedding model, or move this one away "
            "to start a fresh adapter."
        )
    saved_model = metadata.get("embedding_model", "")
    if embedding_model is not None and saved_model != embedding_model:
        raise CheckpointError(
            f"checkpoint {path} was trained on embeddings from {saved_model!r}, but this node "
            f"uses {embedding_model!r}; move it away to start a fresh adapter"
        )
    try:
        return _rebuild(tensors, metadata, actual)
    except (KeyError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"checkpoint {path} is inconsistent: {error}") from None


def load_latest(
    path: str | os.PathLike[str],
    *,
    in_dim: int | None = None,
    out_dim: int | None = None,
    embedding_model: str | None = None,
) -> AdapterTrainer | None:
    """Load ``path``, or its ``.prev`` if ``path`` is missing or corrupt; ``None`` if neither is.

    Falling back logs a warning. A checkpoint that is intact but made for other dims or another
    embedding model is not a reason to fall back: that raises :class:`CheckpointError` at once.
    """
    path = Path(path)
    previous = previous_path(path)
    if not path.exists() and not previous.exists():
        return None
    if path.exists():
        try:
            return load_checkpoint(
                path, in_dim=in_dim, out_dim=out_dim, embedding_model=embedding_model
            )
        except CorruptCheckpoint as error:
            if not previous.exists():
                raise
            log.warning("%s; falling back to the previous checkpoint %s", error, previous)
    else:
        # A crash between the two renames in save_checkpoint leaves only the .prev file.
        log.warning("no checkpoint at %s; falling back to the previous one %s", path, previous)
    return load_checkpoint(
        previous, in_dim=in_dim, out_dim=out_dim, embedding_model=embedding_model
    )


def _tensors(
    trainer: AdapterTrainer, replay_inputs: np.ndarray, replay_targets: np.ndarray
) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share memory or are not contiguous; clone to be sure.
    tensors = {
        _ADAPTER + name: value.detach().clone().contiguous()
        for name, value in trainer.adapter.state_dict().items()
    }
    names = [name for name, _ in trainer.adapter.named_parameters()]
    for index, slots in trainer.optimizer.state_dict()["state"].items():
        for slot, value in slots.items():
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"optimizer state {slot!r} is not a tensor; cannot save it")
            tensors[f"{_OPTIMIZER}{names[index]}.{slot}"] = value.detach().clone().contiguous()
    tensors[_REPLAY_INPUTS] = torch.from_numpy(replay_inputs)
    tensors[_REPLAY_TARGETS] = torch.from_numpy(replay_targets)
    tensors[_RNG_STATE] = trainer.generator.get_state().clone()
    return tensors


def _metadata(trainer: AdapterTrainer, replay_lesson_ids: list[str]) -> dict[str, str]:
    group = trainer.optimizer.param_groups[0]
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "in_dim": str(trainer.in_dim),
        "out_dim": str(trainer.out_dim),
        "hidden_dim": str(trainer.adapter.hidden_dim),
        "version": str(trainer.version),
        "last_lesson_id": trainer.last_lesson_id or "",
        "lessons_trained": str(trainer.lessons_trained),
        "loss_name": trainer.loss_name,
        "embedding_model": trainer.embedding_model,
        "created_at": datetime.now(UTC).isoformat(),
        "learning_rate": repr(float(group["lr"])),
        "weight_decay": repr(float(group["weight_decay"])),
        "replay_capacity": str(trainer.replay.capacity),
        "replay_lesson_ids": json.dumps(replay_lesson_ids),
        "pending_lesson_ids": json.dumps(trainer.pending_lesson_ids),
    }


def _checksum(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    return checksum({name: tensor.numpy() for name, tensor in tensors.items()}, metadata)


def _read_verified(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    arrays, metadata = read_verified(path)
    return {name: torch.from_numpy(array) for name, array in arrays.items()}, metadata


def _is_valid(path: Path) -> bool:
    try:
        _read_verified(path)
    except CheckpointError:
        return False
    return True


def _rebuild(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], dims: dict[str, int]
) -> AdapterTrainer:
    trainer = AdapterTrainer(
        dims["in_dim"],
        dims["out_dim"],
        dims["hidden_dim"],
        learning_rate=float(metadata["learning_rate"]),
        weight_decay=float(metadata["weight_decay"]),
        replay_capacity=int(metadata["replay_capacity"]),
        embedding_model=metadata["embedding_model"],
    )
    weights = {
        name[len(_ADAPTER) :]: value for name, value in tensors.items() if name.startswith(_ADAPTER)
    }
    trainer.adapter.load_state_dict(weights, strict=True)

    names = [name for name, _ in trainer.adapter.named_parameters()]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for index, name in enumerate(names):
        prefix = f"{_OPTIMIZER}{name}."
        slots = {
            key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)
        }
        if slots:
            state[index] = slots
    optimizer_state = trainer.optimizer.state_dict()
    trainer.optimizer.load_state_dict(
        {"state": state, "param_groups": optimizer_state["param_groups"]}
    )

    replay = ReplayBuffer.restore(
        tensors[_REPLAY_INPUTS].numpy(),
        tensors[_REPLAY_TARGETS].numpy(),
        json.loads(metadata["replay_lesson_ids"]),
        trainer.replay.capacity,
    )
    if (replay.in_dim, replay.out_dim) != (trainer.in_dim, trainer.out_dim):
        raise ValueError(f"replay pairs are {replay.in_dim}->{replay.out_dim} dims")
    trainer.replay = replay
    trainer.generator.set_state(tensors[_RNG_STATE])
    trainer.version = int(metadata["version"])
    trainer.lessons_trained = int(metadata["lessons_trained"])
    trainer.last_lesson_id = metadata["last_lesson_id"] or None
    # A file from before the pending list knew only its last lesson: that one may be unjournalled.
    default_pending = json.dumps([trainer.last_lesson_id] if trainer.last_lesson_id else [])
    pending = json.loads(metadata.get("pending_lesson_ids", default_pending))
    if not isinstance(pending, list) or not all(isinstance(i, str) for i in pending):
        raise ValueError("pending_lesson_ids is not a list of lesson ids")
    trainer.pending_lesson_ids = pending
    return trainer
