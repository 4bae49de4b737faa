"""A bounded replay buffer of (pupil embedding, master embedding, lesson id) pairs.

The seed trained many steps on one pair, which memorises that pair. Training on mini-batches drawn
from recent lessons instead makes each step a small move that has to fit many lessons at once, and
the buffer's bound keeps memory fixed on a Pi however long the node runs.
"""

from __future__ import annotations

import numpy as np
import torch

DEFAULT_CAPACITY = 512


def as_rows(array: object, dim: int, name: str) -> tuple[np.ndarray, bool]:
    """Validate an embedding (``(dim,)``) or a batch of them (``(n, dim)``).

    Returns the values as a C-contiguous float32 ``(n, dim)`` matrix, and whether the input was
    a single vector (so callers can give back the shape they were handed).

    Raises:
        ValueError: the array has the wrong rank or width, no rows, or NaN/inf values.
    """
    try:
        values = np.asarray(array, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a float array, got {type(array).__name__}") from error
    single = values.ndim == 1
    if single:
        values = values[np.newaxis, :]
    if values.ndim != 2:
        raise ValueError(f"{name} must have shape ({dim},) or (n, {dim}), got {values.shape}")
    if values.shape[1] != dim:
        raise ValueError(
            f"{name} has dimension {values.shape[1]} but {dim} was expected: were both "
            "embeddings made with the same embedding model?"
        )
    if values.shape[0] == 0:
        raise ValueError(f"{name} has no rows")
    if not np.isfinite(values).all():
        raise ValueError(f"{name} contains NaN or inf values")
    return np.ascontiguousarray(values), single


class ReplayBuffer:
    """Fixed-capacity FIFO store of float32 (input, target) pairs tagged with their lesson id.

    Storage is a preallocated ring (``capacity * (in_dim + out_dim) * 4`` bytes: 4 MiB at
    1024 dims and the default capacity), so adding a pair never allocates. Everything public
    speaks in *logical* positions, 0 = oldest, so a buffer rebuilt from :meth:`export` samples
    exactly like the original.
    """

    def __init__(self, in_dim: int, out_dim: int, capacity: int = DEFAULT_CAPACITY) -> None:
        if in_dim < 1 or out_dim < 1:
            raise ValueError(f"dimensions must be positive, got in_dim={in_dim}, out_dim={out_dim}")
        if capacity < 1:
            raise ValueError(f"replay capacity must be at least 1, got {capacity}")
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.capacity = capacity
        self._inputs = np.zeros((capacity, in_dim), dtype=np.float32)
        self._targets = np.zeros((capacity, out_dim), dtype=np.float32)
        self._lesson_ids: list[str] = [""] * capacity
        self._start = 0  # physical slot of the oldest pair
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, x: np.ndarray, y: np.ndarray, lesson_id: str) -> None:
        """Append pairs (``x`` and ``y`` are one vector each or matching ``(n, dim)`` batches).

        When full, the oldest pairs are evicted first.
        """
        inputs, _ = as_rows(x, self.in_dim, "input")
        targets, _ = as_rows(y, self.out_dim, "target")
        if len(inputs) != len(targets):
            raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets: pass one per input")
        for row_in, row_out in zip(inputs, targets, strict=True):
            slot = (self._start + self._size) % self.capacity
            self._inputs[slot] = row_in
            self._targets[slot] = row_out
            self._lesson_ids[slot] = lesson_id
            if self._size < self.capacity:
                self._size += 1
            else:
                self._start = (self._start + 1) % self.capacity

    def sample(
        self, batch_size: int, generator: torch.Generator, *, include_newest: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Draw a mini-batch of ``min(batch_size, len(self))`` distinct pairs.

        The ``include_newest`` most recent pairs are always in the batch (so the lesson being
        learnt is always trained on); the rest are drawn uniformly without replacement from the
        older pairs using ``generator``, so the same seed gives the same batches.

        Returns:
            ``(inputs, targets)`` as float32 matrices, newest pairs first.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if self._size == 0:
            raise ValueError("cannot sample from an empty replay buffer: add a pair first")
        size = min(batch_size, self._size)
        newest = min(include_newest, size)
        older = self._size - newest
        # randperm is drawn even when no older pair is needed, so the generator advances the
        # same way on every step and a run is reproducible regardless of the buffer's fill level.
        drawn = torch.randperm(older, generator=generator)[: size - newest].numpy()
        logical = np.concatenate([np.arange(self._size - 1, older - 1, -1), drawn])
        slots = (self._start + logical) % self.capacity
        return self._inputs[slots], self._targets[slots]

    def export(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Return copies of the stored inputs, targets and lesson ids, oldest first."""
        slots = (self._start + np.arange(self._size)) % self.capacity
        ids = [self._lesson_ids[slot] for slot in slots]
        # Indexing with an array already copies: no second .copy() (a checkpoint per lesson).
        return self._inputs[slots], self._targets[slots], ids

    @classmethod
    def restore(
        cls,
        inputs: np.ndarray,
        targets: np.ndarray,
        lesson_ids: list[str],
        capacity: int = DEFAULT_CAPACITY,
    ) -> ReplayBuffer:
        """Rebuild a buffer from :meth:`export` output (oldest first)."""
        if inputs.ndim != 2 or targets.ndim != 2:
            raise ValueError("replay inputs and targets must be matrices")
        if not len(inputs) == len(targets) == len(lesson_ids):
            raise ValueError(
                f"replay has {len(inputs)} inputs, {len(targets)} targets and "
                f"{len(lesson_ids)} lesson ids: they must match"
            )
        if len(inputs) > capacity:
            raise ValueError(f"replay holds {len(inputs)} pairs, more than its capacity {capacity}")
        buffer = cls(inputs.shape[1], targets.shape[1], capacity)
        size = len(inputs)
        buffer._inputs[:size] = inputs
        buffer._targets[:size] = targets
        buffer._lesson_ids[:size] = list(lesson_ids)
        buffer._size = size
        return buffer
