"""Study rounds without the model: examples, the validation split, locating the base, export.

The model-level proof (train, export, llama.cpp agrees with torch) is in
tests/integration/test_study_lora.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pupil_node.study import rss
from pupil_node.study.base import blob_from_modelfile, default_cache_dir, ollama_gguf_path
from pupil_node.study.data import (
    IGNORE,
    StudyLesson,
    batches,
    build_example,
    build_examples,
    collate,
    pupil_prompt,
    split_validation,
)
from shared.backends.embedded import transcript
from shared.backends.templates import render_prompt
from shared.errors import BackendError

BOS, EOS, PAD = 2, 1, 0


class CharTokenizer:
    """One token per character (code point + 10), BOS in front when asked: enough for data.py."""

    bos_token_id = BOS
    eos_token_id = EOS
    pad_token_id = PAD

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [ord(c) + 10 for c in text]
        return {"input_ids": [BOS, *ids] if add_special_tokens else ids}


def lesson(i: int, split: str = "train", answer: str = "Yeast.\nReason: gas.") -> StudyLesson:
    return StudyLesson(f"l-{i:03d}", f"Question number {i}?", answer, split)


def test_the_prompt_is_what_the_embedded_runtime_completes() -> None:
    goal = StudyLesson("x", "What makes bread rise?", "Yeast.", preferences=("be brief",))
    rendered = render_prompt("pupil.j2", goal.goal_text, ["be brief"], [])
    assert pupil_prompt(goal) == transcript([{"role": "user", "content": rendered}])
    assert pupil_prompt(goal).endswith("\n\nAnswer:")
    with_system = pupil_prompt(goal, system="Be kind.")
    assert with_system == "Be kind.\n\n" + rendered + "\n\nAnswer:"


def test_loss_is_on_the_answer_only_and_it_ends_with_eos() -> None:
    example = build_example(lesson(1), CharTokenizer(), max_len=512)
    assert example is not None
    prompt = pupil_prompt(lesson(1))
    assert example.input_ids[0] == BOS
    assert example.prompt_len == 1 + len(prompt)
    assert set(example.labels[: example.prompt_len]) == {IGNORE}
    answer = example.labels[example.prompt_len :]
    assert answer == example.input_ids[example.prompt_len :]
    # A space first: the model continues "Answer:" with a space-led word.
    assert answer[0] == ord(" ") + 10 and answer[-1] == EOS


def test_long_examples_lose_the_end_of_the_answer_never_the_prompt() -> None:
    tokenizer = CharTokenizer()
    prompt_len = 1 + len(pupil_prompt(lesson(1)))
    cut = build_example(lesson(1, answer="x" * 100), tokenizer, max_len=prompt_len + 10)
    assert cut is not None
    assert len(cut.input_ids) == prompt_len + 10 and cut.answer_tokens == 10
    assert EOS not in cut.labels
    assert build_example(lesson(1), tokenizer, max_len=prompt_len + 2) is None


def test_eval_lessons_never_reach_study() -> None:
    lessons = [lesson(i, "eval" if i % 3 == 0 else "train") for i in range(30)]
    study, validation = split_validation(lessons, 0.2)
    used = {x.lesson_id for x in study + validation}
    assert used == {x.lesson_id for x in lessons if x.split == "train"}
    examples = build_examples(lessons, CharTokenizer(), max_len=512)
    assert {e.lesson_id for e in examples} == used


def test_the_validation_side_of_a_lesson_never_changes_as_lessons_arrive() -> None:
    few, many = [lesson(i) for i in range(40)], [lesson(i) for i in range(400)]
    study_few, val_few = split_validation(few, 0.15)
    study_many, val_many = split_validation(many, 0.15)
    assert {x.lesson_id for x in study_few} <= {x.lesson_id for x in study_many}
    assert {x.lesson_id for x in val_few} <= {x.lesson_id for x in val_many}
    assert 0.08 < len(val_many) / len(many) < 0.22
    # Two lessons and none hashing low: one still validates.
    study, validation = split_validation([lesson(1), lesson(2)], 0.01)
    assert len(study) == 1 and len(validation) == 1


def test_batches_are_a_deterministic_shuffle() -> None:
    examples = build_examples([lesson(i) for i in range(10)], CharTokenizer(), max_len=512)
    first = [[e.lesson_id for e in b] for b in batches(examples, 3, seed=1)]
    again = [[e.lesson_id for e in b] for b in batches(list(reversed(examples)), 3, seed=1)]
    other = [[e.lesson_id for e in b] for b in batches(examples, 3, seed=2)]
    assert first == again != other
    assert [len(b) for b in first] == [3, 3, 3, 1]


def test_collate_pads_right_and_masks_padding() -> None:
    short = build_example(lesson(1, answer="a"), CharTokenizer(), max_len=512)
    long = build_example(lesson(2, answer="abcdef"), CharTokenizer(), max_len=512)
    assert short is not None and long is not None
    ids, mask, labels = collate([short, long], PAD)
    assert len(ids[0]) == len(ids[1]) == len(long.input_ids)
    pad = len(long.input_ids) - len(short.input_ids)
    assert ids[0][-pad:] == [PAD] * pad and mask[0][-pad:] == [0] * pad
    assert labels[0][-pad:] == [IGNORE] * pad and sum(mask[1]) == len(long.input_ids)


def test_the_ollama_blob_is_the_modelfile_from_line(tmp_path: Path) -> None:
    blob = tmp_path / "sha256-abc"
    blob.write_bytes(b"GGUF")
    modelfile = f"# Modelfile generated by ollama\nFROM {blob}\nTEMPLATE {{{{ .Prompt }}}}\n"
    assert blob_from_modelfile(modelfile) == blob
    with pytest.raises(BackendError, match="already has an adapter"):
        blob_from_modelfile(modelfile + "ADAPTER /x/lora.gguf\n")
    with pytest.raises(BackendError, match="not a file on this machine"):
        blob_from_modelfile("FROM /nowhere/sha256-def\n")
    with pytest.raises(BackendError, match="no FROM"):
        blob_from_modelfile("PARAMETER temperature 0\n")


@pytest.fixture
def show_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTP server answering Ollama's POST /api/show for model 'pupil'."""
    blob = tmp_path / "blobs" / "sha256-0123"
    blob.parent.mkdir()
    blob.write_bytes(b"GGUF")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            payload: dict[str, Any]
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path != "/api/show" or body.get("model") != "pupil":
                self.send_response(404)
                payload = {"error": "model not found"}
            else:
                self.send_response(200)
                payload = {"modelfile": f"FROM {blob}\n", "details": {}, "model_info": {}}
            data = json.dumps(payload).encode()
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", blob
    finally:
        server.shutdown()
        server.server_close()


