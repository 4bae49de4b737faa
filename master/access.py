"""Per-node RabbitMQ users, created and removed through the management HTTP API.

One user per pupil node, allowed exactly what the pupil service does and nothing more
(docs/security.md has the reason for every grant):

- configure: its own queue only (declare it; it cannot delete or redeclare shared exchanges);
- write: its own queue (binding it), the reports and control exchanges (publishing) and the
  dead-letter exchange (its queue's DLX, and where it dead-letters what it cannot decode);
- read: its own queue (consuming), the lessons exchange (binding its queue to it) and the shared
  queue of every offloadable job kind (consuming jobs; the master declares those queues, and a
  critical kind has none).

Users made here carry the tag :data:`PUPIL_TAG`, so ``remove_node`` can refuse to delete a user it
did not make (the admin's or the master's, say). Passwords are never logged or put in an error.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.errors import BrokerError, ConfigError
from shared.jobs import OFFLOADABLE
from shared.topology import Topology

# A management tag with no meaning to RabbitMQ: it grants nothing and marks the user as ours.
PUPIL_TAG = "distill-swarm-pupil"
HTTP_TIMEOUT_S = 15.0
# token_urlsafe(24) gives 32 characters of [A-Za-z0-9_-]: 192 bits, and safe unencoded in a URL.
GENERATED_PASSWORD_BYTES = 24


@dataclass(frozen=True)
class Permissions:
    """RabbitMQ's three permission regexes of one user on one vhost."""

    configure: str
    write: str
    read: str


def _literal(name: str) -> str:
    # Names are validated to [A-Za-z0-9_.-]; escape anything else regardless. "-" and "_" are
    # literal outside a character class, so they stay readable.
    return re.sub(r"([^A-Za-z0-9_-])", r"\\\1", name)


def _one_of(names: list[str]) -> str:
    return "^(" + "|".join(_literal(n) for n in names) + ")$"


def pupil_permissions(topology: Topology, node_id: str) -> Permissions:
    """The least a pupil needs with ``broker.declare_exchanges = false``."""
    own = topology.pupil_queue(node_id)
    return Permissions(
        configure=f"^{_literal(own)}$",
        write=_one_of(
            [own, topology.reports_exchange, topology.control_exchange, topology.dead_exchange]
        ),
        read=_one_of(
            [own, topology.lessons_exchange, *(topology.job_queue(k) for k in OFFLOADABLE)]
        ),
    )


def generate_password() -> str:
    """A fresh random password that needs no escaping in an AMQP URL."""
    return secrets.token_urlsafe(GENERATED_PASSWORD_BYTES)


def node_url(broker_url: str, node_id: str, password: str, vhost: str) -> str:
    """The AMQP URL a node connects with: ``broker_url`` plus its credentials and vhost."""
    parts = urllib.parse.urlsplit(broker_url)
    if parts.scheme not in {"amqp", "amqps"} or not parts.hostname or "@" in parts.netloc:
        raise ConfigError(
            f"--broker-url {broker_url!r}: give amqp://HOST[:PORT] or amqps://HOST[:PORT], "
            "without credentials"
        )
    user = urllib.parse.quote(node_id, safe="")
    secret = urllib.parse.quote(password, safe="")
    path = "/" + urllib.parse.quote(vhost, safe="")
    return urllib.parse.urlunsplit((parts.scheme, f"{user}:{secret}@{parts.netloc}", path, "", ""))


