"""The adapter checkpoint's format and integrity check, without torch.

Shared by :mod:`shared.checkpoint` (which saves and loads trainers, with torch) and
:mod:`shared.adapter_numpy` (which only reads weights, and must never import torch). One
definition of the checksum means the two readers can never disagree about which files are
intact.

The checksum is a SHA-256 over every tensor (name, dtype as torch names it, shape, bytes), then
every metadata entry but itself, so a flipped bit anywhere that still parses is caught.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from safetensors import safe_open

from shared.errors import CheckpointError

FORMAT_NAME = "distill-swarm-adapter"
FORMAT_VERSION = "1"
CHECKSUM_KEY = "checksum_sha256"
# How the checksum names each dtype: torch's names (the format was first written from torch).
TORCH_DTYPE_NAMES = {
    np.dtype(np.float16): "torch.float16",
    np.dtype(np.float32): "torch.float32",
    np.dtype(np.float64): "torch.float64",
    np.dtype(np.int8): "torch.int8",
    np.dtype(np.int16): "torch.int16",
    np.dtype(np.int32): "torch.int32",
    np.dtype(np.int64): "torch.int64",
    np.dtype(np.uint8): "torch.uint8",
    np.dtype(np.bool_): "torch.bool",
}


class CorruptCheckpoint(CheckpointError):
    """The file is unreadable or fails its checksum: worth falling back to the previous one."""


def checksum(arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> str:
    """The checkpoint checksum of ``arrays`` (every tensor, as numpy) and ``metadata``."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        dtype = TORCH_DTYPE_NAMES.get(array.dtype)
        if dtype is None:
            raise CheckpointError(f"checkpoint tensor {name} has an unexpected dtype {array.dtype}")
        digest.update(f"{name}|{dtype}|{tuple(array.shape)}|".encode())
        digest.update(array.data)  # the array itself, not a bytes copy of it: no copy
    fields = {key: value for key, value in metadata.items() if key != CHECKSUM_KEY}
    digest.update(json.dumps(fields, sort_keys=True).encode())
    return digest.hexdigest()


def read_verified(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every tensor (as numpy) and the metadata of the checkpoint at ``path``, checksum verified.

    Raises:
        CorruptCheckpoint: missing tensors, not a safetensors file, not ours, or a bad checksum.
        CheckpointError: the file is missing, or written in another format version (upgrading
            fixes that; falling back to an older file would not).
    """
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    except Exception as error:  # safetensors raises its own error type and plain ones alike
        raise CorruptCheckpoint(
            f"checkpoint {path} is not a readable safetensors file ({error}); it may be truncated "
            "or not a distill-swarm checkpoint"
        ) from None
    if metadata.get("format") != FORMAT_NAME:
        raise CorruptCheckpoint(f"{path} is not a distill-swarm adapter checkpoint")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {metadata.get('format_version')!r}; this "
            f"software reads version {FORMAT_VERSION}. Upgrade, or move it away to start fresh."
        )
    if metadata.get(CHECKSUM_KEY) != checksum(tensors, metadata):
        raise CorruptCheckpoint(f"checkpoint {path} fails its checksum: the file is corrupt")
    return tensors, metadata
