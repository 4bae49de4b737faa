"""Study rounds: the pupil fine-tunes a LoRA on its own language model from the master's answers.

A round (``run_study_round``) loads the GGUF the pupil's runtime serves as a transformers model
(cached, dequantised), trains a peft LoRA on the node's train lessons with the loss on the
master's answer tokens only, and exports the adapter as a llama.cpp LoRA GGUF that the runtime
serves with ``lora_path=`` (or an Ollama model built with ``ADAPTER``). See docs/lora.md.

Importing this package is cheap: torch, transformers, peft and gguf (the ``study`` extra) are
imported only when a round runs. The master never imports it.
"""

from pupil_node.study.data import LessonLike, StudyLesson
from pupil_node.study.round import RoundResult, StudySettings, run_study_round
from pupil_node.study.train import TrainSettings

__all__ = [
    "LessonLike",
    "RoundResult",
    "StudyLesson",
    "StudySettings",
    "TrainSettings",
    "run_study_round",
]
