"""Benchmark: the master's lesson throughput with 1, 2, 4, 8 answers in flight (issue 14, item 6).

The model server is a stand-in that speaks Ollama's ``/api/chat`` over HTTP, as the master's real
``OllamaGenerator`` calls it: each answer holds one of ``--slots`` slots (Ollama's
OLLAMA_NUM_PARALLEL) for a fixed ``--latency`` and queues while none is free, which is how a GPU
server with N parallel sequences behaves to a first approximation. Embeddings come from the fast
hashing backend, so the answer is the only slow step. The master is the real one:
``MasterService.publish_lessons`` on RabbitMQ (render, answer, embed, store, publish with a
window of confirms, mark published), one fresh store per run.

Throughput must scale near-linearly with ``master.generate_in_flight`` up to the slots: the ideal
is ``min(in flight, slots) / latency`` lessons/s. The table also checks what the parallel runs
must not change: the lesson ids, and their publishing order (the prompt order).

    .venv/bin/python bench/master_parallel.py [--lessons 64] [--latency 0.1] [--slots 8]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pika
from fast_backend import HashingEmbedder
from harness import AMQP_URL, bench_namespace, broker_config, format_table, throwaway_topology

from master.prompts import PromptItem
from master.service import MasterService
from master.store import Store
from shared.backends.ollama import OllamaGenerator
from shared.config import MasterConfig, Settings

IN_FLIGHT = (1, 2, 4, 8)
DIM = 384
NODE = "n0"


class StandIn:
    """An Ollama stand-in: ``/api/chat`` answers after ``latency_s``, at most ``slots`` at once."""

    def __init__(self, latency_s: float, slots: int) -> None:
        self.latency_s = latency_s
        self._slots = threading.Semaphore(slots)
        self._lock = threading.Lock()
        self.busy = 0
        self.most_busy = 0
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.stand_in = self  # type: ignore[attr-defined]
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        prompt = str(body["messages"][-1]["content"])
        with self._slots:
            with self._lock:
                self.busy += 1
                self.most_busy = max(self.most_busy, self.busy)
            time.sleep(self.latency_s)
            with self._lock:
                self.busy -= 1
        words = " ".join(prompt.split()[-24:])
        return {
            "model": body["model"],
            "created_at": "2026-12-01T00:00:00Z",
            "message": {"role": "assistant", "content": f"Answer: {words}"},
            "done": True,
        }

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        payload = json.dumps(self.server.stand_in.answer(body)).encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def run_once(
    settings: Settings, stand_in: StandIn, prompts: list[PromptItem], workdir: Path, in_flight: int
) -> tuple[float, list[str]]:
    """Lessons/s of one publishing run, and the lesson ids in publishing order."""
    master = settings.master.model_copy(
        update={"generate_in_flight": in_flight, "store": workdir / f"m{in_flight}.sqlite3"}
    )
    settings = settings.model_copy(update={"master": master})
    generator = OllamaGenerator("stand-in", url=stand_in.url, timeout_s=60)
    store = Store(master.store)
    service = MasterService(settings, generator, HashingEmbedder(DIM), store, prompts)
    started = time.perf_counter()
    service.publish_lessons()
    seconds = time.perf_counter() - started
    if service.lesson_ids != store.published_lesson_ids():
        raise RuntimeError("publishing order differs from the store's")
    store.close()
    return len(prompts) / seconds, service.lesson_ids


def published_order(url: str, queue: str) -> list[str]:
    """Message ids on ``queue`` in the order the broker got them (taken off the queue)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    ids = []
    while True:
        method, props, _ = channel.basic_get(queue, auto_ack=True)
        if method is None:
            break
        ids.append(props.message_id)
    connection.close()
    return ids


def main() -> int:
    """Run 1, 2, 4, 8 in flight; print lessons/s against the ideal."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--lessons", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.1, help="seconds per answer")
    parser.add_argument("--slots", type=int, default=8, help="answers the stand-in serves at once")
    parser.add_argument("--url", default=AMQP_URL)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    stand_in = StandIn(args.latency, args.slots)
    config = broker_config(bench_namespace("parallel"), args.url)
    rows = []
    rates: list[float] = []
    with (
        tempfile.TemporaryDirectory(prefix="distill-swarm-parallel-") as tmp,
        throwaway_topology(config, [NODE]) as topology,
    ):
        workdir = Path(tmp)
        settings = Settings(
            broker=config,
            master=MasterConfig(store=workdir / "unused.sqlite3", metrics_port=0, ceiling=False),
        )
        for in_flight in IN_FLIGHT:
            # Fresh prompt ids per run: each run makes every lesson anew.
            prompts = [
                PromptItem(id=f"f{in_flight}-{i}", goal_text=f"Explain topic {i} in one sentence")
                for i in range(args.lessons)
            ]
            stand_in.most_busy = 0
            rate, ids = run_once(settings, stand_in, prompts, workdir, in_flight)
            wire = published_order(args.url, topology.pupil_queue(NODE))
            if wire != ids:
                raise RuntimeError(
                    f"{in_flight} in flight: the broker got the lessons out of order"
                )
            rates.append(rate)
            ideal = min(in_flight, args.slots) / args.latency
            rows.append(
                (
                    str(in_flight),
                    f"{rate:,.1f}",
                    f"{rate / rates[0]:.2f}x",
                    f"{ideal:,.1f}",
                    f"{rate / ideal:.0%}",
                    str(stand_in.most_busy),
                )
            )
    stand_in.close()
    print(
        f"{args.lessons} lessons per run, model stand-in: {args.latency * 1000:.0f} ms per answer, "
        f"{args.slots} slots; lessons published in prompt order in every run"
    )
    columns = ("in flight", "lessons/s", "speed-up", "ideal lessons/s", "of ideal", "slots used")
    print(format_table(columns, rows))
    print(
        f"command: .venv/bin/python bench/master_parallel.py --lessons {args.lessons} "
        f"--latency {args.latency} --slots {args.slots}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
