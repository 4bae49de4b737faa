"""Swarm learning: the nodes' LoRA adapters averaged into one that a new node starts from.

FedAvg weighted by lessons, done on the *updates* the adapters make, not on their factors: node
i's adapter changes a weight by ``dW_i = s_i * B_i @ A_i`` (``s = alpha / r``), and the swarm
adapter is the rank-r matrix closest to ``sum_i w_i dW_i / sum_i w_i``. Averaging the A and B
factors separately, as plain FedAvg of the parameters would, gives ``mean(B) @ mean(A)``, which
is not the mean update (two nodes' independent random A factors mostly cancel out).

The closest rank-r matrix is the truncated SVD. It is computed from the stacked factors (QR of
``[w_i s_i B_i]`` and of ``[A_i]^T``, then an SVD of a small ``(n r) x (n r)`` core), so nothing of
size ``out x in`` is ever formed. numpy only: averaging needs no torch.

``average_adapters`` writes a version directory like a study round's (``peft/``,
``adapter.gguf``, ``round.json``); ``distill-swarm pupil import-adapter`` makes it a node's
served version, and the node's next round resumes from it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pupil_node.study.train import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from shared.errors import ConfigError

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
SWARM_FILE = "swarm.json"


@dataclass(frozen=True)
class Source:
    """One node's adapter, how much it counts, and the base model it was trained on."""

    peft_dir: Path
    lessons: int
    base_gguf: Path | None = None


def source_from(path: Path) -> Source:
    """The adapter a node's state directory serves, or the one in a version directory.

    Its weight is the lessons of the round that made it (study and validation examples; a
    swarm adapter's own total).

    Raises:
        ConfigError: ``path`` is neither, or the node serves its base model.
    """
    from pupil_node.study.serving import LORA_DIR
    from pupil_node.study.versions import PEFT_DIR, ROUND_FILE, AdapterStore

    path = Path(path)
    if (path / LORA_DIR).is_dir():
        served = AdapterStore(path / LORA_DIR).served()
        if served is None:
            raise ConfigError(f"the node in '{path}' serves no LoRA adapter (its base model)")
        path = served.directory
    try:
        meta = json.loads((path / ROUND_FILE).read_text())
    except (OSError, ValueError):
        raise ConfigError(
            f"'{path}' is neither a pupil's state directory nor a LoRA version directory"
        ) from None
    lessons = int(meta.get("lessons") or 0) or int(meta.get("train_examples", 0)) + int(
        meta.get("val_examples", 0)
    )
    base = meta.get("base_gguf")
    return Source(path / PEFT_DIR, lessons, Path(base) if base and Path(base).is_file() else None)


@dataclass
class AverageResult:
    """What was averaged and how much of the mean update the swarm adapter keeps."""

    sources: list[dict[str, Any]]
    rank: int
    alpha: float
    modules: int
    # Share of the mean update's squared Frobenius norm the rank-r adapter keeps (1 = exact).
    energy_kept_min: float
    energy_kept_mean: float
    peft_dir: str = ""
    gguf_path: str = ""


def read_adapter(peft_dir: Path) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """A peft adapter's config and ``module -> {"A": (r, in), "B": (out, r)}`` in float32."""
    from safetensors.numpy import load_file

    peft_dir = Path(peft_dir)
    try:
        config = json.loads((peft_dir / ADAPTER_CONFIG).read_text())
        tensors = load_file(str(peft_dir / ADAPTER_WEIGHTS))
    except (OSError, ValueError) as e:
        raise ConfigError(f"'{peft_dir}' holds no readable LoRA adapter: {e}") from None
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise ConfigError(f"'{peft_dir}': tensor '{key}' is not a LoRA A/B matrix")
        modules.setdefault(match["module"], {})[match["ab"]] = value.astype(np.float32)
    return config, modules


