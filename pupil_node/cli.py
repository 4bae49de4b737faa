"""`distill-swarm pupil ...`."""

from __future__ import annotations

import importlib.util
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from shared.backends import embedder_from, generator_from
from shared.cli_options import ConfigOpt
from shared.cli_support import exit_on_errors, fail, settings_from, setup_logging, stop_on_signals
from shared.config import Settings
from shared.metrics import PupilMetrics, serve
from shared.study_metrics import StudyMetrics

if TYPE_CHECKING:
    from pupil_node.state import NodeState
    from pupil_node.study.fedavg import Source

app = typer.Typer(
    help="A pupil node: learn from the master.", no_args_is_help=True, rich_markup_mode=None
)
log = logging.getLogger(__name__)


NodeIdOpt = Annotated[str | None, typer.Option(help="This node's id (letters, digits, . _ -).")]
StateDirOpt = Annotated[
    Path | None,
    typer.Option(
        help="Where the adapter checkpoints, journal and memory live (default: "
        "$XDG_STATE_HOME/distill-swarm/pupil/NODE_ID, or ~/.local/state/...). One node "
        "and one process per directory."
    ),
]


@app.command("run")
def run(
    node_id: NodeIdOpt = None,
    config: ConfigOpt = None,
    state_dir: StateDirOpt = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING...")] = "INFO",
) -> None:
    """Consume lessons, answer, train the adapter, report back."""
    setup_logging(log_level)
    if importlib.util.find_spec("torch") is None:
        # The base install is the master's (pyproject.toml): torch comes with the pupil extra.
        fail("torch is not installed: a pupil needs it; pip install 'distill-swarm[pupil]'")
    # Before anything slow: a second process on this state dir, or a dir of another node,
    # is refused in a moment, before it loads models or binds the metrics port.
    settings, state = _open_state(config, node_id, state_dir)
    cfg = settings.pupil
    # Imported here, not at the top: they pull in torch (seconds to import), which every other
    # `distill-swarm` command (status, eval, node add) would otherwise pay for.
    from pupil_node.node import PupilNode
    from pupil_node.service import PupilService
    from pupil_node.state import OLD_DEFAULT
    from shared.adapter import cap_torch_threads

    log.info("pupil %s: state dir %s", cfg.node_id, state.path)
    if cfg.state_dir is None and OLD_DEFAULT.is_dir():
        log.warning(
            "./%s is the state dir every node shared before state dirs were per node; it is no "
            "longer used by default. To keep its adapter, run this node with --state-dir %s "
            "(the first node to open it adopts it)",
            OLD_DEFAULT,
            OLD_DEFAULT,
        )
    # Signals first: a SIGTERM while the models load must still end in a clean exit.
    stop = threading.Event()
    stop_on_signals(stop)
    metrics = PupilMetrics()
    serve(metrics.registry, cfg.metrics_addr, cfg.metrics_port)
    with exit_on_errors():
        # Before any model loads, for both backends: an Ollama pupil would otherwise train with
        # every core while Ollama needs them.
        threads = cap_torch_threads(cfg.adapter.threads)
        log.info("pupil %s: %d torch threads", cfg.node_id, threads)
        generator = generator_from(cfg.generator)
        embedder = embedder_from(cfg.embedder)
        node = PupilNode(
            state.node_id, cfg, generator, embedder, state, StudyMetrics(metrics.registry)
        )
        service = PupilService(settings, node, stop, metrics)
        log.info(
            "pupil %s: model %s, adapter v%d",
            cfg.node_id,
            generator.model_name,
            node.trainer.version,
        )
        service.run()


@app.command("rollback")
def rollback(
    node_id: NodeIdOpt = None, config: ConfigOpt = None, state_dir: StateDirOpt = None
) -> None:
    """Serve the previous LoRA version (or the base model) from the node's next start.

    Stop the node first: its state directory is locked while it runs.
    """
    setup_logging("WARNING")
    settings, state = _open_state(config, node_id, state_dir, must_exist=True)
    cfg = settings.pupil
    from pupil_node.study.serving import LORA_DIR
    from pupil_node.study.versions import AdapterStore

    try:
        store = AdapterStore(state.path / LORA_DIR, cfg.study.keep_versions)
        served = store.served()
        if served is None:
            fail("this node serves its base model already: nothing to roll back")
        older = store.rollback()
    finally:
        state.close()
    now = "the base model" if older is None else f"LoRA v{older.version}"
    typer.echo(f"{cfg.node_id}: rolled back from LoRA v{served.version}; {now} from the next start")


