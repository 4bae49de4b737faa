"""Configuration: one file (TOML or YAML) plus environment overrides, validated by pydantic.

Precedence, lowest to highest: built-in defaults, the config file, environment variables, CLI
options. Environment variables name a field by its path with ``__`` between parts and the prefix
``DISTILL_SWARM__``: ``DISTILL_SWARM__PUPIL__NODE_ID=pi-7`` sets ``pupil.node_id``. ``AMQP_URL``
is also honoured for ``broker.url`` because every RabbitMQ tool knows it.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared.errors import ConfigError
from shared.jobs import CRITICAL, KINDS, OFFLOADABLE

ENV_PREFIX = "DISTILL_SWARM__"
# See MasterConfig.duplicate_window_s; a constant too, so the store's readers share the default.
DUPLICATE_WINDOW_S = 90.0
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BrokerConfig(_Section):
    """How to reach RabbitMQ and how the topology is named."""

    url: str = DEFAULT_AMQP_URL
    # Prefix of every exchange and queue name; lets several swarms (or test runs) share a broker.
    namespace: str = Field(default="swarm", pattern=r"^[a-z][a-z0-9_-]{0,30}$")
    heartbeat_s: int = Field(default=60, ge=0, le=3600)
    prefetch: int = Field(default=1, ge=1, le=1000)
    connect_attempts: int = Field(default=8, ge=1, le=1000)
    max_backoff_s: float = Field(default=30.0, gt=0)
    quorum_queues: bool = True
    # Pupils only (the master always declares everything). False: check that the exchanges exist
    # instead of declaring them, so a per-node user needs no `configure` permission on them.
    declare_exchanges: bool = True
    # TLS, used when `url` is amqps://. The CA that signed the broker's certificate (default: the
    # system's trust store); an optional client certificate and key; the name to check the
    # broker's certificate against when it differs from the URL's host.
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_server_hostname: str | None = None


class LessonsConfig(_Section):
    """How lessons travel from the master to the pupils (docs/stream.md).

    ``stream`` (the default): one RabbitMQ stream queue, ``<namespace>.lessons``, bound to the
    lessons fanout. One copy on the broker whatever the number of nodes; each pupil reads it from
    its own offset, kept in its journal, so a node that joins later learns every retained lesson.
    ``queues``: the per-node queues ``<namespace>.pupil.<node>`` of earlier releases, kept so a
    running swarm can move to the stream one node at a time (docs/stream.md, "Migration"). The
    master declares the stream whenever its transport is ``stream``; the fanout feeds both, so
    nodes still on ``queues`` lose nothing while the others move.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)  # frozen: a Topology holds one

    transport: Literal["stream", "queues"] = "stream"
    # Retention: RabbitMQ drops whole segments, oldest first, once the stream is over either
    # bound. A lesson is about 21 KB with a 1024-dim embedding (JSON floats; docs/stream.md), so
    # 5 GB holds some 240,000 lessons; 90 days outlasts a Pi left in a drawer for a season.
    stream_max_bytes: int = Field(default=5_000_000_000, ge=1_000, le=10**15)
    stream_max_age: str = Field(default="90D", pattern=r"^[0-9]{1,6}(Y|M|D|h|m|s)$")
    # Size of one segment file: the unit retention drops. RabbitMQ's default is 500 MB; smaller
    # segments make retention follow the bounds more closely (the tests use tiny ones).
    stream_segment_bytes: int = Field(default=100_000_000, ge=1_000, le=3_000_000_000)
    # A node logs its catch-up progress every this many lessons while behind the head.
    catch_up_log_every: int = Field(default=50, ge=1, le=1_000_000)
    # How often a node looks up the stream's head (a short-lived connection with two consumers)
    # for its lag: 1,000 nodes at 60 s open some 17 connections a second on the broker.
    head_probe_interval_s: float = Field(default=60.0, ge=1.0, le=86_400.0)


