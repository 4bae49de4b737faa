"""A master and its pupils on the stub broker, with the fast deterministic backends.

The services' own consumers (``report_consumer``, ``lesson_consumer``, ...) are built on a
:class:`~shared.broker.stub.StubBroker`, so the unit tests run the production wiring (queues,
declarations, hooks, settlement rules) with no RabbitMQ, no threads and no model: each
``drain()`` handles what is queued, on the test's thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from bench.fast_backend import EchoGenerator, HashingEmbedder
from master.prompts import PromptItem
from master.service import MasterService
from master.store import Store
from pupil_node.node import PupilNode
from pupil_node.service import PupilService
from shared.broker import MessageConsumer
from shared.broker.stub import StubBroker, StubConsumer
from shared.config import BrokerConfig, LessonsConfig, MasterConfig, PupilConfig, Settings

DIM = 16  # embeddings this small keep the adapters' training to milliseconds
NAMESPACE = "stub"


def stub(consumer: MessageConsumer) -> StubConsumer:
    """``consumer`` as the stub consumer it is (a service built on a StubBroker makes those)."""
    assert isinstance(consumer, StubConsumer)
    return consumer


def prompts(count: int, split: Literal["train", "eval"] = "train") -> list[PromptItem]:
    """``count`` distinct prompts of one split."""
    return [
        PromptItem(
            id=f"{split}-{i}", goal_text=f"Say something about {split} topic {i}", split=split
        )
        for i in range(count)
    ]


@dataclass
class StubSwarm:
    """One master and any number of pupils on one stub broker, under ``root``."""

    root: Path
    master_fields: dict[str, Any] = field(default_factory=dict)
    # Everything is sent as the default URL's user, as the tests' real brokers do.
    broker: StubBroker = field(default_factory=StubBroker)

    def settings(self, **pupil_fields: Any) -> Settings:
        return Settings(
            broker=BrokerConfig(namespace=NAMESPACE),
            # The stub has per-node queues only: the stream (offsets, retention) is tested on
            # the real broker (tests/integration/test_lesson_stream.py).
            lessons=LessonsConfig(transport="queues"),
            master=MasterConfig(metrics_port=0, ceiling=False, **self.master_fields),
            pupil=PupilConfig(metrics_port=0, min_free_bytes=0, **pupil_fields),
        )

    def master(self, items: list[PromptItem]) -> MasterService:
        """A master that teaches ``items``, with its store under ``root``."""
        store = Store(self.root / "master.sqlite3")
        settings = self.settings()
        return MasterService(
            settings, EchoGenerator(), HashingEmbedder(DIM), store, items, broker=self.broker
        )

    def pupil(
        self, node_id: str, embedder: HashingEmbedder | None = None, **fields: Any
    ) -> PupilService:
        """A pupil with its state under ``root``; it has said hello (the master's queue has it)."""
        settings = self.settings(node_id=node_id, state_dir=self.root / node_id, **fields)
        embedder = embedder or HashingEmbedder(DIM)
        node = PupilNode(node_id, settings.pupil, EchoGenerator(), embedder)
        return PupilService(settings, node, broker=self.broker)
