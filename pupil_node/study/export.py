"""A peft LoRA adapter as a llama.cpp LoRA GGUF, and llama.cpp's own loss with it.

The file is what llama.cpp's ``convert_lora_to_gguf.py`` writes for an architecture whose
projections it copies unchanged (Gemma's): metadata ``general.type = "adapter"``,
``general.architecture`` = the base's, ``adapter.type = "lora"``, ``adapter.lora.alpha``; for each
adapted projection, ``blk.N.<tensor>.weight.lora_a`` = peft's ``lora_A`` (torch shape
``(r, in)``) and ``.lora_b`` = ``lora_B`` (``(out, r)``), not transposed. GGUF stores shapes
reversed, so llama.cpp sees ``a.ne = [in, r]``, ``b.ne = [r, out]`` against the base tensor's
``ne = [in, out]``, and scales ``B·A`` by ``alpha / r``, as peft does.

Each base tensor's name and shape are checked against the base GGUF before anything is written,
so an adapter that llama.cpp would refuse fails here with a clear message.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from pupil_node.study.data import IGNORE, Example
from pupil_node.study.train import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from shared.errors import BackendError

if TYPE_CHECKING:
    import numpy as np

GGUF_DTYPES = ("f16", "f32")
_LORA_NAME = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


def base_tensor_shapes(base_gguf: Path) -> tuple[str, dict[str, tuple[int, ...]]]:
    """The base GGUF's architecture and ``name -> ne`` (ggml order) of its tensors.

    Read straight from the file's header. ``gguf.GGUFReader`` would do, but it parses every
    metadata value into numpy objects, 262,144 vocabulary strings among them: 0.7 GB at the
    end of a round, its peak (a unit test checks both agree).
    """
    with open(base_gguf, "rb") as f:
        magic, _version, n_tensors, n_kv = struct.unpack("<4sIQQ", f.read(24))
        if magic != b"GGUF":
            raise BackendError(f"'{base_gguf}' is not a GGUF file")
        arch = ""
        for _ in range(n_kv):
            key = _read_string(f)
            (kind,) = struct.unpack("<I", f.read(4))
            if key == "general.architecture" and kind == _GGUF_STRING:
                arch = _read_string(f)
            else:
                _skip_value(f, kind)
        shapes: dict[str, tuple[int, ...]] = {}
        for _ in range(n_tensors):
            name = _read_string(f)
            (n_dims,) = struct.unpack("<I", f.read(4))
            shapes[name] = struct.unpack(f"<{n_dims}Q", f.read(8 * n_dims))
            f.read(12)  # ggml type (u32) and data offset (u64)
    return arch, shapes


# GGUF metadata value types: fixed sizes by type id; 8 is a string, 9 an array.
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _read_string(f: BinaryIO) -> str:
    (length,) = struct.unpack("<Q", f.read(8))
    return f.read(length).decode("utf-8", errors="replace")


def _skip_value(f: BinaryIO, kind: int) -> None:
    if kind == _GGUF_STRING:
        (length,) = struct.unpack("<Q", f.read(8))
        f.seek(length, os.SEEK_CUR)
    elif kind == _GGUF_ARRAY:
        item, count = struct.unpack("<IQ", f.read(12))
        if item in _GGUF_SIZES:
            f.seek(_GGUF_SIZES[item] * count, os.SEEK_CUR)
        else:
            for _ in range(count):
                _skip_value(f, item)
    elif kind in _GGUF_SIZES:
        f.seek(_GGUF_SIZES[kind], os.SEEK_CUR)
    else:
        raise BackendError(f"unknown GGUF metadata type {kind}")


def export_lora_gguf(
    adapter_dir: Path, base_gguf: Path, out_path: Path, dtype: str = "f16"
) -> Path:
    """Write the peft adapter in ``adapter_dir`` as a llama.cpp LoRA GGUF at ``out_path``.

    Raises:
        BackendError: the adapter uses a feature llama.cpp's LoRA cannot express (rsLoRA, per-layer
            ranks or alphas, adapted embeddings), or does not fit the base model.
    """
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    if dtype not in GGUF_DTYPES:
        raise BackendError(f"adapter GGUF dtype must be one of {', '.join(GGUF_DTYPES)}")
    config = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())
    if config.get("use_rslora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise BackendError("llama.cpp LoRA has one alpha / r: no rsLoRA, rank or alpha patterns")
    alpha = float(config["lora_alpha"])
    weights = load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS))

    arch, shapes = base_tensor_shapes(base_gguf)
    arch_id = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), None)
    if arch_id is None:
        raise BackendError(f"the gguf package does not know architecture '{arch}'")
    n_blocks = 1 + max(
        (int(m.group(1)) for name in shapes if (m := re.match(r"blk\.(\d+)\.", name))), default=0
    )
    names = gguf.get_tensor_name_map(arch_id, n_blocks)

    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in weights.items():
        match = _LORA_NAME.match(key)
        if match is None:
            raise BackendError(f"adapter tensor '{key}' is not a LoRA A/B matrix")
        module = match["module"]
        target = names.get_name(module)
        if target is None or target.startswith("token_embd") or target == "output":
            raise BackendError(f"adapter tensor '{key}' has no llama.cpp projection to adapt")
        pairs.setdefault(target + ".weight", {})[match["ab"]] = tensor

    out_type = np.float16 if dtype == "f16" else np.float32
    partial = Path(out_path).with_name(f"{Path(out_path).name}.{os.getpid()}.partial")
    writer = gguf.GGUFWriter(str(partial), arch)
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for name in sorted(pairs, key=_block_order):
            a, b = _checked_pair(name, pairs[name], shapes)
            writer.add_tensor(name + ".lora_a", np.ascontiguousarray(a, dtype=out_type))
            writer.add_tensor(name + ".lora_b", np.ascontiguousarray(b, dtype=out_type))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(partial, out_path)
    return Path(out_path)


def _checked_pair(
    name: str, pair: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]]
) -> tuple[np.ndarray, np.ndarray]:
    """``(lora_A, lora_B)`` for base tensor ``name``, checked as llama.cpp will check them."""
    if set(pair) != {"A", "B"}:
        raise BackendError(f"adapter for '{name}' lacks lora_A or lora_B")
    a, b = pair["A"], pair["B"]  # (r, in), (out, r)
    base = shapes.get(name)
    if base is None:
        raise BackendError(f"base model has no tensor '{name}' (wrong base model?)")
    if base[:2] != (a.shape[1], b.shape[0]) or a.shape[0] != b.shape[1]:
        raise BackendError(
            f"adapter for '{name}' is A{tuple(a.shape)} B{tuple(b.shape)}, base ne is {base}"
        )
    return a, b


def _block_order(name: str) -> tuple[int, str]:
    match = re.match(r"blk\.(\d+)\.", name)
    return (int(match.group(1)) if match else -1, name)


def llama_answer_nll(
    base_gguf: Path,
    examples: Sequence[Example],
    lora_path: Path | None = None,
    *,
    n_threads: int | None = None,
) -> float:
    """Per-token NLL of the answers in ``examples`` as llama.cpp computes it.

    Loads ``base_gguf`` (plus ``lora_path`` through llama.cpp's own LoRA loader, as the embedded
    runtime would serve it) with logits for every position, evaluates each example's tokens and
    averages ``-log p(answer token)``. The context is only as long as the longest example:
    llama-cpp-python keeps ``n_ctx x vocabulary`` float32 scores.
    """
    import numpy as np
    from llama_cpp import Llama

    if not examples:
        return math.nan
    n_ctx = max(len(e.input_ids) for e in examples) + 8
    kwargs: dict[str, Any] = {"lora_path": str(lora_path)} if lora_path is not None else {}
    try:
        llama = Llama(
            model_path=str(base_gguf),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_threads=n_threads or os.cpu_count() or 1,
            logits_all=True,
            verbose=False,
            **kwargs,
        )
    except (ValueError, RuntimeError) as e:
        raise BackendError(f"llama.cpp cannot load '{base_gguf}' with '{lora_path}': {e}") from None
    total, count = 0.0, 0
    try:
        for example in examples:
            llama.reset()
            llama.eval(list(example.input_ids))
            for t in range(1, len(example.input_ids)):
                label = example.labels[t]
                if label == IGNORE:
                    continue
                # One row at a time: a float64 copy of every row would be 0.5 GB on its own.
                row = np.asarray(llama.scores[t - 1], dtype=np.float64)
                top = row.max()
                log_z = top + math.log(float(np.exp(row - top).sum()))
                total += log_z - row[label]
                count += 1
    finally:
        llama.close()
    return total / count if count else math.nan
