"""Who sent a message: the broker-validated AMQP user must be the node the message names."""

from __future__ import annotations

from typing import Literal

from shared.errors import WrongSender


def check_identity(node_id: str, user_id: str | None) -> None:
    """Refuse a message whose sender (the broker-validated AMQP user) is not the node it names.

    Raises WrongSender (a DecodeError), so the message is dead-lettered with the reason.
    """
    if user_id != node_id:
        sender = "no user_id" if user_id is None else f"broker user '{user_id}'"
        raise WrongSender(f"message claims node '{node_id}' but was published by {sender}")


class IdentityCheck:
    """``master.verify_node_identity`` applied to one message: ``check(node_id, user_id)``.

    ``"auto"`` checks every sender except ``master_user``, the master's own broker user: when
    everything runs as one user (local development, the tests), that user may publish lessons
    and read every queue anyway, so checking what it claims protects nothing; a per-node user is
    always held to its own node id. A message without a user_id is checked (and refused): only a
    client that is not ours leaves it out, and it would otherwise slip past the check.
    """

    def __init__(self, setting: Literal["auto"] | bool, master_user: str | None) -> None:
        self.setting = setting
        self.master_user = master_user

    def required(self, user_id: str | None) -> bool:
        """True if a message sent as ``user_id`` must name that user as its node."""
        if self.setting == "auto":
            return user_id is None or user_id != self.master_user
        return bool(self.setting)

    def check(self, node_id: str, user_id: str | None) -> None:
        """Raise WrongSender if the message must be, and is not, from the node it names."""
        if self.required(user_id):
            check_identity(node_id, user_id)