def average_factors(
    factors: Sequence[tuple[np.ndarray, np.ndarray, float]], rank: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """Rank-``rank`` factors ``(A, B)`` with ``B @ A`` closest to ``sum_i c_i B_i @ A_i``.

    ``factors`` holds ``(A_i, B_i, c_i)``; the result is split evenly between the two factors
    (``B = U sqrt(S)``, ``A = sqrt(S) V^T``). Also returns the share of the squared norm kept.
    """
    b_stack = np.concatenate([c * b for _, b, c in factors], axis=1)  # (out, n r)
    a_stack = np.concatenate([a for a, _, _ in factors], axis=0)  # (n r, in)
    q_b, r_b = np.linalg.qr(b_stack.astype(np.float64))
    q_a, r_a = np.linalg.qr(a_stack.T.astype(np.float64))
    u, s, vt = np.linalg.svd(r_b @ r_a.T)
    total = float((s**2).sum())
    kept = float((s[:rank] ** 2).sum()) / total if total > 0 else 1.0
    root = np.sqrt(s[:rank])
    new_b = (q_b @ u[:, :rank]) * root
    new_a = root[:, None] * (vt[:rank] @ q_a.T)
    return new_a.astype(np.float32), new_b.astype(np.float32), kept


def average_adapters(
    sources: Sequence[Source], out_dir: Path, base_gguf: Path | None = None
) -> AverageResult:
    """Average ``sources`` into a version directory at ``out_dir`` (see the module docstring).

    The swarm adapter has the rank and alpha of the first source. Every source must adapt the
    same modules with the same shapes (the same base model and target modules).

    Raises:
        ConfigError: no source, a source with no lessons, or adapters that do not match.
    """
    from safetensors.numpy import save_file

    if not sources:
        raise ConfigError("nothing to average: give at least one adapter")
    if any(s.lessons <= 0 for s in sources):
        raise ConfigError("every adapter must come with a positive number of lessons")
    read = [read_adapter(s.peft_dir) for s in sources]
    config, first = read[0]
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    for (_, modules), source in zip(read[1:], sources[1:], strict=True):
        if set(modules) != set(first):
            raise ConfigError(f"'{source.peft_dir}' adapts other modules than the first adapter")
        for name, pair in modules.items():
            if pair["B"].shape[0] != first[name]["B"].shape[0] or (
                pair["A"].shape[1] != first[name]["A"].shape[1]
            ):
                raise ConfigError(f"'{source.peft_dir}': {name} has another shape (another base?)")
    total = float(sum(s.lessons for s in sources))
    scales = [
        x.lessons / total * float(c["lora_alpha"]) / int(c["r"])
        for x, (c, _) in zip(sources, read, strict=True)
    ]
    # peft applies B @ A * alpha / r: undo that scale, split evenly between the factors.
    root = np.float32(np.sqrt(rank / alpha))
    out_tensors: dict[str, np.ndarray] = {}
    kept: list[float] = []
    for name in sorted(first):
        factors = [(m[name]["A"], m[name]["B"], c) for (_, m), c in zip(read, scales, strict=True)]
        a, b, share = average_factors(factors, rank)
        out_tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a * root)
        out_tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(b * root)
        kept.append(share)

    out_dir = Path(out_dir)
    peft_dir = out_dir / "peft"
    peft_dir.mkdir(parents=True, exist_ok=True)
    save_file(out_tensors, str(peft_dir / ADAPTER_WEIGHTS))
    (peft_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    result = AverageResult(
        sources=[{"peft_dir": str(x.peft_dir), "lessons": x.lessons} for x in sources],
        rank=rank,
        alpha=alpha,
        modules=len(first),
        energy_kept_min=min(kept),
        energy_kept_mean=float(np.mean(kept)),
        peft_dir=str(peft_dir),
    )
    if base_gguf is not None:
        _export(result, out_dir, base_gguf)
    (out_dir / SWARM_FILE).write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result


def _export(result: AverageResult, out_dir: Path, base_gguf: Path) -> None:
    """The swarm adapter as a llama.cpp GGUF plus the ``round.json`` a version directory needs."""
    from pupil_node.study.base import file_sha256
    from pupil_node.study.export import export_lora_gguf
    from pupil_node.study.versions import GGUF_FILE, ROUND_FILE

    gguf = export_lora_gguf(Path(result.peft_dir), base_gguf, out_dir / GGUF_FILE)
    result.gguf_path = str(gguf)
    meta = {
        "version": 0,
        "swarm": True,
        "gguf_path": str(gguf),
        "gguf_sha256": file_sha256(gguf),
        "gguf_bytes": gguf.stat().st_size,
        "peft_dir": result.peft_dir,
        "base_gguf": str(base_gguf),
        "base_sha256": file_sha256(base_gguf),
        "val_loss_after": None,
        "lessons": sum(int(x["lessons"]) for x in result.sources),
    }
    (out_dir / ROUND_FILE).write_text(json.dumps(meta, indent=2) + "\n")
