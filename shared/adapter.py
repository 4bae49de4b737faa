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
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional
from torch.optim.adamw import adamw

from shared.errors import ConfigError
from shared.replay import DEFAULT_CAPACITY, ReplayBuffer, as_rows

# 256 hidden units rather than the seed's 1024: at 1024 dims that is 0.5 M parameters (2 MiB of
# weights, 6 MiB with AdamW's two moments) and a quarter of the seed's compute per step, which a
# Raspberry Pi trains in milliseconds. A replay buffer of a few hundred lessons cannot make use of
# more capacity: a wider layer would only memorise them.
DEFAULT_HIDDEN_DIM = 256
DEFAULT_LEARNING_RATE = 1e-3
DEFAULT_WEIGHT_DECAY = 1e-2
ADAM_BETAS = (0.9, 0.999)  # torch's defaults, as the adapter always used
ADAM_EPS = 1e-8
DEFAULT_STEPS = 8
DEFAULT_BATCH_SIZE = 32
DEFAULT_SEED = 0
TORCH_THREADS_ENV = "DISTILL_SWARM_TORCH_THREADS"
LOSS_NAME = "cosine"


# Threads a service set from its configuration (cap_torch_threads(n)); later calls without a
# number (e.g. the embedded embedder's, when it loads) keep them rather than lower them.
_configured_threads: int | None = None


def cap_torch_threads(threads: int | None = None) -> int:
    """Cap torch's intra-op threads for this process and return the number it now uses.

    ``threads`` (a service's configuration, e.g. ``pupil.adapter.threads``) sets the number; it
    is kept for the rest of the process. Without it, the cap is the configured number if one was
    set, else ``$DISTILL_SWARM_TORCH_THREADS``, else half the cores (at least one), and it never
    raises a lower setting made elsewhere. torch's default is every core, which a pupil training
    its adapter would take from its model server (Ollama, or llama.cpp in the same process) and
    its broker connection; matrices this small hardly gain from more threads anyway.
    ``torch.set_num_threads`` is process-global, so services call this once at start-up.
    """
    global _configured_threads
    cores = os.cpu_count() or 1
    if threads is not None:
        _configured_threads = min(threads, cores)
        torch.set_num_threads(_configured_threads)
        return _configured_threads
    cap = _configured_threads or _default_threads(cores)
    if torch.get_num_threads() > cap:
        torch.set_num_threads(cap)
    return torch.get_num_threads()


