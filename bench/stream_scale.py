"""Benchmark: broker memory and disk, lesson stream vs per-node queues, side by side in one run.

For each transport, a fresh private RabbitMQ (distill_swarm.local_broker, as bench/scale.py
runs) gets the master's topology and ``--nodes`` simulated nodes, then ``--lessons`` lessons
(``--dim``-dimension reference embeddings, persistent, each confirmed) on the lessons fanout:

- ``queues``: one durable per-node queue per node, bound to the fanout, as `pupil run` declares
  it; the nodes are offline, so every queue holds every lesson: the backlog a fleet of Pis that
  are off for the night leaves on the broker;
- ``stream``: the one lesson stream; a node's place in it is an offset in its own journal, so
  offline nodes cost the broker nothing. Then ``--nodes`` readers attach at the head (caught-up
  nodes: one consumer each, over 10 connections) to show what an online node costs.

Measured after each step: the broker's resident memory (every process of its session, from
/proc, as bench/scale_probes.py samples it), the memory RabbitMQ accounts for itself
(``rabbitmqctl status``), and the disk its data directory takes (``du``).

    .venv/bin/python -m bench.stream_scale                      # 1,000 nodes x 1,000 lessons
    .venv/bin/python -m bench.stream_scale --nodes 100 --lessons 100
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from dataclasses import dataclass

import numpy as np
import pika

from bench.scale_probes import rss_mb, session_pids
from distill_swarm.local_broker import LocalBroker
from shared.broker import Publisher, connect
from shared.broker.stream import OFFSET_HEADER
from shared.config import BrokerConfig, LessonsConfig
from shared.messages import Embedding, Lesson, encode
from shared.topology import Topology

READER_CONNECTIONS = 10


@dataclass
class Figures:
    """One row: what the broker holds after one step."""

    transport: str
    step: str
    seconds: float
    rss_mb: float
    rabbit_mb: float
    disk_mb: float


def lessons(count: int, dim: int) -> list[bytes]:
    """``count`` encoded lessons with ``dim``-dimension embeddings and a paragraph of answer."""
    rng = np.random.default_rng(7)
    out = []
    for i in range(count):
        answer = f"Answer {i}: " + "a plausible paragraph of the master's answer " * 12
        out.append(
            encode(
                Lesson(
                    lesson_id=f"lesson-{i:06d}",
                    task="qa",
                    prompt=f"Question {i}?",
                    goal_text=f"Question {i}?",
                    master_model="qwen3",
                    master_answer=answer,
                    reference=Embedding.from_array(
                        "mxbai-embed-large", rng.standard_normal(dim).astype(np.float32)
                    ),
                    split="train",
                )
            )
        )
    return out


def measure(broker: LocalBroker, transport: str, step: str, seconds: float) -> Figures:
    """The broker's memory and disk now."""
    assert broker._process is not None  # started by __enter__
    rss = sum(rss_mb(pid) for pid in session_pids(broker._process.pid))
    status = broker.ctl("status", "--formatter", "json")
    rabbit = (
        json.loads(status.stdout)["memory"]["total"]["erlang"] / 1e6
        if status.returncode == 0
        else float("nan")
    )
    mnesia = broker.env()["RABBITMQ_MNESIA_BASE"]
    du = subprocess.run(["du", "-sk", mnesia], capture_output=True, text=True, check=False)
    disk = int(du.stdout.split()[0]) / 1e3 if du.returncode == 0 else float("nan")
    return Figures(transport, step, seconds, rss, rabbit, disk)


def publish(config: BrokerConfig, topology: Topology, bodies: list[bytes]) -> float:
    started = time.monotonic()
    publisher = Publisher(config, topology.declare_master)
    try:
        for i, body in enumerate(bodies):
            publisher.publish(topology.lessons_exchange, "", body, f"lesson-{i:06d}")
    finally:
        publisher.close()
    return time.monotonic() - started


def run(transport: str, nodes: int, bodies: list[bytes]) -> list[Figures]:
    rows = []
    with LocalBroker() as broker:
        config = BrokerConfig(url=broker.url, namespace="scale")
        topology = Topology("scale", lessons=LessonsConfig(transport=transport))  # type: ignore[arg-type]
        connection = connect(config)
        channel = connection.channel()
        started = time.monotonic()
        topology.declare_master(channel)
        if transport == "queues":
            for i in range(nodes):
                topology.declare_pupil(channel, f"n{i}", declare_exchanges=False)
        connection.close()
        rows.append(
            measure(broker, transport, f"{nodes} nodes declared", time.monotonic() - started)
        )
        seconds = publish(config, topology, bodies)
        time.sleep(2)  # let the queues' and the stream's writers settle before measuring
        rows.append(measure(broker, transport, f"{len(bodies)} lessons published", seconds))
        if transport == "stream":
            started = time.monotonic()
            readers = attach_readers(config, topology.lessons_stream, nodes)
            rows.append(
                measure(
                    broker, transport, f"{nodes} readers at the head", time.monotonic() - started
                )
            )
            for reader in readers:
                reader.close()
    return rows


def attach_readers(config: BrokerConfig, stream: str, count: int) -> list[pika.BlockingConnection]:
    """``count`` consumers at the stream's head ("next"), one channel each, over few connections."""
    connections = [connect(config) for _ in range(READER_CONNECTIONS)]
    for i in range(count):
        channel = connections[i % READER_CONNECTIONS].channel()
        channel.basic_qos(prefetch_count=1)
        channel.basic_consume(stream, lambda *_: None, arguments={OFFSET_HEADER: "next"})
    for connection in connections:
        connection.process_data_events(time_limit=0.5)
    time.sleep(2)
    return connections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--lessons", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=1024, help="reference embedding dimension")
    args = parser.parse_args()
    bodies = lessons(args.lessons, args.dim)
    size = sum(len(b) for b in bodies) / len(bodies)
    print(f"{args.nodes} nodes x {args.lessons} lessons of {size / 1e3:.1f} KB ({args.dim} dims)")
    print(f"CPUs: {os.cpu_count()}\n")
    rows = run("queues", args.nodes, bodies) + run("stream", args.nodes, bodies)
    print("transport | step | took s | broker RSS MB | RabbitMQ's own MB | disk MB")
    print("--- | --- | --- | --- | --- | ---")
    for r in rows:
        print(
            f"{r.transport} | {r.step} | {r.seconds:.1f} | {r.rss_mb:.0f} | {r.rabbit_mb:.0f} | "
            f"{r.disk_mb:.0f}"
        )


if __name__ == "__main__":
    main()