def test_the_ollama_blob_is_found_through_api_show(show_server: tuple[str, Path]) -> None:
    url, blob = show_server
    assert ollama_gguf_path("pupil", url) == blob
    with pytest.raises(BackendError, match="cannot show model"):
        ollama_gguf_path("other", url)


def test_the_cache_dir_follows_env_then_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DISTILL_SWARM_STUDY_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "distill-swarm" / "study"
    assert default_cache_dir(tmp_path / "state") == tmp_path / "state" / "study-cache"
    monkeypatch.setenv("DISTILL_SWARM_STUDY_CACHE", str(tmp_path / "c"))
    assert default_cache_dir(tmp_path / "state") == tmp_path / "c"


def test_peak_rss_can_be_read_and_reset() -> None:
    rss.reset_peak()
    assert rss.peak_bytes() >= rss.current_bytes() > 0


def test_importing_study_does_not_import_torch() -> None:
    code = (
        "import sys, pupil_node.study, pupil_node.study.data, pupil_node.study.export;"
        "bad = {'torch', 'transformers', 'peft', 'gguf', 'llama_cpp'} & set(sys.modules);"
        "sys.exit(sorted(bad) if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- export -----------------------------------------------------------------------------------

IN, OUT, FF, R = 16, 32, 24, 4
Q = "base_model.model.model.layers.0.self_attn.q_proj"
DOWN = "base_model.model.model.layers.0.mlp.down_proj"


def base_gguf(path: Path) -> Path:
    """A one-block gemma3 'model': just the two projections the adapter touches."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "gemma3")
    # numpy shape (out, in) is ggml ne [in, out], as the converter writes HF Linear weights.
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((OUT, IN), dtype=np.float32))
    writer.add_tensor("blk.0.ffn_down.weight", np.zeros((IN, FF), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def peft_dir(path: Path, tensors: dict[str, np.ndarray], **config: Any) -> Path:
    from safetensors.numpy import save_file

    path.mkdir()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"r": R, "lora_alpha": 8, **config}))
    return path


def lora_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        f"{Q}.lora_A.weight": rng.standard_normal((R, IN)).astype(np.float32),
        f"{Q}.lora_B.weight": rng.standard_normal((OUT, R)).astype(np.float32),
        f"{DOWN}.lora_A.weight": rng.standard_normal((R, FF)).astype(np.float32),
        f"{DOWN}.lora_B.weight": rng.standard_normal((IN, R)).astype(np.float32),
    }


def test_export_writes_what_llama_cpp_loads(tmp_path: Path) -> None:
    import gguf

    from pupil_node.study.export import export_lora_gguf

    tensors = lora_tensors()
    out = export_lora_gguf(
        peft_dir(tmp_path / "peft", tensors), base_gguf(tmp_path / "base.gguf"),
        tmp_path / "adapter.gguf", dtype="f32",
    )  # fmt: skip
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["general.architecture"].contents() == "gemma3"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == 8.0
    by_name = {t.name: t for t in reader.tensors}
    assert set(by_name) == {
        "blk.0.attn_q.weight.lora_a", "blk.0.attn_q.weight.lora_b",
        "blk.0.ffn_down.weight.lora_a", "blk.0.ffn_down.weight.lora_b",
    }  # fmt: skip
    # llama.cpp's check: a.ne = [in, r], b.ne = [r, out] against the base's ne = [in, out].
    assert list(by_name["blk.0.attn_q.weight.lora_a"].shape) == [IN, R]
    assert list(by_name["blk.0.attn_q.weight.lora_b"].shape) == [R, OUT]
    assert list(by_name["blk.0.ffn_down.weight.lora_a"].shape) == [FF, R]
    assert list(by_name["blk.0.ffn_down.weight.lora_b"].shape) == [R, IN]
    np.testing.assert_array_equal(
        np.asarray(by_name["blk.0.attn_q.weight.lora_a"].data), tensors[f"{Q}.lora_A.weight"]
    )
    np.testing.assert_array_equal(
        np.asarray(by_name["blk.0.attn_q.weight.lora_b"].data), tensors[f"{Q}.lora_B.weight"]
    )
    half = export_lora_gguf(tmp_path / "peft", tmp_path / "base.gguf", tmp_path / "half.gguf")
    assert half.stat().st_size < out.stat().st_size
    assert not list(tmp_path.glob("*.partial"))


def test_export_refuses_what_llama_cpp_would_refuse_or_misread(tmp_path: Path) -> None:
    from pupil_node.study.export import export_lora_gguf

    base = base_gguf(tmp_path / "base.gguf")
    swapped = {
        k.replace("lora_A", "TMP").replace("lora_B", "lora_A").replace("TMP", "lora_B"): v
        for k, v in lora_tensors().items()
    }
    with pytest.raises(BackendError, match="base ne is"):
        export_lora_gguf(peft_dir(tmp_path / "swapped", swapped), base, tmp_path / "a.gguf")
    with pytest.raises(BackendError, match="rsLoRA"):
        export_lora_gguf(
            peft_dir(tmp_path / "rs", lora_tensors(), use_rslora=True), base, tmp_path / "b.gguf"
        )
    half = {k: v for k, v in lora_tensors().items() if "lora_B" not in k or "down" in k}
    with pytest.raises(BackendError, match="lacks lora_A or lora_B"):
        export_lora_gguf(peft_dir(tmp_path / "half", half), base, tmp_path / "c.gguf")
    embed = {"base_model.model.model.embed_tokens.lora_A.weight": np.zeros((R, 8), np.float32)}
    with pytest.raises(BackendError, match=r"no llama\.cpp projection"):
        export_lora_gguf(peft_dir(tmp_path / "embed", embed), base, tmp_path / "d.gguf")
    assert not list(tmp_path.glob("[a-d].gguf*"))


@pytest.mark.parametrize(
    ("dtype", "softcap"), [("float32", None), ("float32", 30.0), ("bfloat16", None)]
)
def test_the_chunked_frozen_head_loss_equals_cross_entropy(
    dtype: str, softcap: float | None
) -> None:
    """Same loss, same gradient for the hidden states as autograd through full logits."""
    torch = pytest.importorskip("torch")
    from pupil_node.study.train import frozen_head_nll

    generator = torch.Generator().manual_seed(0)
    dt = getattr(torch, dtype)
    weight = torch.randn(500, 16, generator=generator).to(dt)
    targets = torch.randint(0, 500, (37,), generator=generator)
    base = torch.randn(37, 16, generator=generator)

    hidden = base.to(dt).requires_grad_()
    logits = torch.nn.functional.linear(hidden, weight).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    expected = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    (expected / 37).backward()

    chunked = base.to(dt).requires_grad_()
    loss = frozen_head_nll(chunked, weight, targets, softcap, chunk=8)  # 37 = 4 chunks + 5
    (loss / 37).backward()

    tolerance = 1e-4 if dtype == "float32" else 2e-2
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=tolerance)
    assert chunked.grad is not None and hidden.grad is not None
    assert torch.allclose(chunked.grad.float(), hidden.grad.float(), atol=tolerance, rtol=tolerance)
    assert chunked.grad.dtype == hidden.dtype


def test_the_frozen_head_loss_keeps_no_gradient_state_without_grad() -> None:
    torch = pytest.importorskip("torch")
    from pupil_node.study.train import frozen_head_nll

    weight, hidden = torch.randn(50, 4), torch.randn(9, 4)
    with torch.no_grad():
        loss = frozen_head_nll(hidden, weight, torch.zeros(9, dtype=torch.long), chunk=4)
    assert not loss.requires_grad and float(loss) > 0


def test_the_base_shapes_read_from_the_header_are_gguf_readers() -> None:
    """The lean header reader agrees with the gguf package on the packaged base model."""
    gguf = pytest.importorskip("gguf")
    from pupil_node.study.base import embedded_gguf_path
    from pupil_node.study.export import base_tensor_shapes

    path = embedded_gguf_path()
    arch, shapes = base_tensor_shapes(path)
    reader = gguf.GGUFReader(str(path))
    field = reader.fields["general.architecture"]
    assert arch == bytes(field.parts[field.data[0]]).decode() == "gemma3"
    assert shapes == {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}
    assert shapes["blk.0.attn_q.weight"] == (640, 1024)