class GeneratorConfig(_Section):
    """A text-generation backend and its decoding settings."""

    kind: Literal["ollama", "embedded"] = "embedded"
    model: str = "gemma3-270m"
    url: str | None = None
    timeout_s: float = Field(default=120.0, gt=0)
    template: str = "pupil.j2"
    system: str | None = None
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    max_tokens: int = Field(default=96, ge=1, le=8192)
    seed: int | None = 0
    # CPU threads for an embedded model (None: every core). Ollama manages its own.
    threads: int | None = Field(default=None, ge=1, le=256)


class MasterGeneratorConfig(GeneratorConfig):
    """The master's generator: its own template by default.

    A subclass rather than ``GeneratorConfig(template=...)`` as a default value: a config file
    that sets any one field of ``[master.generator]`` builds the section anew from the class's
    defaults, and must not silently fall back to the pupil's template.
    """

    template: str = "master.j2"


class PupilGeneratorConfig(GeneratorConfig):
    """A pupil's generator: samples (temperature 0.8) by default, as in the seed."""

    temperature: float = Field(default=0.8, ge=0.0, le=2.0)


class EmbedderConfig(_Section):
    """An embedding backend. Master and pupils must use the same model."""

    kind: Literal["ollama", "embedded"] = "embedded"
    model: str = "all-minilm-l6-v2"
    url: str | None = None
    timeout_s: float = Field(default=60.0, gt=0)


class AdapterConfig(_Section):
    """The on-device adapter and how it trains."""

    hidden_dim: int = Field(default=256, ge=1, le=16384)
    learning_rate: float = Field(default=1e-3, gt=0)
    steps_per_lesson: int = Field(default=8, ge=1, le=10_000)
    batch_size: int = Field(default=16, ge=1, le=4096)
    buffer_capacity: int = Field(default=512, ge=1, le=1_000_000)
    seed: int = 0
    # Bridge mode: lessons embedded by another model (the seed's 1024 -> 1024 or any other pair).
    # Left unset, a node accepts only lessons embedded with its own embedding model.
    reference_model: str | None = None
    reference_dim: int | None = Field(default=None, ge=1, le=8192)
    # Torch threads in the pupil's process: training both adapters and, with the embedded backend,
    # embedding. None: $DISTILL_SWARM_TORCH_THREADS, else half the cores (at least one), so the
    # model server (Ollama, or llama.cpp in the same process) keeps the rest whatever the backend.
    # Not generator.threads (llama.cpp's own) nor study.threads (a study round's child process).
    threads: int | None = Field(default=None, ge=1, le=256)


# ``lora`` and ``lora+retrieval`` answer with the node's served LoRA adapter (docs/lora.md); the
# others with the base model, so they stay comparable with what the node said before studying.
GuidanceMethod = Literal[
    "plain", "best_of_k", "retrieval", "retrieval+best_of_k", "lora", "lora+retrieval"
]
LORA_METHODS: tuple[str, ...] = ("lora", "lora+retrieval")


class GuidanceConfig(_Section):
    """How a pupil's alignment changes what it says (see docs/decisions.md)."""

    # What the node answers with (jobs, and `similarity_guided` in reports).
    method: GuidanceMethod = "retrieval"
    # Every method measured on eval lessons, for `distill-swarm eval` to compare. Each costs
    # generations: best_of_k costs k, retrieval one, retrieval+best_of_k k.
    eval_methods: list[GuidanceMethod] = ["best_of_k", "retrieval", "lora", "lora+retrieval"]
    k: int = Field(default=4, ge=2, le=32)
    # Worked examples retrieval puts in the prompt (the master's answers to the nearest lessons).
    examples: int = Field(default=2, ge=1, le=8)
    # Examples are cut to this many characters each, so a long master answer cannot crowd out
    # the question in a small model's context window.
    example_chars: int = Field(default=600, ge=50, le=8000)


