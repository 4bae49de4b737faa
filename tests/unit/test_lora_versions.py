"""LoRA adapter versions on disk: what is served after promotion, damage, rollback and pruning."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pupil_node.state import NodeState
from pupil_node.study.base import file_sha256
from pupil_node.study.versions import GGUF_FILE, ROUND_FILE, AdapterStore


def finished_round(store: AdapterStore, number: int, version: int, payload: bytes) -> Path:
    """A candidate directory as a study round leaves it: adapter.gguf + round.json."""
    candidate = store.candidate_dir(number)
    (candidate / GGUF_FILE).write_bytes(payload)
    (candidate / "peft").mkdir()
    meta = {
        "version": version,
        "gguf_sha256": file_sha256(candidate / GGUF_FILE),
        "val_loss_after": 1.0 / version,
    }
    (candidate / ROUND_FILE).write_text(json.dumps(meta))
    return candidate


def test_a_new_store_serves_the_base_model(tmp_path: Path) -> None:
    assert AdapterStore(tmp_path / "lora").served() is None


def test_a_promoted_version_is_served_after_a_restart(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "lora")
    store.promote(finished_round(store, 1, 1, b"one"), 1)
    promoted = store.promote(finished_round(store, 2, 2, b"two"), 2)
    served = AdapterStore(tmp_path / "lora").served()
    assert served is not None and served.version == 2 == promoted.version
    assert served.gguf_path.read_bytes() == b"two"
    assert served.val_loss == pytest.approx(0.5)
    assert not list((tmp_path / "lora").glob("*.partial"))


def test_a_damaged_adapter_falls_back_to_the_previous_version(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = AdapterStore(tmp_path / "lora")
    store.promote(finished_round(store, 1, 1, b"one"), 1)
    newest = store.promote(finished_round(store, 2, 2, b"two"), 2)
    newest.gguf_path.write_bytes(b"tw0")  # bit rot on the SD card
    served = AdapterStore(tmp_path / "lora").served()
    assert served is not None and served.version == 1
    assert "falling back to version 1" in caplog.text
    # The fallback is remembered: the next start serves version 1 without a warning.
    caplog.clear()
    again = AdapterStore(tmp_path / "lora").served()
    assert again is not None and again.version == 1
    assert "falling back" not in caplog.text


def test_rollback_serves_the_previous_version_then_the_base(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "lora")
    store.promote(finished_round(store, 1, 1, b"one"), 1)
    store.promote(finished_round(store, 2, 2, b"two"), 2)
    older = store.rollback()
    assert older is not None and older.version == 1
    assert store.served() == older
    assert store.rollback() is None
    assert store.served() is None


def test_only_the_newest_versions_are_kept(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "lora", keep_versions=2)
    for version in (1, 2, 3, 4):
        store.promote(finished_round(store, version, version, f"v{version}".encode()), version)
    assert store.versions() == [3, 4]


def test_a_round_that_does_not_verify_is_not_served(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "lora")
    store.promote(finished_round(store, 1, 1, b"one"), 1)
    bad = finished_round(store, 2, 2, b"two")
    (bad / GGUF_FILE).write_bytes(b"changed after its checksum was taken")
    with pytest.raises(ValueError, match="do not verify"):
        store.promote(bad, 2)
    served = store.served()
    assert served is not None and served.version == 1


def run_rollback(state_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "distill_swarm", "pupil", "rollback", "--node-id", "pi-r",
         "--state-dir", str(state_dir)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_the_rollback_command_steps_back_one_version_at_a_time(tmp_path: Path) -> None:
    NodeState.open(tmp_path, "pi-r").close()
    store = AdapterStore(tmp_path / "lora")
    store.promote(finished_round(store, 1, 1, b"one"), 1)
    store.promote(finished_round(store, 2, 2, b"two"), 2)

    first = run_rollback(tmp_path)
    assert first.returncode == 0, first.stderr
    assert "rolled back from LoRA v2; LoRA v1 from the next start" in first.stdout
    second = run_rollback(tmp_path)
    assert "rolled back from LoRA v1; the base model from the next start" in second.stdout
    nothing = run_rollback(tmp_path)
    assert nothing.returncode == 2
    assert nothing.stderr.strip() == (
        "error: this node serves its base model already: nothing to roll back"
    )


def test_the_rollback_command_refuses_a_running_node(tmp_path: Path) -> None:
    running = NodeState.open(tmp_path, "pi-r")  # as a running pupil holds it
    try:
        refused = run_rollback(tmp_path)
    finally:
        running.close()
    assert refused.returncode != 0
    assert refused.stderr.startswith("error: ") and "in use" in refused.stderr
