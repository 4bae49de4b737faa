"""What every command-line entry point shares: logging, settings, signals, named exit codes."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from enum import IntEnum
from pathlib import Path
from typing import Any, NoReturn

from shared.config import Settings, load_settings
from shared.errors import (
    BackendError,
    BrokerError,
    ConfigError,
    DistillSwarmError,
    QueueInUse,
    StateDirInUse,
)


class ExitCode(IntEnum):
    """Process exit codes, so scripts and systemd can tell failures apart."""

    OK = 0
    FAILURE = 1
    BAD_INPUT = 2  # bad CLI option or config file: fix the input, do not restart
    BROKER = 3  # RabbitMQ unreachable or refused us
    BACKEND = 4  # model server unreachable or model missing
    # Another process holds the pupil's state directory: not a bad setting (a restart succeeds
    # once that process is gone), so systemd's RestartPreventExitStatus=2 does not stop retries.
    STATE_IN_USE = 5
    # Another process (another machine, e.g. a cloned SD card) consumes this node id's lessons:
    # restarting cannot fix that, and systemd's RestartPreventExitStatus lists it; an operator
    # must give one of the two machines its own node id.
    NODE_ID_IN_USE = 6


def setup_logging(level: str = "INFO") -> None:
    """One-line log records on stderr; pika speaks only at ``DEBUG``.

    Every pika failure is caught at the broker boundary (shared/broker/) and logged there once,
    in one line that says what happens next ("retrying in 2.1s"). pika's own records of the same
    failure are ERROR-level tracebacks, 13-80 lines each, that bury that line, so they are shown
    only when debugging.
    """
    numeric = getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(
        level=numeric,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("pika").setLevel(
        logging.DEBUG if numeric <= logging.DEBUG else logging.CRITICAL
    )


def fail(message: str, code: ExitCode = ExitCode.BAD_INPUT) -> NoReturn:
    """Print a one-line error and exit."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(int(code))


def settings_from(config: Path | None, overrides: Mapping[str, Any]) -> Settings:
    """Load settings or exit with a one-line explanation naming the field."""
    try:
        return load_settings(config, overrides=overrides)
    except ConfigError as exc:
        fail(str(exc))


@contextmanager
def exit_on_errors() -> Iterator[None]:
    """Turn the project's errors into one-line messages and named exit codes."""
    try:
        yield
    except ConfigError as exc:
        fail(str(exc), ExitCode.BAD_INPUT)
    except BrokerError as exc:
        fail(str(exc), ExitCode.BROKER)
    except QueueInUse as exc:  # NodeIdInUse: another machine runs with this node id
        fail(str(exc), ExitCode.NODE_ID_IN_USE)
    except BackendError as exc:
        fail(str(exc), ExitCode.BACKEND)
    except StateDirInUse as exc:
        fail(str(exc), ExitCode.STATE_IN_USE)
    except DistillSwarmError as exc:
        fail(str(exc), ExitCode.FAILURE)


def stop_on_signals(stop: threading.Event, extra: Callable[[], None] | None = None) -> None:
    """SIGTERM (systemd, docker) and SIGINT (Ctrl-C) set ``stop`` for a clean shutdown."""

    def handler(signum: int, _frame: object) -> None:
        logging.getLogger(__name__).info("signal %d: stopping", signum)
        stop.set()
        if extra is not None:
            extra()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