class RetentionConfig(_Section):
    """How much of its past a pupil keeps on disk and in memory.

    docs/decisions.md, section 25, gives the reasons and the sizes measured per lesson.
    """

    # Finished lessons the journal remembers (id, confirmed flag), newest first: a redelivery of
    # one of them is only acked or its report re-sent, never trained again. A report's body is
    # dropped once the broker confirmed it (it is never sent again); unconfirmed entries are
    # never pruned.
    journal_max_lessons: int = Field(default=100_000, ge=10, le=100_000_000)
    # Train lessons whose goal and master answer the memory keeps (oldest dropped first): the
    # material of retrieval guidance and, later, of on-device study rounds. High on purpose.
    memory_max_lessons: int = Field(default=100_000, ge=1, le=100_000_000)
    # The newest of those that retrieval searches. Their goal embeddings are held in RAM
    # (dim x 4 bytes each: 10,000 x 1024 dims = 41 MB), so this bounds the node's RSS.
    retrieval_max_lessons: int = Field(default=10_000, ge=1, le=10_000_000)


def _split_list(value: Any) -> Any:
    # An environment variable or CLI option gives "a,b,c"; a config file gives a list.
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _known_kinds(kinds: list[str]) -> list[str]:
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown job kind(s) {', '.join(unknown)}; known: {', '.join(KINDS)}")
    return list(dict.fromkeys(kinds))


class MasterJobsConfig(_Section):
    """Which jobs the master offloads to pupils and how (docs/jobs.md)."""

    # Kinds the master always answers itself. The seed's critical kinds (complex reasoning,
    # legal/medical) are always in it; add any other kind to keep it off the pupils.
    critical: list[str] = list(CRITICAL)
    # A job without its own deadline gets this long for a pupil to answer before the master does.
    default_deadline_s: float = Field(default=30.0, gt=0, le=86_400)
    # Fraction of offloaded jobs the master answers too, to record agreement (cosine of the two
    # answers' embeddings) per kind and node. Each sample costs one master generation.
    sample_rate: float = Field(default=0.1, ge=0.0, le=1.0)
    # Kinds whose jobs become train lessons when the master answers them itself (a critical
    # kind, a deadline or pupil-failure fallback, an agreement sample): the pupils then learn the
    # traffic they are asked to serve. Opt-in per kind, since a job's text is a user's data. A
    # job whose text is an eval prompt's never becomes a lesson (docs/jobs.md).
    to_lessons: list[str] = []

    _split_critical = field_validator("critical", mode="before")(_split_list)
    _split_to_lessons = field_validator("to_lessons", mode="before")(_split_list)
    _known_to_lessons = field_validator("to_lessons")(_known_kinds)

    @field_validator("critical")
    @classmethod
    def _critical_kinds(cls, value: list[str]) -> list[str]:
        value = _known_kinds(value)
        kept_off = [k for k in CRITICAL if k not in value]
        if kept_off:
            raise ValueError(f"{', '.join(kept_off)} is critical by design and cannot be offloaded")
        return value

    @property
    def offloaded(self) -> tuple[str, ...]:
        """The kinds the master sends to pupils: every known kind not marked critical."""
        return tuple(k for k in KINDS if k not in self.critical)


