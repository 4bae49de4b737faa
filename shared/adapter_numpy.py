"""The adapter's forward pass in numpy alone: using a trained adapter without importing torch.

A pupil needs torch to *train* its adapter; to *use* it (``similarity_adapted``, best-of-K
reranking, an inference-only node) it needs two small matrix products. torch costs about 200 MB
of resident memory on import and its optimizer pulls in about 75 MB more (torch._dynamo and
sympy); this module needs numpy and safetensors' numpy loader, about 25 MB in all (bench/memory.py
measures both, docs/performance.md has the figures).

It reads a checkpoint written by :mod:`shared.checkpoint`, verifies its SHA-256 checksum with the
same code as that module (:mod:`shared.checkpoint_format`, so a flipped bit is refused here too),
and computes ``skip(x) + output(relu(hidden(x)))`` in float32, the same function as
:class:`shared.adapter.EmbeddingAdapter`. Importing it never imports torch (a test checks that).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.checkpoint_format import read_verified
from shared.errors import CheckpointError

ADAPTER_PREFIX = "adapter."


@dataclass(frozen=True)
class NumpyAdapter:
    """A trained adapter's weights as float32 numpy arrays (``out x in`` like torch's Linear)."""

    hidden_weight: np.ndarray
    hidden_bias: np.ndarray
    output_weight: np.ndarray
    output_bias: np.ndarray
    skip_weight: np.ndarray | None  # None when in_dim == out_dim: the skip is the identity
    version: int
    embedding_model: str

    @property
    def in_dim(self) -> int:
        """Dimension of the pupil-side embeddings the adapter takes."""
        return int(self.hidden_weight.shape[1])

    @property
    def out_dim(self) -> int:
        """Dimension of the master-side embeddings the adapter produces."""
        return int(self.output_weight.shape[0])

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        in_dim: int | None = None,
        out_dim: int | None = None,
        embedding_model: str | None = None,
    ) -> NumpyAdapter:
        """Read and verify the checkpoint at ``path``; keep only the adapter's weights.

        Raises:
            CheckpointError: the file is missing, unreadable or corrupt (fails its checksum),
                has another format version, or does not fit ``in_dim``/``out_dim``/the model.
        """
        path = Path(path)
        tensors, metadata = read_verified(path)
        try:
            adapter = cls(
                hidden_weight=_weight(tensors, "hidden.weight"),
                hidden_bias=_weight(tensors, "hidden.bias"),
                output_weight=_weight(tensors, "output.weight"),
                output_bias=_weight(tensors, "output.bias"),
                skip_weight=(
                    _weight(tensors, "skip.weight")
                    if ADAPTER_PREFIX + "skip.weight" in tensors
                    else None
                ),
                version=int(metadata.get("version", "0")),
                embedding_model=metadata.get("embedding_model", ""),
            )
        except (KeyError, ValueError) as error:
            raise CheckpointError(f"checkpoint {path} is inconsistent: {error}") from None
        wrong = [
            f"{name}={actual} (expected {want})"
            for name, actual, want in (
                ("in_dim", adapter.in_dim, in_dim),
                ("out_dim", adapter.out_dim, out_dim),
            )
            if want is not None and want != actual
        ]
        if wrong:
            raise CheckpointError(f"checkpoint {path} does not fit: it has {', '.join(wrong)}")
        if embedding_model is not None and adapter.embedding_model != embedding_model:
            raise CheckpointError(
                f"checkpoint {path} was trained on embeddings from {adapter.embedding_model!r}, "
                f"not {embedding_model!r}"
            )
        return adapter

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Map pupil embeddings into the master's space, as ``AdapterTrainer.predict`` does.

        ``(in_dim,)`` gives ``(out_dim,)`` and ``(n, in_dim)`` gives ``(n, out_dim)``.
        """
        inputs = np.asarray(x, dtype=np.float32)
        single = inputs.ndim == 1
        rows = inputs[np.newaxis, :] if single else inputs
        if rows.ndim != 2 or rows.shape[1] != self.in_dim:
            raise ValueError(
                f"adapter expects inputs of shape ({self.in_dim},) or (n, {self.in_dim}), got "
                f"{inputs.shape}"
            )
        hidden = np.maximum(rows @ self.hidden_weight.T + self.hidden_bias, 0.0)
        base = rows if self.skip_weight is None else rows @ self.skip_weight.T
        out = base + (hidden @ self.output_weight.T + self.output_bias)
        return out[0] if single else out


def _weight(tensors: dict[str, np.ndarray], name: str) -> np.ndarray:
    return np.ascontiguousarray(tensors[ADAPTER_PREFIX + name], dtype=np.float32)
