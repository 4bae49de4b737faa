"""Swarm adapters: FedAvg of LoRA updates, importing one into a node, and the CLI around them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pupil_node.study.fedavg import Source, average_adapters, read_adapter
from pupil_node.study.versions import AdapterStore
from shared.errors import ConfigError

pytest.importorskip("safetensors")

# A real projection of the packaged base (Gemma 3 270M, layer 0's q_proj: 640 -> 1024), so the
# swarm adapter exports against the real GGUF.
MODULE = "base_model.model.model.layers.0.self_attn.q_proj"
IN, OUT = 640, 1024


def write_adapter(directory: Path, a: np.ndarray, b: np.ndarray, alpha: float) -> Path:
    """A peft adapter directory with one adapted module."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True)
    save_file(
        {
            f"{MODULE}.lora_A.weight": a.astype(np.float32),
            f"{MODULE}.lora_B.weight": b.astype(np.float32),
        },
        str(directory / "adapter_model.safetensors"),
    )
    config = {
        "r": a.shape[0],
        "lora_alpha": alpha,
        "target_modules": ["q_proj"],
        "peft_type": "LORA",
    }
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def update(peft_dir: Path) -> np.ndarray:
    """The weight change the adapter makes: alpha / r * B @ A."""
    config, modules = read_adapter(peft_dir)
    pair = modules[MODULE]
    return float(config["lora_alpha"]) / int(config["r"]) * pair["B"].astype(np.float64) @ pair["A"]


def random_factors(rng: np.random.Generator, rank: int = 4) -> tuple[np.ndarray, np.ndarray]:
    return rng.normal(size=(rank, IN)) * 0.05, rng.normal(size=(OUT, rank)) * 0.05


def test_one_adapter_averages_to_itself(tmp_path: Path) -> None:
    a, b = random_factors(np.random.default_rng(0))
    source = write_adapter(tmp_path / "a", a, b, alpha=8.0)
    result = average_adapters([Source(source, 10)], tmp_path / "swarm")
    assert np.allclose(update(Path(result.peft_dir)), update(source), atol=1e-6)
    assert result.energy_kept_min == pytest.approx(1.0)


def test_the_swarm_update_is_the_lesson_weighted_mean_of_the_updates(tmp_path: Path) -> None:
    """Two nodes whose updates share row and column spaces: the mean is exactly rank r."""
    rng = np.random.default_rng(1)
    u = np.linalg.qr(rng.normal(size=(OUT, 4)))[0]
    v = np.linalg.qr(rng.normal(size=(IN, 4)))[0]
    one = write_adapter(tmp_path / "one", v.T, u * [1.0, 2.0, 3.0, 4.0], alpha=8.0)
    two = write_adapter(tmp_path / "two", v.T, u * [4.0, -1.0, 0.5, 2.0], alpha=4.0)
    result = average_adapters([Source(one, 30), Source(two, 10)], tmp_path / "swarm")
    expected = 0.75 * update(one) + 0.25 * update(two)
    assert np.allclose(update(Path(result.peft_dir)), expected, atol=1e-5)
    assert result.rank == 4 and result.alpha == 8.0
    assert result.energy_kept_min == pytest.approx(1.0)


def test_independent_nodes_get_the_best_rank_r_part_of_the_mean_update(tmp_path: Path) -> None:
    """Independent nodes: the mean update has rank 2r; the swarm keeps its best rank-r part."""
    rng = np.random.default_rng(2)
    sources = [write_adapter(tmp_path / n, *random_factors(rng), alpha=8.0) for n in ("x", "y")]
    result = average_adapters([Source(s, 1) for s in sources], tmp_path / "swarm")
    mean = (update(sources[0]) + update(sources[1])) / 2
    singular = np.linalg.svd(mean, compute_uv=False)
    best_error = np.sqrt((singular[4:] ** 2).sum())
    ours = np.linalg.norm(update(Path(result.peft_dir)) - mean)
    assert ours == pytest.approx(best_error, rel=1e-4)
    assert result.energy_kept_min == pytest.approx((singular[:4] ** 2).sum() / (singular**2).sum())


def test_adapters_that_do_not_match_are_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    good = write_adapter(tmp_path / "good", *random_factors(rng), alpha=8.0)
    narrow = write_adapter(
        tmp_path / "narrow", rng.normal(size=(4, 320)), rng.normal(size=(OUT, 4)), 8.0
    )
    with pytest.raises(ConfigError, match="another shape"):
        average_adapters([Source(good, 1), Source(narrow, 1)], tmp_path / "out")
    with pytest.raises(ConfigError, match="positive number of lessons"):
        average_adapters([Source(good, 0)], tmp_path / "out2")
    with pytest.raises(ConfigError, match="no readable LoRA adapter"):
        average_adapters([Source(tmp_path / "missing", 1)], tmp_path / "out3")


def version_dir(path: Path, rng: np.random.Generator, lessons: int) -> Path:
    """A study round's version directory: peft/ and round.json (lessons = examples)."""
    write_adapter(path / "peft", *random_factors(rng), alpha=8.0)
    (path / "round.json").write_text(
        json.dumps({"version": 1, "train_examples": lessons - 2, "val_examples": 2})
    )
    return path


def test_the_cli_averages_then_a_new_node_serves_the_swarm_adapter(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    from distill_swarm.cli import app

    rng = np.random.default_rng(4)
    one, two = version_dir(tmp_path / "n1", rng, 30), version_dir(tmp_path / "n2", rng, 10)
    runner = CliRunner()
    swarm = tmp_path / "swarm"
    done = runner.invoke(
        app, ["pupil", "average-adapters", str(one), str(two), "--out", str(swarm)]
    )
    assert done.exit_code == 0, done.output
    assert "2 adapters (40 lessons)" in done.output
    assert json.loads((swarm / "round.json").read_text())["lessons"] == 40
    assert (swarm / "adapter.gguf").stat().st_size > 0

    again = runner.invoke(app, ["pupil", "average-adapters", str(one), "--out", str(swarm)])
    assert again.exit_code != 0 and "not empty" in again.output

    state = tmp_path / "state"
    args = [
        "pupil",
        "import-adapter",
        str(swarm),
        "--node-id",
        "newcomer",
        "--state-dir",
        str(state),
    ]
    imported = runner.invoke(app, args)
    assert imported.exit_code == 0, imported.output
    served = AdapterStore(state / "lora").served()
    assert served is not None and served.version == 1
    assert np.allclose(update(served.peft_dir), update(swarm / "peft"))

    back = runner.invoke(
        app, ["pupil", "rollback", "--node-id", "newcomer", "--state-dir", str(state)]
    )
    assert back.exit_code == 0 and AdapterStore(state / "lora").served() is None


def test_import_and_rollback_refuse_without_leaving_a_state_directory(tmp_path: Path) -> None:
    """A wrong path or a mistyped node id fails in one line and creates nothing."""
    from distill_swarm.cli import app

    (tmp_path / "empty").mkdir()
    state = tmp_path / "s"
    runner = CliRunner()
    args = ["pupil", "import-adapter", str(tmp_path / "empty"), "--node-id", "n"]
    result = runner.invoke(app, [*args, "--state-dir", str(state)])
    assert result.exit_code == 2
    assert "not an adapter version directory" in result.output
    assert not state.exists()

    back = runner.invoke(app, ["pupil", "rollback", "--node-id", "typo", "--state-dir", str(state)])
    assert back.exit_code == 2
    assert "has no state directory" in back.output
    assert not state.exists()
