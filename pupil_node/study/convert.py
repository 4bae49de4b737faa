"""A GGUF dequantised into a transformers checkpoint, one tensor (and one slice of rows) at a time.

transformers can load a GGUF itself (``from_pretrained(dir, gguf_file=...)``), but it holds every
dequantised tensor, a float32 copy of the largest one and then the model built from them: 2.8 GiB
for Gemma 3 270M, whose 262,144 x 640 embedding alone is 0.67 GB in float32. A Pi 4 has 4 GB and
keeps serving lessons while it studies. ``convert_gguf`` writes the same checkpoint while holding
only the result in the training dtype and one slice of rows in float32, using transformers' own
name map and tensor fix-ups (Gemma's norms are stored as ``1 + w``, llama's q/k are permuted), so
the weights are exactly the ones transformers would produce (``bench/lora_round.py
--measure-load`` compares them).

Only architectures whose fix-ups work on a whole tensor at a time stream (``STREAMED``); any other
falls back to transformers' loader in ``base.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# transformers' GGUF tensor processors that leave the vocabulary-sized tensors alone.
STREAMED = {"gemma2", "gemma3", "llama", "qwen2", "qwen3", "mistral"}
# Tensors dequantised in slices of rows: the only ones large enough to matter.
SLICED = {"token_embd.weight", "output.weight"}
ROWS_PER_SLICE = 8192
WEIGHTS_FILE = "model.safetensors"


class NotStreamable(Exception):
    """This GGUF needs transformers' own (whole-file) loader."""


def gguf_architecture(gguf_path: Path) -> str:
    """The GGUF's ``general.architecture`` (e.g. ``gemma3``), read from its header alone."""
    from pupil_node.study.export import base_tensor_shapes

    return base_tensor_shapes(gguf_path)[0]


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: Any) -> None:
    """Write ``gguf_path`` as ``out_dir/model.safetensors`` + ``config.json`` in torch ``dtype``.

    Raises:
        NotStreamable: the architecture is not in ``STREAMED``, or a parameter of the model
            found no tensor in the file.
    """
    import numpy as np
    import torch
    from gguf import GGUFReader, dequantize
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    gguf_path = Path(gguf_path)
    architecture = gguf_architecture(gguf_path)
    if architecture not in STREAMED:
        raise NotStreamable(f"architecture '{architecture}' is not streamed")
    config = AutoConfig.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True
    )
    with torch.device("meta"):  # names and shapes only: no memory
        skeleton = AutoModelForCausalLM.from_config(config)
    # The processors read head counts from the config (as a dict); parsing the file again for
    # them would cost as much as the config itself (262k vocabulary strings).
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config.to_dict())
    names = get_gguf_hf_weights_map(skeleton, processor)

    tensors: dict[str, Any] = {}
    for tensor in GGUFReader(str(gguf_path)).tensors:
        if tensor.name not in names:
            continue
        if tensor.name in SLICED and tensor.data.ndim == 2:
            # GGUF shapes are ggml's ne, innermost first: (row length, rows).
            result = torch.empty((int(tensor.shape[1]), int(tensor.shape[0])), dtype=dtype)
            for start in range(0, result.shape[0], ROWS_PER_SLICE):
                part = dequantize(tensor.data[start : start + ROWS_PER_SLICE], tensor.tensor_type)
                result[start : start + ROWS_PER_SLICE] = torch.from_numpy(
                    np.ascontiguousarray(part)
                )
        else:
            weights = dequantize(tensor.data, tensor.tensor_type)
            weights = processor.process(weights=weights, name=tensor.name).weights
            result = torch.from_numpy(np.array(weights, copy=True)).to(dtype)
        tensors[names[tensor.name]] = result

    expected = set(skeleton.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        expected.discard("lm_head.weight")
    missing = sorted(expected - set(tensors))
    if missing:
        raise NotStreamable(f"no tensor in the GGUF for {', '.join(missing[:3])}")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    config.dtype = dtype  # what the checkpoint holds
    config.architectures = [type(skeleton).__name__]
    config.__dict__.pop("quantization_config", None)
    config.save_pretrained(out_dir)
