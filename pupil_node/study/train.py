"""One bounded LoRA training round on the base model, and the loss it is judged by.

- The LoRA (peft) sits on every attention and MLP projection; base weights stay frozen (bf16 by
  default), LoRA parameters are float32.
- A round resumes from the previous adapter directory when there is one (peft's safetensors
  file, no pickle), trains at most ``max_steps`` AdamW steps, and saves the new adapter.
- Loss is the mean negative log-likelihood of the answer tokens. The output layer (a 262k-word
  vocabulary tied to the embeddings) runs only on the positions that carry loss: full logits for
  a batch of 4 x 256 tokens alone are 1 GB in float32.
- The output layer is frozen, so its loss is computed by ``frozen_head_nll`` in chunks of
  positions, each chunk's gradient with respect to the hidden states taken at once and the
  chunk's logits freed: autograd would otherwise keep every labelled position's logits, their
  softmax and the softcap's intermediates (about 1 GB for 4 answers of 64 tokens) until the
  backward pass.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pupil_node.study.data import IGNORE, Example, batches, collate

if TYPE_CHECKING:
    import torch

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# `pupil.study.targets` -> the projections that carry the LoRA (bench/lora_sweep.py compares them).
TARGETS = {
    "all": TARGET_MODULES,
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# Positions per chunk of the output layer's loss: 64 x 262,144 float32 logits are 64 MiB.
HEAD_CHUNK = 64


@dataclass(frozen=True)
class TrainSettings:
    """How one round trains. Defaults: the colleague's measured settings, bounded."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = TARGET_MODULES
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    batch_size: int = 4
    epochs: int = 1
    max_steps: int = 40
    seed: int = 0
    gradient_checkpointing: bool = True
    # None leaves torch's setting alone.
    threads: int | None = None
    eval_batch_size: int = 8


@dataclass(frozen=True)
class TrainStats:
    """What the round did."""

    steps: int
    seconds: float
    train_losses: tuple[float, ...]

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / self.steps if self.steps else 0.0


def has_adapter(directory: Path | None) -> bool:
    """True when ``directory`` holds a saved peft adapter."""
    return directory is not None and (Path(directory) / ADAPTER_WEIGHTS).is_file()


