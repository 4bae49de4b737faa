"""The numpy-only adapter: the same predictions as torch's, from the same verified checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shared.adapter import AdapterTrainer
from shared.adapter_numpy import NumpyAdapter
from shared.checkpoint import save_checkpoint
from shared.errors import CheckpointError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def trained(in_dim: int, out_dim: int, lessons: int = 20) -> AdapterTrainer:
    rng = np.random.default_rng(in_dim + out_dim)
    trainer = AdapterTrainer(in_dim, out_dim, 32, replay_capacity=16, embedding_model="test-embed")
    for index in range(lessons):
        x = rng.standard_normal((2, in_dim)).astype(np.float32)
        y = rng.standard_normal((2, out_dim)).astype(np.float32)
        trainer.learn(f"lesson-{index}", x, y, steps=3, batch_size=8)
    return trainer


@pytest.mark.parametrize(("in_dim", "out_dim"), [(48, 48), (48, 24), (24, 48)])
def test_predictions_match_torch_to_1e_5(tmp_path: Path, in_dim: int, out_dim: int) -> None:
    trainer = trained(in_dim, out_dim)
    path = save_checkpoint(trainer, tmp_path / "adapter.safetensors")
    adapter = NumpyAdapter.load(path, in_dim=in_dim, out_dim=out_dim, embedding_model="test-embed")

    x = np.random.default_rng(7).standard_normal((9, in_dim)).astype(np.float32)
    np.testing.assert_allclose(adapter.predict(x), trainer.predict(x), rtol=0, atol=1e-5)
    single = adapter.predict(x[0])
    assert single.shape == (out_dim,)
    np.testing.assert_allclose(single, trainer.predict(x[0]), rtol=0, atol=1e-5)
    assert (adapter.version, adapter.embedding_model) == (trainer.version, "test-embed")


def test_an_untrained_adapter_is_the_identity(tmp_path: Path) -> None:
    path = save_checkpoint(AdapterTrainer(16), tmp_path / "adapter.safetensors")
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    np.testing.assert_allclose(NumpyAdapter.load(path).predict(x), x, atol=1e-6)


def test_a_corrupt_checkpoint_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint(trained(16, 16), tmp_path / "adapter.safetensors")
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01  # inside the tensor payload, which still parses
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        NumpyAdapter.load(path)


def test_a_checkpoint_for_other_dims_or_model_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint(trained(16, 16), tmp_path / "adapter.safetensors")
    with pytest.raises(CheckpointError, match="in_dim=16"):
        NumpyAdapter.load(path, in_dim=32)
    with pytest.raises(CheckpointError, match="other-model"):
        NumpyAdapter.load(path, embedding_model="other-model")
    with pytest.raises(ValueError, match="16"):
        NumpyAdapter.load(path).predict(np.zeros(8, dtype=np.float32))


def test_importing_it_does_not_import_torch() -> None:
    code = "import sys, shared.adapter_numpy; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
