"""The embedding adapter a pupil trains so its answers' embeddings move toward the master's.

Improves on the seed's ``PupilModel`` / ``PupilFineTuner`` (Linear -> ReLU -> Linear, 1024 hidden
units, MSE, Adam, many steps on a single pair):

- it starts as the identity, so an untrained adapter changes nothing and cannot do harm;
- it trains on mini-batches from a :class:`~shared.replay.ReplayBuffer` of recent lessons;
- it optimises the cosine loss, the same quantity every similarity figure reports;
- it is saved and loaded by :mod:`shared.checkpoint` (safetensors, no pickle).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from shared.replay import DEFAULT_CAPACITY, ReplayBuffer, as_rows

# 256 hidden units rather than the seed's 1024: at 1024 dims that is 0.5 M parameters (2 MiB of
# weights, 6 MiB with AdamW's two moments) and a quarter of the seed's compute per step, which a
# Raspberry Pi trains in milliseconds. A replay buffer of a few hundred lessons cannot make use of
# more capacity: a wider layer would only memorise them.
DEFAULT_HIDDEN_DIM = 256
DEFAULT_LEARNING_RATE = 1e-3
DEFAULT_WEIGHT_DECAY = 1e-2
DEFAULT_STEPS = 8
DEFAULT_BATCH_SIZE = 32
DEFAULT_SEED = 0
# Two threads leave a 4-core Pi room for the LLM and the broker connection; more threads hardly
# speed up matrices this small.
DEFAULT_TORCH_THREADS = 2
LOSS_NAME = "cosine"


def limit_torch_threads(num_threads: int | None = None) -> int:
    """Cap torch's intra-op thread pool for this process and return the cap applied.

    ``torch.set_num_threads`` is process-global, so services call this once at start-up; this
    module never calls it on import. The default is ``min(DEFAULT_TORCH_THREADS, cpu count)``.
    """
    threads = num_threads if num_threads is not None else DEFAULT_TORCH_THREADS
    if threads < 1:
        raise ValueError(f"num_threads must be at least 1, got {threads}")
    threads = min(threads, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    return threads


def cosine_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of ``1 - cos(pred, target)`` over the rows; 0 when every row points the same way."""
    return (1.0 - functional.cosine_similarity(pred, target, dim=-1)).mean()


