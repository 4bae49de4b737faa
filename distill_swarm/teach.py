"""Teach a running master: prompts sent through the broker become lessons for the whole swarm.

    from distill_swarm.teach import TeachClient
    from master.prompts import PromptItem

    with TeachClient(settings) as client:
        for result in client.teach([PromptItem(id="p1", goal_text="Explain DNS briefly")]):
            print(result.prompt_id, result.outcome, result.lesson_id)

The master stores each request before it acks it, answers it with its model, publishes the
lesson and answers with a :class:`~shared.messages.TeachResult`: ``published``, or
``already_published`` when the same prompt (id and text) was taught to the same master model
before; nothing new is sent then. ``refused``: a train prompt whose text is an eval prompt's;
``failed``: the master's model could not answer it (teach it again).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import pika.exceptions as pex

from master.prompts import PromptItem
from shared.broker import broker_user, close_quietly, connect, properties
from shared.config import Settings
from shared.errors import ConnectionClosed, DecodeError, PublishNotConfirmed
from shared.messages import Teach, TeachResult, decode, encode
from shared.topology import Topology

# The master answers one prompt in seconds with a GPU and in minutes on a CPU: wait that long.
DEFAULT_TIMEOUT_S = 600.0
REPLY_POLL_S = 0.2


def teach_message(item: PromptItem) -> Teach:
    """The wire message of one prompt item."""
    return Teach(
        prompt_id=item.id,
        goal_text=item.goal_text,
        task=item.task,
        preferences=item.preferences,
        instructions=item.instructions,
        split=item.split,
    )


class TeachClient:
    """One broker connection for teaching; use as a context manager or ``close()``.

    Not thread-safe: one thread per client (pika's rule).
    """

    def __init__(self, settings: Settings) -> None:
        self.topology = Topology(settings.broker.namespace, settings.broker.quorum_queues)
        self._user_id = broker_user(settings.broker.url)
        self._connection = connect(settings.broker)
        try:
            self._channel = self._connection.channel()
            # Exclusive: the broker deletes it with this connection, and nobody else reads it.
            declared = self._channel.queue_declare("", exclusive=True)
            self._reply_queue = str(declared.method.queue)
            self._channel.confirm_delivery()
        except (pex.AMQPError, OSError) as exc:
            self.close()
            raise ConnectionClosed(f"cannot set up teaching: {exc!r}") from None

    def __enter__(self) -> TeachClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection."""
        close_quietly(self._connection)

    def send(self, items: Iterable[PromptItem], wait: bool = True) -> dict[str, str]:
        """Publish one teach request per item (each confirmed by the broker).

        Returns correlation id -> prompt id. ``wait=False`` asks for no answer: the master stores
        what became of each request all the same. Raises PublishNotConfirmed when no master has
        declared the teach queue yet.
        """
        sent: dict[str, str] = {}
        for item in items:
            message = teach_message(item)
            extra: dict[str, Any] = {"user_id": self._user_id}
            if wait:
                extra.update(reply_to=self._reply_queue, correlation_id=message.message_id)
            try:
                self._channel.basic_publish(
                    self.topology.teach_exchange,
                    self.topology.TEACH_KEY,
                    encode(message),
                    properties(message.message_id, **extra),
                    mandatory=True,
                )
            except (pex.UnroutableError, pex.NackError, pex.ChannelClosedByBroker) as exc:
                raise PublishNotConfirmed(
                    f"no master takes teach requests on '{self.topology.teach_exchange}' "
                    f"({_reason(exc)}): start the master first (it declares the teach queue)"
                ) from None
            except (pex.AMQPError, OSError) as exc:
                raise ConnectionClosed(f"lost the broker while teaching: {exc!r}") from None
            sent[message.message_id] = item.id
        return sent

    def results(
        self,
        sent: dict[str, str],
        timeout_s: float = DEFAULT_TIMEOUT_S,
        on_result: Callable[[TeachResult], None] | None = None,
    ) -> list[TeachResult]:
        """Wait for the master's answer to each request of ``sent``, in the order they come.

        Raises TimeoutError when some did not come within ``timeout_s`` (the master may still
        answer them: the requests are stored).
        """
        waiting = dict(sent)
        results: list[TeachResult] = []
        deadline = time.monotonic() + timeout_s
        try:
            while waiting:
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0:
                    raise TimeoutError(
                        f"{len(waiting)} of {len(sent)} prompts not answered within "
                        f"{timeout_s:.0f}s"
                    )
                method, props, body = self._channel.basic_get(self._reply_queue, auto_ack=True)
                if method is None:
                    self._connection.process_data_events(min(REPLY_POLL_S, remaining_s))
                    continue
                try:
                    result = decode(body, TeachResult)
                except DecodeError:
                    continue  # not the master's answer; nothing to wait for there
                if waiting.pop(props.correlation_id or "", None) is None:
                    continue
                results.append(result)
                if on_result is not None:
                    on_result(result)
        except (pex.AMQPError, OSError) as exc:
            raise ConnectionClosed(f"lost the broker while waiting for answers: {exc!r}") from None
        return results

    def teach(
        self,
        items: Iterable[PromptItem],
        timeout_s: float = DEFAULT_TIMEOUT_S,
        on_result: Callable[[TeachResult], None] | None = None,
    ) -> list[TeachResult]:
        """Send ``items`` and wait for every answer (see :meth:`send` and :meth:`results`)."""
        return self.results(self.send(items), timeout_s, on_result)


def teach(
    settings: Settings, items: Iterable[PromptItem], timeout_s: float = DEFAULT_TIMEOUT_S
) -> list[TeachResult]:
    """Teach ``items`` to the running master of ``settings`` and return its answers."""
    with TeachClient(settings) as client:
        return client.teach(items, timeout_s)


def _reason(exc: Exception) -> str:
    if isinstance(exc, pex.ChannelClosedByBroker):
        return str(exc.reply_text)
    return "unroutable" if isinstance(exc, pex.UnroutableError) else "refused by the broker"