class MasterConfig(_Section):
    """The master service."""

    prompts: Path | None = None
    store: Path = Path("distill-swarm-master.sqlite3")
    eval_fraction: float = Field(default=0.25, ge=0.0, le=1.0)
    split_seed: int = 0
    # Lessons fan out only to queues that exist, so wait for this many pupils before publishing.
    expect_nodes: int = Field(default=0, ge=0)
    expect_nodes_timeout_s: float = Field(default=300.0, gt=0)
    # Reports (and control messages) the master's consumer may hold unacked; replaces
    # broker.prefetch, which sizes a pupil's lessons. At 1 the master waits a broker round trip
    # (a quorum-queue settle) per report and falls behind 200 reporting nodes (docs/scale.md);
    # a master that dies with them unacked gets them again, and its store counts each once.
    prefetch: int = Field(default=100, ge=1, le=1000)
    # With --exit-when-done: once every report is in, send the run's eval lessons again as an
    # exam that every node answers with its final model, by every method (master/exam.py), and
    # stop only when the exam is answered too. `distill-swarm exam` holds one at any time.
    exam: bool = True
    # Measure the master's self-agreement on eval lessons (one extra generation each unless the
    # master decodes greedily): the ceiling every similarity figure is read against.
    ceiling: bool = True
    # Accept a report, control message or job result only if the broker-validated AMQP user_id
    # it carries equals the node id it claims. "auto" (the default) checks every message except
    # those sent as the master's own broker user: local development runs everything as one user
    # (guest), who may do anything the master may anyway, while a per-node user (`distill-swarm
    # node add`) can then never speak for another node. true checks every message, false none
    # (a swarm whose pupils share one user that is not the master's; docs/security.md).
    verify_node_identity: Literal["auto"] | bool = "auto"
    # Two instances (process starts) of one node id that spoke at overlapping times within this
    # many seconds make the node `duplicate` in `status`: three of the pupils' default 30 s
    # heartbeats, so a clone that was refused and exited clears within a minute and a half, while
    # one missed heartbeat cannot hide a clone that is still running.
    duplicate_window_s: float = Field(default=DUPLICATE_WINDOW_S, gt=0)
    # Prometheus /metrics over HTTP (0 turns it off). Loopback by default: the compose stack sets
    # 0.0.0.0 so its Prometheus container can scrape the master over the compose network.
    metrics_port: int = Field(default=9464, ge=0, le=65535)
    metrics_addr: str = Field(default="127.0.0.1", min_length=1)
    # At most this many distinct `node` label values; further nodes share the label `_other`
    # (shared.metrics.OTHER_NODE: no node id can start with an underscore).
    metrics_max_nodes: int = Field(default=256, ge=1, le=100_000)
    # Answers the master asks its model server for at once while it makes lessons (prompt sets,
    # `distill-swarm teach`, jobs that become lessons). Ollama serves that many in parallel with
    # OLLAMA_NUM_PARALLEL (its default is 4 or 1 by free memory), so 4 keeps a GPU busy without
    # queueing behind a server that serves fewer; the embedded model serialises them anyway.
    # Lessons are still published in prompt order (docs/decisions.md §32).
    generate_in_flight: int = Field(default=4, ge=1, le=64)
    # Lessons published and not yet confirmed by the broker, at most: a window instead of one
    # round trip per lesson (bench/throughput.py). A lesson is marked published only once its
    # own confirm arrived; a nack or a lost connection publishes the unconfirmed ones again.
    publish_window: int = Field(default=100, ge=1, le=10_000)
    generator: MasterGeneratorConfig = MasterGeneratorConfig()
    embedder: EmbedderConfig = EmbedderConfig()
    jobs: MasterJobsConfig = MasterJobsConfig()