class EmbeddingAdapter(nn.Module):
    """``skip(x) + output(relu(hidden(x)))``: Linear(in, hidden) -> ReLU -> Linear(hidden, out).

    ``output`` starts at zero, so the untrained adapter *is* its skip path:

    - equal dims: the skip is the identity and an untrained adapter returns its input exactly;
    - different dims (bridging two embedding models): the skip is a learnable bias-free
      Linear(in, out) initialised (semi-)orthogonal. When ``in_dim <= out_dim`` it is then an
      isometry, so the angles between pupil embeddings (all that cosine similarity sees) survive
      the move into the master's space and training only has to rotate, not untangle; when
      ``in_dim > out_dim`` its rows are orthonormal, the gentlest projection there is.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = DEFAULT_HIDDEN_DIM,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("hidden_dim", hidden_dim)):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.hidden_dim = hidden_dim
        self.hidden = nn.Linear(in_dim, hidden_dim)
        self.output = nn.Linear(hidden_dim, out_dim)
        self.skip: nn.Linear | None = (
            None if in_dim == out_dim else nn.Linear(in_dim, out_dim, bias=False)
        )
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Re-initialise every weight (reproducibly when ``generator`` is seeded)."""
        # The same scheme as nn.Linear's own default, but drawn from our generator instead of
        # the process-global RNG, so one seed gives the same adapter whatever else ran before.
        nn.init.kaiming_uniform_(self.hidden.weight, a=math.sqrt(5), generator=generator)
        bound = 1.0 / math.sqrt(self.in_dim)
        nn.init.uniform_(self.hidden.bias, -bound, bound, generator=generator)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)
        if self.skip is not None:
            nn.init.orthogonal_(self.skip.weight, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(..., in_dim)`` embeddings to ``(..., out_dim)``."""
        if x.shape[-1] != self.in_dim:
            raise ValueError(
                f"adapter expects inputs of dimension {self.in_dim}, got {x.shape[-1]}"
            )
        base = x if self.skip is None else self.skip(x)
        return base + self.output(functional.relu(self.hidden(x)))


class AdapterTrainer:
    """An adapter with its AdamW optimizer, replay buffer and training history.

    Attributes:
        version: bumps once per trained lesson; reports carry it so the master knows which
            adapter produced a figure.
        lessons_trained: how many lessons :meth:`learn` has trained on.
        last_lesson_id: the id of the most recent of them, or ``None``.
        embedding_model: the name of the embedding model the adapter's space belongs to; a
            checkpoint refuses to load into a node that embeds with another model.
    """

    loss_name = LOSS_NAME

    def __init__(
        self,
        in_dim: int,
        out_dim: int | None = None,
        hidden_dim: int = DEFAULT_HIDDEN_DIM,
        *,
        learning_rate: float = DEFAULT_LEARNING_RATE,
        weight_decay: float = DEFAULT_WEIGHT_DECAY,
        replay_capacity: int = DEFAULT_CAPACITY,
        embedding_model: str = "",
        seed: int = DEFAULT_SEED,
    ) -> None:
        out_dim = in_dim if out_dim is None else out_dim
        # One generator seeds the weights and then drives replay sampling, so a trainer's whole
        # run follows from `seed` (and its state is checkpointed to resume the run exactly).
        self.generator = torch.Generator().manual_seed(seed)
        self.adapter = EmbeddingAdapter(in_dim, out_dim, hidden_dim, generator=self.generator)
        # AdamW's decoupled weight decay pulls the residual branch back toward zero, i.e. the
        # adapter toward the identity, between lessons that do not pull the other way.
        self.optimizer = torch.optim.AdamW(
            self.adapter.parameters(), lr=learning_rate, weight_decay=weight_decay
        )
        self.replay = ReplayBuffer(in_dim, out_dim, replay_capacity)
        self.embedding_model = embedding_model
        self.version = 0
        self.lessons_trained = 0
        self.last_lesson_id: str | None = None

    @property
    def in_dim(self) -> int:
        """Dimension of the pupil-side embeddings the adapter takes."""
        return self.adapter.in_dim

    @property
    def out_dim(self) -> int:
        """Dimension of the master-side embeddings the adapter produces."""
        return self.adapter.out_dim

    def learn(
        self,
        lesson_id: str,
        x: np.ndarray,
        y: np.ndarray,
        steps: int = DEFAULT_STEPS,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> list[float]:
        """Store one lesson's pair(s) and take ``steps`` optimizer steps on replayed mini-batches.

        ``x`` is the pupil answer's embedding and ``y`` the master answer's, one vector each or
        matching ``(n, dim)`` batches (e.g. several sampled pupil answers). Every mini-batch holds
        this lesson's pairs plus older ones drawn from the replay buffer.

        The loss is ``1 - cos(pred, target)`` averaged over the batch rather than the seed's MSE:
        cosine similarity is what every report measures and what retrieval with these
        embeddings uses; MSE also spends effort matching vector norms, which carry no meaning
        here and differ between embedding models.

        Returns:
            The mini-batch loss before each step, in order.
        """
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        inputs, _ = as_rows(x, self.in_dim, "pupil embedding")
        targets, _ = as_rows(y, self.out_dim, "master embedding")
        if len(inputs) != len(targets):
            raise ValueError(
                f"{len(inputs)} pupil embeddings but {len(targets)} master embeddings: "
                "pass one master embedding per pupil embedding"
            )
        if not np.linalg.norm(targets, axis=1).all():
            raise ValueError("a master embedding is all zeros: there is no direction to learn")
        self.replay.add(inputs, targets, lesson_id)

        self.adapter.train()
        losses: list[float] = []
        for _ in range(steps):
            batch_in, batch_out = self.replay.sample(
                batch_size, self.generator, include_newest=len(inputs)
            )
            prediction = self.adapter(torch.from_numpy(batch_in))
            loss = cosine_loss(prediction, torch.from_numpy(batch_out))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            losses.append(float(loss.item()))

        self.version += 1
        self.lessons_trained += 1
        self.last_lesson_id = lesson_id
        return losses

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Map pupil embeddings into the master's space (no gradients, eval mode).

        ``(in_dim,)`` gives ``(out_dim,)`` and ``(n, in_dim)`` gives ``(n, out_dim)``.
        """
        inputs, single = as_rows(x, self.in_dim, "pupil embedding")
        self.adapter.eval()
        with torch.no_grad():
            out = self.adapter(torch.from_numpy(inputs)).numpy()
        return out[0] if single else out
