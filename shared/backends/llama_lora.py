"""A llama.cpp LoRA adapter (GGUF) applied per generation to a shared, already loaded model.

llama-cpp-python's ``Llama(lora_path=...)`` bakes one adapter into a freshly loaded model. A pupil
needs more: its base model must keep answering without the adapter (the honest ``plain``
baseline, and a master sharing the process in tests), and a newly promoted adapter version must
replace the old one without reloading the model. llama.cpp supports that directly: an adapter is
loaded once onto the *model* and switched on or off per *context* call
(``llama_set_adapters_lora``, which is cheap when nothing changes). Every generation sets the
adapters it wants, under the model's lock, so one generator's adapter never leaks into
another's answers.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.errors import BackendError

if TYPE_CHECKING:
    from llama_cpp import Llama

log = logging.getLogger(__name__)


class LlamaLora:
    """One LoRA adapter file loaded onto one llama.cpp model.

    Freed with :meth:`close` (or with the model at exit). Not thread-safe by itself: apply it
    only while holding the lock that serialises the model's use.
    """

    def __init__(self, llama: Llama, path: Path, scale: float = 1.0) -> None:
        """Load ``path`` (a llama.cpp LoRA GGUF) onto ``llama``'s model.

        Raises:
            BackendError: the file is missing, or llama.cpp refuses it (wrong base model,
                wrong tensor shapes, not an adapter).
        """
        import llama_cpp

        if not path.is_file():
            raise BackendError(f"LoRA adapter {path} does not exist")
        self.path = path
        self.scale = scale
        self._llama = llama
        self._closed = threading.Event()
        pointer = llama_cpp.llama_adapter_lora_init(llama._model.model, str(path).encode())
        if not pointer:
            raise BackendError(
                f"llama.cpp could not load LoRA adapter {path}: not an adapter for this model "
                "(see the log above for llama.cpp's reason)"
            )
        self._pointer: Any = pointer

    def close(self) -> None:
        """Free the adapter's tensors (idempotent). Call it under the model's lock."""
        if self._closed.is_set():
            return
        import llama_cpp

        self._closed.set()
        # The context must not keep pointing at freed tensors.
        apply_adapters(self._llama, None)
        llama_cpp.llama_adapter_lora_free(self._pointer)


def apply_adapters(llama: Llama, lora: LlamaLora | None) -> None:
    """Make ``lora`` (or no adapter at all) the one the next decode of ``llama`` uses.

    Call it under the model's lock, before each generation. Raises BackendError if llama.cpp
    refuses the change.
    """
    import llama_cpp

    if lora is None:
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 0)()
        scales = (ctypes.c_float * 0)()
        count = 0
    else:
        if lora._closed.is_set():
            raise BackendError(f"LoRA adapter {lora.path} was closed")
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(lora._pointer)
        scales = (ctypes.c_float * 1)(lora.scale)
        count = 1
    if llama_cpp.llama_set_adapters_lora(llama._ctx.ctx, adapters, count, scales):
        raise BackendError("llama.cpp refused to set the LoRA adapters on its context")