@app.command("import-adapter")
def import_adapter(
    adapter: Annotated[Path, typer.Argument(help="a swarm adapter from `pupil average-adapters`")],
    node_id: NodeIdOpt = None,
    config: ConfigOpt = None,
    state_dir: StateDirOpt = None,
) -> None:
    """Serve a LoRA adapter made elsewhere (a swarm adapter) from the node's next start.

    It becomes the node's next LoRA version: its next study round resumes from it, and
    `pupil rollback` goes back to what the node served before. Stop the node first.
    """
    setup_logging("WARNING")
    from pupil_node.study.serving import LORA_DIR
    from pupil_node.study.versions import AdapterStore, version_dir_problem

    # Checked before the node's state directory is opened (and, for a new node, created).
    problem = version_dir_problem(adapter)
    if problem is not None:
        fail(f"cannot import '{adapter}': {problem}")
    settings, state = _open_state(config, node_id, state_dir)
    cfg = settings.pupil
    try:
        store = AdapterStore(state.path / LORA_DIR, cfg.study.keep_versions)
        try:
            imported = store.import_version(adapter)
        except (ValueError, OSError) as e:
            fail(f"cannot import '{adapter}': {e}")
    finally:
        state.close()
    typer.echo(f"{cfg.node_id}: LoRA v{imported.version} (from {adapter}) from the next start")


@app.command("average-adapters")
def average_adapters(
    sources: Annotated[
        list[Path],
        typer.Argument(help="node state directories (their served LoRA) or version directories"),
    ],
    out: Annotated[Path, typer.Option("--out", help="the swarm adapter's directory")],
) -> None:
    """Average nodes' LoRA adapters, weighted by lessons, into one swarm adapter (FedAvg).

    Each source is a pupil's state directory (its served version is used) or a version
    directory (`.../lora/v0003`). Import the result on a new node with `pupil import-adapter`.
    """
    setup_logging("WARNING")
    from pupil_node.study.base import embedded_gguf_path
    from pupil_node.study.fedavg import average_adapters as average
    from pupil_node.study.fedavg import source_from

    with exit_on_errors():
        found = [source_from(path) for path in sources]
        if out.exists() and any(out.iterdir()):
            fail(f"'{out}' is not empty: give a new directory")
        result = average(found, out, base_gguf_from(found) or embedded_gguf_path())
    typer.echo(
        f"swarm adapter from {len(found)} adapters ({sum(s.lessons for s in found)} lessons), "
        f"rank {result.rank}, keeps {result.energy_kept_mean:.1%} of the mean update "
        f"(least: {result.energy_kept_min:.1%}): {out}"
    )


def base_gguf_from(sources: list[Source]) -> Path | None:
    """The base GGUF the sources were trained on, if their round files name one that exists."""
    bases = {s.base_gguf for s in sources} - {None}
    if len(bases) > 1:
        fail(f"the adapters were trained on different base models: {sorted(map(str, bases))}")
    return next(iter(bases), None)


def _open_state(
    config: Path | None,
    node_id: str | None,
    state_dir: Path | None,
    *,
    must_exist: bool = False,
) -> tuple[Settings, NodeState]:
    """The settings, and the node's state directory opened (locked, owned by the node id).

    Exits with one ``error:`` line for a missing node id, bad settings, a directory that is in
    use or belongs to another node, or (``must_exist``) no directory at all: a mistyped node id
    must not leave an empty state directory behind.
    """
    from pupil_node.state import NodeState, resolve_state_dir

    settings = settings_from(config, {"pupil.node_id": node_id, "pupil.state_dir": state_dir})
    cfg = settings.pupil
    if cfg.node_id is None:
        fail("no node id: give --node-id NAME or set pupil.node_id")
    path = resolve_state_dir(cfg.state_dir, cfg.node_id)
    if must_exist and not path.is_dir():
        fail(f"node '{cfg.node_id}' has no state directory at {path}: has it ever run here?")
    with exit_on_errors():
        state = NodeState.open(path, cfg.node_id)
    return settings, state
