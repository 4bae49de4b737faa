"""The adapter's AdamW: torch's update, torch's state layout, without torch.optim's import cost."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.adapter import AdamW, AdapterTrainer, EmbeddingAdapter, cosine_loss
from shared.checkpoint import load_checkpoint, save_checkpoint

DIM = 48


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def adapter(seed: int = 0) -> EmbeddingAdapter:
    return EmbeddingAdapter(DIM, DIM, 32, generator=torch.Generator().manual_seed(seed))


def batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(8, DIM, generator=generator), torch.randn(8, DIM, generator=generator))
        for _ in range(count)
    ]


def train(model: EmbeddingAdapter, optimizer: object, data: list) -> None:
    for inputs, targets in data:
        loss = cosine_loss(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)  # type: ignore[attr-defined]
        loss.backward()
        optimizer.step()  # type: ignore[attr-defined]


def weights(model: EmbeddingAdapter) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("fused", [True, False])
def test_it_follows_torch_optim_adamw(fused: bool) -> None:
    data = batches(40)
    ours, theirs = adapter(), adapter()
    train(ours, AdamW(ours.parameters(), lr=1e-2, weight_decay=1e-2), data)
    train(
        theirs,
        torch.optim.AdamW(theirs.parameters(), lr=1e-2, weight_decay=1e-2, fused=fused),
        data,
    )
    for a, b in zip(weights(ours), weights(theirs), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6 if fused else 1e-5)


def test_its_state_has_torch_optims_layout_and_loads_a_torch_state() -> None:
    data = batches(30)
    ours, theirs = adapter(), adapter()
    theirs_optimizer = torch.optim.AdamW(theirs.parameters(), lr=1e-2, weight_decay=1e-2)
    train(theirs, theirs_optimizer, data[:10])
    # A node upgraded mid-run: its checkpoint's optimizer state came from torch.optim.AdamW.
    ours.load_state_dict(theirs.state_dict())
    ours_optimizer = AdamW(ours.parameters(), lr=1e-2, weight_decay=1e-2)
    ours_optimizer.load_state_dict(theirs_optimizer.state_dict())
    torch_state = theirs_optimizer.state_dict()["state"]
    our_state = ours_optimizer.state_dict()["state"]
    assert our_state.keys() == torch_state.keys()
    for index, slots in our_state.items():
        assert slots.keys() == torch_state[index].keys()
        for slot, value in slots.items():
            assert value.dtype == torch_state[index][slot].dtype
            assert torch.equal(value, torch_state[index][slot])

    train(theirs, theirs_optimizer, data[10:])
    train(ours, ours_optimizer, data[10:])
    for a, b in zip(weights(ours), weights(theirs), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_a_state_for_other_parameters_is_refused() -> None:
    model = adapter()
    optimizer = AdamW(model.parameters())
    train(model, optimizer, batches(1))
    state = optimizer.state_dict()
    other = AdamW(EmbeddingAdapter(DIM + 1, DIM, 32).parameters())
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict(state)


def test_a_trainer_resumes_exactly_from_its_checkpoint(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    trainer = AdapterTrainer(DIM, replay_capacity=16, embedding_model="m")
    pairs = [rng.standard_normal((2, 2, DIM)).astype(np.float32) for _ in range(8)]
    for index, (x, y) in enumerate(pairs[:4]):
        trainer.learn(f"l{index}", x, y, steps=3, batch_size=4)
    restored = load_checkpoint(save_checkpoint(trainer, tmp_path / "a.safetensors"))
    for index, (x, y) in enumerate(pairs[4:]):
        assert trainer.learn(f"m{index}", x, y, 3, 4) == restored.learn(f"m{index}", x, y, 3, 4)


def test_training_does_not_import_torch_dynamo() -> None:
    code = (
        "import sys, numpy as np\n"
        "from shared.adapter import AdapterTrainer\n"
        "t = AdapterTrainer(8, replay_capacity=4)\n"
        "t.learn('a', np.ones(8, np.float32), np.ones(8, np.float32), steps=2, batch_size=2)\n"
        "sys.exit(any(m in sys.modules for m in ('torch._dynamo', 'sympy')))\n"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