class StudyConfig(_Section):
    """On-device LoRA study rounds: the pupil fine-tunes its own model (docs/lora.md).

    Needs the ``study`` extra (transformers, peft, gguf). Each round runs in a child process at a
    lower CPU priority, so lessons and jobs keep flowing and the round's memory is returned to the
    system when it ends.
    """

    # auto: study when the `study` extra is installed, and say so in the log either way.
    enabled: Literal["auto", "on", "off"] = "auto"
    # A round starts after this many new train lessons...
    every_lessons: int = Field(default=50, ge=1, le=1_000_000)
    # ...or when no lesson came for this long and at least one new train lesson is waiting.
    idle_s: float = Field(default=300.0, gt=0)
    # No round before this many train lessons: fewer leave no validation slice worth the name.
    min_lessons: int = Field(default=20, ge=2, le=1_000_000)
    # Train lessons a round uses (the newest; the validation slice is taken out of them).
    max_lessons: int = Field(default=2_000, ge=2, le=1_000_000)
    # Passes over the round's train lessons; `max_steps` still bounds the round's work.
    epochs: int = Field(default=1, ge=1, le=100)
    # Bounded work per round: at most this many optimiser steps of `batch_size` examples.
    max_steps: int = Field(default=40, ge=1, le=100_000)
    batch_size: int = Field(default=4, ge=1, le=256)
    learning_rate: float = Field(default=2e-4, gt=0, le=1.0)
    # LoRA rank and alpha: r=16, alpha=32 on every projection (3.8M parameters for Gemma 270M).
    rank: int = Field(default=16, ge=1, le=512)
    alpha: float = Field(default=32.0, gt=0)
    # Which projections carry the LoRA: every one, the attention's (q/k/v/o) or the MLP's
    # (gate/up/down). "mlp" kept the gain at 60 % of the adapter's size in bench/lora_sweep.py.
    targets: Literal["all", "attention", "mlp"] = "all"
    # Tokens per example (prompt + answer); longer examples are cut. 256 fits every lesson of the
    # benchmark set and bounds a round's memory.
    max_len: int = Field(default=256, ge=16, le=8192)
    # Share of train lessons held out (chosen by a hash of the lesson id, so stable across
    # rounds) to decide whether a new adapter is better than the served one.
    validation_fraction: float = Field(default=0.15, gt=0.0, lt=1.0)
    # Torch threads for a round (None: every core but one, which stays with lessons and jobs).
    threads: int | None = Field(default=None, ge=1, le=256)
    # CPU priority of the round's process (0-19; higher is nicer to lessons and jobs).
    nice: int = Field(default=10, ge=0, le=19)
    # Adapter versions kept on disk for rollback (the served one included).
    keep_versions: int = Field(default=3, ge=1, le=100)
    # A round that runs longer than this is stopped and counted as failed.
    round_timeout_s: float = Field(default=3_600.0, gt=0)
    # Where the dequantised base weights are cached (None: $DISTILL_SWARM_STUDY_CACHE, else
    # $XDG_CACHE_HOME/distill-swarm/study): shared by the nodes of one machine and one user.
    cache_dir: Path | None = None


class PupilConfig(_Section):
    """One pupil node."""

    node_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    # Adapter checkpoints, lesson journal, lesson memory. Unset: a directory per node id,
    # $XDG_STATE_HOME/distill-swarm/pupil/<node_id> (~/.local/state/... without XDG_STATE_HOME),
    # so two nodes started from one directory never share state (pupil_node/state.py).
    state_dir: Path | None = None
    heartbeat_interval_s: float = Field(default=30.0, gt=0)
    # Below this many bytes free where the state directory lives, the node takes no new lesson:
    # its lesson consumer pauses (the lesson in hand waits unacked) until a probe finds room, and
    # the node's distill_swarm_state_free_bytes gauge shows why. 64 MiB covers a train lesson's
    # writes with room to spare: both adapters' new checkpoints are written before the old ones
    # go (4 MB each at 384 dims and 11 MB at 1024, with the default adapter and a full replay
    # buffer), and SQLite's write-ahead logs grow to about 4 MB each before they are recycled. A
    # margin, not the guarantee: a write that fails anyway rolls the adapters back and holds the
    # lesson. 0 turns the check off.
    min_free_bytes: int = Field(default=64 * 2**20, ge=0)
    # The lesson consumer is exclusive: a second process with this node id is refused. A refused
    # node retries this long before it exits (code 6), because the process in the way may be its
    # own predecessor: after a network cut RabbitMQ keeps a dead connection (and its consumer)
    # until two AMQP heartbeats are missed, 2 x broker.heartbeat_s = 120 s by default; 150 s
    # covers that with a margin. A SIGKILLed process's connection is closed at once.
    queue_in_use_wait_s: float = Field(default=150.0, ge=0)
    # Prometheus /metrics over HTTP (0 turns it off). The master re-exports every node's figures,
    # so a node behind NAT needs no scraping; this endpoint is for nodes Prometheus can reach.
    metrics_port: int = Field(default=9465, ge=0, le=65535)
    metrics_addr: str = Field(default="127.0.0.1", min_length=1)
    generator: PupilGeneratorConfig = PupilGeneratorConfig()
    embedder: EmbedderConfig = EmbedderConfig()
    adapter: AdapterConfig = AdapterConfig()
    guidance: GuidanceConfig = GuidanceConfig()
    study: StudyConfig = StudyConfig()
    retention: RetentionConfig = RetentionConfig()
    # Job kinds this node consumes and advertises (empty: lessons only). Critical kinds are
    # refused: the master never offloads them, whatever a node says.
    jobs: list[str] = list(OFFLOADABLE)

    _split_jobs = field_validator("jobs", mode="before")(_split_list)

    @field_validator("jobs")
    @classmethod
    def _offloadable_kinds(cls, value: list[str]) -> list[str]:
        value = _known_kinds(value)
        critical = [k for k in value if k in CRITICAL]
        if critical:
            raise ValueError(f"{', '.join(critical)} is critical: only the master does it")
        return value