class ManagementAPI:
    """The few calls of RabbitMQ's management HTTP API that node users need.

    Every failure becomes a one-line :class:`BrokerError`; the admin password (and any password
    passed to :meth:`put_user`) is scrubbed from whatever text the server sends back.
    """

    def __init__(
        self,
        url: str,
        user: str,
        password: str,
        ca_file: Path | None = None,
        timeout_s: float = HTTP_TIMEOUT_S,
    ) -> None:
        self.url = url.rstrip("/")
        self._user = user
        self._auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self._secrets = {password}
        self._timeout_s = timeout_s
        self._context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            if secret:
                text = text.replace(secret, "***")
        return " ".join(text.split())[:300]

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """Send one request; returns the decoded JSON (None if empty, or on 404 for GET)."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.url}/api/{path}", data=data, method=method)
        request.add_header("Authorization", self._auth)
        request.add_header("Content-Type", "application/json")
        try:
            context = self._context if self.url.startswith("https:") else None
            with urllib.request.urlopen(request, timeout=self._timeout_s, context=context) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404 and method in {"GET", "DELETE"}:
                return None
            raise BrokerError(self._http_error(method, path, exc)) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            raise BrokerError(
                f"cannot reach the RabbitMQ management API at {self.url}: "
                f"{self._scrub(str(reason))}; is the rabbitmq_management plugin enabled there?"
            ) from None
        return json.loads(raw) if raw.strip() else None

    def _http_error(self, method: str, path: str, exc: urllib.error.HTTPError) -> str:
        if exc.code in {401, 403}:
            return (
                f"the management API at {self.url} refused user '{self._user}': wrong password, "
                "or the user lacks the administrator tag"
            )
        try:
            reason = str(json.loads(exc.read()).get("reason", ""))
        except (ValueError, AttributeError, OSError):
            reason = ""
        path_only = path.split("?")[0]
        return f"{method} {self.url}/api/{path_only} failed: HTTP {exc.code} {self._scrub(reason)}"

    @staticmethod
    def _q(name: str) -> str:
        return urllib.parse.quote(name, safe="")

    def vhost_exists(self, vhost: str) -> bool:
        """True if the vhost exists."""
        return self._request("GET", f"vhosts/{self._q(vhost)}") is not None

    def get_user(self, name: str) -> dict[str, Any] | None:
        """The user's record (name, tags, ...) or None."""
        found = self._request("GET", f"users/{self._q(name)}")
        return found if isinstance(found, dict) else None

    def put_user(self, name: str, password: str, tags: str) -> None:
        """Create or overwrite a user."""
        self._secrets.add(password)
        self._request("PUT", f"users/{self._q(name)}", {"password": password, "tags": tags})

    def put_permissions(self, vhost: str, user: str, permissions: Permissions) -> None:
        """Set a user's configure/write/read regexes on one vhost."""
        body = {
            "configure": permissions.configure,
            "write": permissions.write,
            "read": permissions.read,
        }
        self._request("PUT", f"permissions/{self._q(vhost)}/{self._q(user)}", body)

    def delete_user(self, name: str) -> None:
        """Delete a user (and with it every permission it had)."""
        self._request("DELETE", f"users/{self._q(name)}")

    def delete_queue(self, vhost: str, queue: str) -> bool:
        """Delete a queue; False if there was none."""
        path = f"queues/{self._q(vhost)}/{self._q(queue)}"
        if self._request("GET", path) is None:
            return False
        self._request("DELETE", path)
        return True


def add_node(
    api: ManagementAPI, topology: Topology, vhost: str, node_id: str, password: str
) -> Permissions:
    """Create the node's user with :func:`pupil_permissions` on ``vhost``; returns them.

    Refuses an existing user: overwriting would silently change its password (and, for the
    admin or the master, take their rights away).
    """
    if not api.vhost_exists(vhost):
        raise BrokerError(
            f"vhost '{vhost}' does not exist at {api.url}: create it first (the deploy stack's "
            "definitions do) or pass --vhost"
        )
    if api.get_user(node_id) is not None:
        raise BrokerError(
            f"user '{node_id}' already exists: `distill-swarm node remove {node_id}` first "
            "(a password is shown only when the user is created)"
        )
    permissions = pupil_permissions(topology, node_id)
    api.put_user(node_id, password, PUPIL_TAG)
    try:
        api.put_permissions(vhost, node_id, permissions)
    except BrokerError:
        api.delete_user(node_id)  # no half-made user left behind
        raise
    return permissions


def remove_node(
    api: ManagementAPI, topology: Topology, vhost: str, node_id: str, delete_queue: bool = True
) -> bool:
    """Delete a node's user and (by default) its lesson queue; True if a queue was deleted.

    RabbitMQ closes the deleted user's open connections itself (CONNECTION_FORCED). The queue
    goes too because the lessons fanout would otherwise keep filling it for a node that will
    never read it again. Only users tagged :data:`PUPIL_TAG` are deleted.
    """
    user = api.get_user(node_id)
    if user is None:
        raise BrokerError(f"there is no RabbitMQ user '{node_id}' at {api.url}")
    tags = user.get("tags", [])
    tag_list = tags.split(",") if isinstance(tags, str) else list(tags)
    if PUPIL_TAG not in tag_list:
        raise BrokerError(
            f"user '{node_id}' was not made by `distill-swarm node add` (no '{PUPIL_TAG}' tag): "
            "not deleting it; use the management UI or rabbitmqctl if you mean it"
        )
    api.delete_user(node_id)
    return api.delete_queue(vhost, topology.pupil_queue(node_id)) if delete_queue else False