def attach_lora(model: Any, settings: TrainSettings, previous: Path | None = None) -> Any:
    """Wrap ``model`` in a trainable peft LoRA: the previous adapter if any, else a fresh one."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if has_adapter(previous):
        return PeftModel.from_pretrained(model, str(previous), is_trainable=True)
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,  # type: ignore[arg-type]  # a float works; peft says int
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def answer_nll(model: Any, batch: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, int]:
    """Summed NLL of the answer tokens in ``batch`` and how many there are.

    ``model`` is a causal LM (peft-wrapped or not) with ``.model`` (the decoder) and
    ``.lm_head``; logits are computed only where a label follows.
    """
    import torch

    lm = _causal_lm(model)
    ids, mask, labels = (torch.tensor(x) for x in collate(batch, pad_id))
    hidden = lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
    # Position t predicts token t+1.
    targets = labels[:, 1:]
    keep = targets != IGNORE
    chosen = hidden[:, :-1][keep]
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    loss = frozen_head_nll(chosen, lm.lm_head.weight, targets[keep], softcap)
    return loss, int(keep.sum())


def frozen_head_nll(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    softcap: float | None = None,
    chunk: int = HEAD_CHUNK,
) -> torch.Tensor:
    """Summed NLL of ``targets`` under the frozen output layer ``weight`` (no bias), in chunks.

    The same value and the same gradient with respect to ``hidden`` as
    ``cross_entropy(softcap(linear(hidden, weight).float()), targets, reduction="sum")``, but
    only one chunk of ``chunk`` positions' logits is ever in memory. No gradient flows to
    ``weight`` (it is frozen: the tied embeddings, which llama.cpp's LoRA cannot adapt).
    """
    return _frozen_head_function().apply(hidden, weight.detach(), targets, softcap, chunk)


@functools.cache
def _frozen_head_function() -> Any:
    """The autograd function behind ``frozen_head_nll`` (defined lazily: torch is optional)."""
    import torch

    class FrozenHeadNLL(torch.autograd.Function):
        @staticmethod
        def forward(
            ctx: Any, hidden: Any, weight: Any, targets: Any, softcap: Any, chunk: int
        ) -> Any:
            want_grad = ctx.needs_input_grad[0]
            total = torch.zeros((), dtype=torch.float32)
            grad = torch.empty(hidden.shape, dtype=torch.float32) if want_grad else None
            for start in range(0, hidden.shape[0], chunk):
                h, t = hidden[start : start + chunk], targets[start : start + chunk]
                logits = torch.nn.functional.linear(h, weight).float()
                capped = torch.tanh(logits / softcap) * softcap if softcap else logits
                lse = torch.logsumexp(capped, dim=-1)
                rows = torch.arange(t.shape[0])
                total += (lse - capped[rows, t]).sum()
                if grad is not None:
                    # d/dz of (logsumexp(z) - z_t) is softmax(z) - onehot(t)
                    probs = torch.exp(capped - lse[:, None])
                    probs[rows, t] -= 1.0
                    if softcap:  # z = c * tanh(l / c): dz/dl = 1 - tanh(l / c)^2
                        probs *= 1.0 - (capped / softcap) ** 2
                    grad[start : start + chunk] = probs.to(weight.dtype) @ weight
                del logits, capped
            ctx.hidden_dtype = hidden.dtype
            ctx.save_for_backward(*(() if grad is None else (grad,)))
            return total

        @staticmethod
        def backward(ctx: Any, upstream: Any) -> Any:
            (grad,) = ctx.saved_tensors
            return ((grad * upstream).to(ctx.hidden_dtype), None, None, None, None)

    return FrozenHeadNLL


def mean_nll(model: Any, examples: Sequence[Example], pad_id: int, batch_size: int = 8) -> float:
    """Per-token NLL of the answers over ``examples`` (NaN when there are none)."""
    import torch

    if not examples:
        return math.nan
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        ordered = sorted(examples, key=lambda e: len(e.input_ids))
        for i in range(0, len(ordered), batch_size):
            loss, n = answer_nll(model, ordered[i : i + batch_size], pad_id)
            total, count = total + float(loss), count + n
    model.train(was_training)
    return total / count if count else math.nan


def train(
    model: Any, examples: Sequence[Example], pad_id: int, settings: TrainSettings
) -> TrainStats:
    """Train the peft ``model`` in place for at most ``settings.max_steps`` steps."""
    import torch

    torch.manual_seed(settings.seed)
    lm = _causal_lm(model)
    if settings.gradient_checkpointing:
        _checkpointing(lm, enable=True)
    lm.config.use_cache = False
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    model.train()
    losses: list[float] = []
    started = time.monotonic()
    for epoch in range(settings.epochs):
        for batch in batches(examples, settings.batch_size, settings.seed + epoch):
            if len(losses) >= settings.max_steps:
                break
            loss, n = answer_nll(model, batch, pad_id)
            if n == 0:
                continue
            (loss / n).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item() / n)
    model.eval()
    if settings.gradient_checkpointing:
        _checkpointing(lm, enable=False)
    return TrainStats(
        steps=len(losses), seconds=time.monotonic() - started, train_losses=tuple(losses)
    )


def save_adapter(model: Any, directory: Path) -> Path:
    """Save the peft adapter as safetensors + its config; returns ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory), safe_serialization=True)
    return directory


def cap_threads(threads: int | None) -> None:
    """Set torch's intra-op threads (None: leave it)."""
    if threads is None:
        return
    import torch

    torch.set_num_threads(max(1, threads))


def _causal_lm(model: Any) -> Any:
    """The transformers causal LM inside a peft wrapper (or ``model`` itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _checkpointing(lm: Any, *, enable: bool) -> None:
    """Turn activation checkpointing on or off (transformers 5 renamed the methods)."""
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):
        if enable:
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            lm.activation_checkpointing_disable()
    elif enable:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_disable()