class HealthConfig(_Section):
    """How a service waits out an outage of its model server (docs/decisions.md, "model down")."""

    # The first probe after an outage is noticed: an Ollama restart is often over in a second.
    model_probe_base_s: float = Field(default=0.5, gt=0, le=60)
    # Probes back off (doubling, jittered) to at most this. A probe is one cheap GET, so even a
    # Pi probing every 15 s costs its server nothing; and a node resumes at most this long after
    # its server is back, which is short next to a lesson on a Pi.
    model_probe_max_s: float = Field(default=15.0, gt=0, le=600)
    # A pupil whose state disk refused a write (full, read-only, failing) pauses its lessons and
    # probes the disk (free space, a statvfs call: nothing to spare) from this often, doubling
    # to at most disk_probe_max_s: a node resumes at most that long after space is freed.
    disk_probe_base_s: float = Field(default=0.5, gt=0, le=60)
    disk_probe_max_s: float = Field(default=10.0, gt=0, le=600)


class Settings(_Section):
    """The whole configuration of a master or a pupil."""

    broker: BrokerConfig = BrokerConfig()
    health: HealthConfig = HealthConfig()
    lessons: LessonsConfig = LessonsConfig()
    master: MasterConfig = MasterConfig()
    pupil: PupilConfig = PupilConfig()

    def master_consumer_broker(self) -> BrokerConfig:
        """The broker settings of the master's consumers (reports, control, jobs).

        ``master.prefetch`` sizes their window; ``broker.prefetch`` stays the pupils'.
        """
        return self.broker.model_copy(update={"prefetch": self.master.prefetch})


def load_settings(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build :class:`Settings` from defaults, ``path``, the environment and ``overrides``.

    ``overrides`` uses dotted keys (``{"pupil.node_id": "pi-7"}``); ``None`` values are ignored so
    CLI options that were not given do not clobber the file. Raises :class:`ConfigError` with a
    one-line message naming the offending field.
    """
    env = os.environ if env is None else env
    data: dict[str, Any] = _read_file(path) if path is not None else {}
    if env.get("AMQP_URL"):
        _set_path(data, "broker.url", env["AMQP_URL"])
    for key, value in env.items():
        if key.startswith(ENV_PREFIX):
            dotted = key[len(ENV_PREFIX) :].lower().replace("__", ".")
            _set_path(data, dotted, value)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_path(data, dotted, value)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        source = f" in {path}" if path else ""
        raise ConfigError(f"config field '{where}'{source}: {err['msg']}") from None


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text()
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in {".yaml", ".yml"}:
            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"config file {path}: use a .toml, .yaml or .yml file")
    except (tomllib.TOMLDecodeError, yaml.YAMLError, UnicodeDecodeError) as exc:
        first_line = str(exc).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid: {first_line}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config field '{dotted}': '{part}' is not a section")
        node = child
    node[leaf] = value
