"""The master's trust rules (issue 11), without a broker: who must prove which node it is, which
nodes could have received which lesson, and when two processes speak for one node id."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from master.identity import IdentityCheck
from master.store import Store
from shared.config import load_settings
from shared.errors import DecodeError
from shared.messages import Embedding, Lesson, NodeInfo


def test_by_default_identity_is_checked_for_every_user_but_the_masters_own() -> None:
    assert load_settings(env={}).master.verify_node_identity == "auto"
    auto = IdentityCheck("auto", master_user="guest")
    auto.check("pi-8", "guest")  # local development: one shared user, who may do anything
    auto.check("pi-7", "pi-7")
    with pytest.raises(DecodeError, match="claims node 'pi-8' but was published by"):
        auto.check("pi-8", "pi-7")
    with pytest.raises(DecodeError, match="no user_id"):
        auto.check("pi-7", None)  # leaving the user out must not skip the check
    IdentityCheck(False, "guest").check("pi-8", "pi-7")
    with pytest.raises(DecodeError):
        IdentityCheck(True, "guest").check("pi-8", "guest")


@pytest.mark.parametrize(
    ("value", "expected"), [("true", True), ("false", False), ("auto", "auto")]
)
def test_the_identity_setting_reads_from_the_environment(value: str, expected: object) -> None:
    env = {"DISTILL_SWARM__MASTER__VERIFY_NODE_IDENTITY": value}
    assert load_settings(env=env).master.verify_node_identity == expected


def _lesson(n: int) -> Lesson:
    return Lesson(
        lesson_id=f"l{n}", task="t", prompt="p", goal_text="g", master_model="m",
        master_answer="a", reference=Embedding(model="e", dim=2, values=[1.0, 0.0]),
        split="train",
    )  # fmt: skip


def _info(node: str, instance: str | None = None) -> NodeInfo:
    return NodeInfo(
        node_id=node, software_version="0", pupil_model="p", embedding_model="e",
        embedding_dim=2, instance_id=instance,
    )  # fmt: skip


def test_only_nodes_heard_from_before_a_publish_are_waited_for(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite3")
    store.touch_node(_info("early"), "online")
    for n in range(2):
        store.save_lesson(_lesson(n), f"p{n}", n)
        store.mark_published(f"l{n}")
    time.sleep(0.01)  # distinct timestamps: the late node is heard from after both publishes
    store.touch_node(_info("late"), "online")
    assert store.receivable_pairs(["l0", "l1"], ["early", "late"]) == (2, 0)
    assert store.missed_lessons("late") == ["l0", "l1"]
    assert store.missed_lessons("early") == []
    rows = {r.node_id: r for r in store.node_status()}
    assert rows["late"].missed == ("l0", "l1") and rows["early"].missed == ()


def test_a_restart_is_one_node_and_two_processes_at_once_are_a_duplicate(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite3")
    store.touch_node(_info("pi-7", "old"), "online")
    assert store.record_instance("pi-7", "old") is None
    assert store.record_instance("pi-7", "old") is None
    assert store.record_instance("pi-7", "new") is None  # the old one went quiet: a restart
    assert store.record_instance("pi-7", "new") is None
    assert store.node_status()[0].state == "online"
    assert store.record_instance("pi-7", "old") == "new"  # the old one speaks again: two at once
    assert store.node_status()[0].state == "duplicate"
    assert store.node_status(duplicate_window_s=1e-6)[0].state == "online"  # long ago