def _default_threads(cores: int) -> int:
    env = os.environ.get(TORCH_THREADS_ENV)
    try:
        threads = int(env) if env else max(1, cores // 2)
    except ValueError:
        raise ConfigError(f"{TORCH_THREADS_ENV} must be a whole number, not '{env}'") from None
    if threads < 1:
        raise ConfigError(f"{TORCH_THREADS_ENV} must be at least 1, not {threads}")
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


class AdamW:
    """AdamW over the adapter's parameters: torch's own update, without ``torch.optim.AdamW``.

    ``torch.optim.AdamW`` imports ``torch._dynamo`` (and sympy with it) when it is created and on
    every step: about 80 MB of resident memory that a pupil never uses (bench/memory.py measures
    it; the node's budget is 350 MB). This class runs the same update through torch's public
    functional API, ``torch.optim.adamw.adamw``, which imports nothing more, with its fused
    kernel: one pass over each parameter instead of about ten, two to three times faster at
    these sizes (bench/adapter_cost.py). The fused kernel computes the same formula and agrees
    with the per-tensor loop to about 1e-7.

    The state keeps ``torch.optim``'s layout and names (per parameter index: ``step``,
    ``exp_avg``, ``exp_avg_sq``), so checkpoints written before and after this class load in
    either.
    """

    SLOTS = ("step", "exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        lr: float = DEFAULT_LEARNING_RATE,
        weight_decay: float = DEFAULT_WEIGHT_DECAY,
    ) -> None:
        self.params = list(params)
        self.param_groups: list[dict[str, Any]] = [
            {
                "lr": lr,
                "weight_decay": weight_decay,
                "betas": ADAM_BETAS,
                "eps": ADAM_EPS,
                "params": list(range(len(self.params))),
            }
        ]
        self.state: dict[int, dict[str, torch.Tensor]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget every gradient (``set_to_none``) or zero them in place."""
        for param in self.params:
            if set_to_none:
                param.grad = None
            elif param.grad is not None:
                param.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        """One AdamW step on every parameter that has a gradient."""
        group = self.param_groups[0]
        params: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        averages: list[torch.Tensor] = []
        squares: list[torch.Tensor] = []
        steps: list[torch.Tensor] = []
        for index, param in enumerate(self.params):
            if param.grad is None:
                continue
            state = self.state.get(index)
            if state is None:
                state = self.state[index] = {
                    "step": torch.tensor(0.0, dtype=torch.float32),
                    "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
                }
            params.append(param)
            grads.append(param.grad)
            averages.append(state["exp_avg"])
            squares.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        adamw(
            params, grads, averages, squares, [], steps,
            fused=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
            weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
        )  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """``{"state": {index: {slot: tensor}}, "param_groups": [...]}``, as torch.optim has it."""
        return {
            "state": {index: dict(slots) for index, slots in self.state.items()},
            "param_groups": [dict(group) for group in self.param_groups],
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (or ``torch.optim.AdamW``'s); ValueError if unfit."""
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, slots in state_dict["state"].items():
            index = int(key)
            if not 0 <= index < len(self.params) or set(slots) != set(self.SLOTS):
                raise ValueError(f"optimizer state for parameter {key} does not fit this adapter")
            param = self.params[index]
            for slot in ("exp_avg", "exp_avg_sq"):
                if slots[slot].shape != param.shape:
                    raise ValueError(
                        f"optimizer {slot} for parameter {index} has shape "
                        f"{tuple(slots[slot].shape)}, not {tuple(param.shape)}"
                    )
            state[index] = {
                "step": slots["step"].detach().to(torch.float32).clone().reshape(()),
                "exp_avg": slots["exp_avg"].detach().to(param.dtype).clone(),
                "exp_avg_sq": slots["exp_avg_sq"].detach().to(param.dtype).clone(),
            }
        for group in state_dict.get("param_groups", [])[:1]:
            for name in ("lr", "weight_decay", "betas", "eps"):
                if name in group:
                    self.param_groups[0][name] = group[name]
        self.state = state


class AdapterTrainer:
    """An adapter with its AdamW optimizer, replay buffer and training history.

    Attributes:
        version: bumps once per trained lesson; reports carry it so the master knows which
            adapter produced a figure.
        lessons_trained: how many lessons :meth:`learn` has trained on.
        last_lesson_id: the id of the most recent of them, or ``None``.
        pending_lesson_ids: lessons trained here that the owner has not yet recorded as done
            elsewhere (a pupil: not yet journalled), oldest first. A checkpoint carries them, so
            a lesson trained and saved but never journalled is recognised whenever it comes back
            (:meth:`holds`), however many lessons were trained since; the owner drops them with
            :meth:`forget_pending` once they are recorded, so the list stays short.
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
        self.optimizer = AdamW(
            self.adapter.parameters(), lr=learning_rate, weight_decay=weight_decay
        )
        self.replay = ReplayBuffer(in_dim, out_dim, replay_capacity)
        self.embedding_model = embedding_model
        self.version = 0
        self.lessons_trained = 0
        self.last_lesson_id: str | None = None
        self.pending_lesson_ids: list[str] = []

    def holds(self, lesson_id: str) -> bool:
        """True if this adapter trained on ``lesson_id`` and the lesson is still pending."""
        return lesson_id in self.pending_lesson_ids

    def forget_pending(self, lesson_ids: Iterable[str]) -> None:
        """Drop lessons the owner has recorded as done from :attr:`pending_lesson_ids`."""
        done = set(lesson_ids)
        self.pending_lesson_ids = [i for i in self.pending_lesson_ids if i not in done]

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
        if lesson_id not in self.pending_lesson_ids:
            self.pending_lesson_ids.append(lesson_id)
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
