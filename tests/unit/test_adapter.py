"""The adapter, its replay buffer and its checkpoints, as a pupil node uses them."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.adapter import AdapterTrainer
from shared.checkpoint import load_checkpoint, load_latest, previous_path, save_checkpoint
from shared.errors import CheckpointError
from shared.replay import ReplayBuffer

DIM = 64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def normalize(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(normalize(a) * normalize(b), axis=-1)


def embeddings(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    return normalize(rng.standard_normal((n, dim)))


def trained(lessons: int = 12, dim: int = DIM, seed: int = 0) -> AdapterTrainer:
    rng = np.random.default_rng(seed)
    trainer = AdapterTrainer(dim, replay_capacity=8, embedding_model="test-embed")
    for index in range(lessons):
        x, y = embeddings(rng, 2, dim)
        trainer.learn(f"lesson-{index}", x, y, steps=2, batch_size=4)
    return trainer


# --- the adapter itself ---------------------------------------------------------------------


def test_an_untrained_adapter_changes_nothing() -> None:
    x = embeddings(np.random.default_rng(1), 5, 384)
    trainer = AdapterTrainer(384)
    np.testing.assert_allclose(trainer.predict(x), x, atol=1e-6)
    np.testing.assert_allclose(trainer.predict(x[0]), x[0], atol=1e-6)


def test_a_bridging_adapter_maps_into_the_other_space_and_keeps_angles() -> None:
    x = embeddings(np.random.default_rng(2), 5, 384)
    trainer = AdapterTrainer(384, 1024)
    out = trainer.predict(x)
    assert out.shape == (5, 1024)
    assert trainer.predict(x[0]).shape == (1024,)
    # The orthogonal skip is an isometry: pairwise cosines between pupil embeddings survive.
    np.testing.assert_allclose(normalize(out) @ normalize(out).T, x @ x.T, atol=1e-5)


def test_training_learns_a_mapping_that_generalises_to_unseen_pairs() -> None:
    rng = np.random.default_rng(3)
    # Real embeddings sit near a low-dimensional subspace; the master's answers are a fixed
    # rotation of the pupil's within it, which the adapter has to discover from examples.
    basis = np.linalg.qr(rng.standard_normal((DIM, 8)))[0]
    rotation = np.linalg.qr(rng.standard_normal((DIM, DIM)))[0]
    mix = np.eye(DIM) * 0.3 + rotation * 0.7

    def pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
        x = normalize(rng.standard_normal((n, 8)) @ basis.T + 0.05 * rng.standard_normal((n, DIM)))
        return x, normalize(x @ mix.T)

    train_x, train_y = pairs(100)
    held_x, held_y = pairs(50)
    trainer = AdapterTrainer(DIM, seed=0)
    losses = [
        loss
        for index in range(100)
        for loss in trainer.learn(f"lesson-{index}", train_x[index], train_y[index], steps=2)
    ]

    assert len(losses) == 200
    assert np.mean(losses[-20:]) < 0.1 * np.mean(losses[:5])
    identity_baseline = cosine(held_x, held_y).mean()
    adapted = cosine(trainer.predict(held_x), held_y).mean()
    assert adapted > max(0.9, identity_baseline + 0.4), (identity_baseline, adapted)
    assert trainer.version == 100
    assert trainer.lessons_trained == 100
    assert trainer.last_lesson_id == "lesson-99"
    assert trainer.loss_name == "cosine"


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (np.zeros(DIM + 1), np.ones(DIM), "dimension 65"),
        (np.ones((2, 2, DIM)), np.ones(DIM), "shape"),
        (np.full(DIM, np.nan), np.ones(DIM), "NaN"),
        (np.ones((2, DIM)), np.ones((3, DIM)), "one master embedding per pupil embedding"),
        (np.ones(DIM), np.zeros(DIM), "all zeros"),
    ],
)
def test_bad_embeddings_are_refused_with_a_clear_message(
    x: np.ndarray, y: np.ndarray, message: str
) -> None:
    trainer = AdapterTrainer(DIM)
    with pytest.raises(ValueError, match=message):
        trainer.learn("bad", x, y)
    assert trainer.version == 0
    assert len(trainer.replay) == 0


# --- replay buffer --------------------------------------------------------------------------


def test_replay_evicts_the_oldest_pairs_first() -> None:
    buffer = ReplayBuffer(2, 2, capacity=3)
    for index in range(5):
        buffer.add(np.full(2, index), np.full(2, -index), f"lesson-{index}")
    inputs, targets, ids = buffer.export()
    assert len(buffer) == 3
    assert ids == ["lesson-2", "lesson-3", "lesson-4"]
    np.testing.assert_array_equal(inputs[:, 0], [2, 3, 4])
    np.testing.assert_array_equal(targets[:, 0], [-2, -3, -4])
    assert inputs.dtype == np.float32


def test_replay_sampling_is_deterministic_and_keeps_the_newest_pairs() -> None:
    def batches(seed: int) -> list[np.ndarray]:
        buffer = ReplayBuffer(1, 1, capacity=50)
        for index in range(40):
            buffer.add(np.array([index]), np.array([index]), f"lesson-{index}")
        generator = torch.Generator().manual_seed(seed)
        return [buffer.sample(8, generator, include_newest=2)[0][:, 0] for _ in range(5)]

    first, again, other = batches(7), batches(7), batches(8)
    for batch, same in zip(first, again, strict=True):
        np.testing.assert_array_equal(batch, same)
        assert list(batch[:2]) == [39, 38]
        assert len(set(batch)) == 8
    assert any(not np.array_equal(a, b) for a, b in zip(first, other, strict=True))


# --- checkpoints ----------------------------------------------------------------------------


def test_a_checkpoint_restores_the_trainer_exactly(tmp_path: Path) -> None:
    path = tmp_path / "adapter.safetensors"
    original = trained()
    save_checkpoint(original, path)
    restored = load_checkpoint(path, in_dim=DIM, out_dim=DIM, embedding_model="test-embed")

    for (name, a), (_, b) in zip(
        original.adapter.state_dict().items(), restored.adapter.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    for a, b in zip(
        original.optimizer.state_dict()["state"].values(),
        restored.optimizer.state_dict()["state"].values(),
        strict=True,
    ):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[key], b[key]) for key in a)
    for a, b in zip(original.replay.export(), restored.replay.export(), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (restored.version, restored.lessons_trained, restored.last_lesson_id) == (
        12,
        12,
        "lesson-11",
    )
    assert restored.embedding_model == "test-embed"
    probe = embeddings(np.random.default_rng(9), 4)
    np.testing.assert_array_equal(original.predict(probe), restored.predict(probe))

    # A node restarted from the checkpoint goes on learning exactly as if it had never stopped.
    rng = np.random.default_rng(10)
    for index in range(4):
        x, y = embeddings(rng, 2)
        assert original.learn(f"more-{index}", x, y, 3, 4) == restored.learn(
            f"more-{index}", x, y, 3, 4
        )
    np.testing.assert_array_equal(original.predict(probe), restored.predict(probe))


def test_saving_again_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "adapter.safetensors"
    save_checkpoint(trained(lessons=3), path)
    save_checkpoint(trained(lessons=5), path)
    assert load_checkpoint(path).version == 5
    assert load_checkpoint(previous_path(path)).version == 3
    assert sorted(os.listdir(tmp_path)) == ["adapter.safetensors", "adapter.safetensors.prev"]


def test_a_fresh_adapter_round_trips_before_any_training(tmp_path: Path) -> None:
    path = tmp_path / "adapter.safetensors"
    save_checkpoint(AdapterTrainer(DIM, 32), path)
    restored = load_checkpoint(path)
    assert (restored.in_dim, restored.out_dim, restored.version, len(restored.replay)) == (
        DIM,
        32,
        0,
        0,
    )
    assert restored.last_lesson_id is None


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01  # inside the tensor payload, which still parses
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip_a_byte])
def test_a_damaged_checkpoint_is_detected_and_the_previous_one_used(
    tmp_path: Path, damage: object, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "adapter.safetensors"
    save_checkpoint(trained(lessons=3), path)
    save_checkpoint(trained(lessons=5), path)
    damage(path)  # type: ignore[operator]

    with pytest.raises(CheckpointError, match=r"adapter\.safetensors"):
        load_checkpoint(path)
    with caplog.at_level(logging.WARNING, logger="shared.checkpoint"):
        fallback = load_latest(path)
    assert fallback is not None and fallback.version == 3
    assert "falling back" in caplog.text


def test_a_damaged_checkpoint_without_a_previous_one_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "adapter.safetensors"
    save_checkpoint(trained(lessons=3), path)
    _flip_a_byte(path)
    with pytest.raises(CheckpointError, match="checksum"):
        load_latest(path)


@pytest.mark.parametrize("damage", [_truncate, _flip_a_byte])
def test_saving_over_a_damaged_checkpoint_keeps_the_good_previous_one(
    tmp_path: Path, damage: object
) -> None:
    # Also when this very process wrote the damaged file: a save skips re-reading its own last
    # file only while inode, size and mtime are what it left (a same-size flip moves the mtime).
    path = tmp_path / "adapter.safetensors"
    save_checkpoint(trained(lessons=3), path)
    save_checkpoint(trained(lessons=5), path)
    damage(path)  # type: ignore[operator]
    save_checkpoint(trained(lessons=7), path)
    assert load_checkpoint(path).version == 7
    assert load_checkpoint(previous_path(path)).version == 3


def test_load_latest_without_any_checkpoint_returns_none(tmp_path: Path) -> None:
    assert load_latest(tmp_path / "adapter.safetensors") is None


def test_a_checkpoint_for_other_dims_or_model_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "adapter.safetensors"
    save_checkpoint(trained(), path)
    save_checkpoint(trained(), path)
    with pytest.raises(CheckpointError, match=r"in_dim=64 \(expected 384\)"):
        load_latest(path, in_dim=384, out_dim=DIM)
    with pytest.raises(CheckpointError, match=r"'test-embed'.*'mxbai-embed-large'"):
        load_latest(path, embedding_model="mxbai-embed-large")


class _Payload:
    """Unpickling this runs code: it creates the directory named by ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.makedirs, (str(self.marker),)


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_a_pickle_file_is_refused_and_never_unpickled(tmp_path: Path, writer: str) -> None:
    path = tmp_path / "adapter.safetensors"
    marker = tmp_path / "code-ran"
    payload = {"weights": torch.zeros(3), "payload": _Payload(marker)}
    if writer == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError, match=r"adapter\.safetensors"):
        load_latest(path)
    assert not marker.exists()
