"""Who sent a message: the broker-validated AMQP user must be the node the message names."""

from __future__ import annotations

from shared.errors import DecodeError


def check_identity(node_id: str, user_id: str | None) -> None:
    """Refuse a message whose sender (the broker-validated AMQP user) is not the node it names.

    Raises DecodeError, so the message is dead-lettered with the reason.
    """
    if user_id != node_id:
        sender = "no user_id" if user_id is None else f"broker user '{user_id}'"
        raise DecodeError(f"message claims node '{node_id}' but was published by {sender}")
