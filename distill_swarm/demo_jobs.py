"""The demo's second act: offload one job of every kind to the swarm that just learned.

After the lessons, the demo submits one job per offloadable kind and one critical job through the
Python API, waits for every answer (with a progress bar), and prints who answered each one, how
long it took, and how well the pupil's answer agreed with the master's own (the demo samples every
offloaded job).
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from pathlib import Path

from tqdm import tqdm

from distill_swarm.client import JobClient
from master.job_store import JobStore
from master.store import Store
from shared.config import Settings
from shared.messages import JobResult

DEMO_JOBS: list[tuple[str, dict[str, str]]] = [
    ("answer_scoring", {"text": "Water boils at 100 C at sea level.",
                        "question": "At what temperature does water boil?"}),
    ("summarisation", {"text": "The town will close the old bridge for repairs from May to "
                               "August. A ferry will run every twenty minutes meanwhile."}),
    ("translation", {"text": "The train leaves at eight.", "language": "Spanish"}),
    ("query_routing", {"text": "My invoice shows the wrong address.",
                       "routes": "billing, technical support, sales"}),
    ("keyword_tagging", {"text": "Growing tomatoes on a small balcony"}),
    ("hypothesis_summarisation", {"text": "Children who read aloud to pets gain reading "
                                          "fluency faster, because they feel less judged."}),
    ("legal_medical", {"text": "Can I take ibuprofen together with my blood thinner?"}),
]  # fmt: skip
DEADLINE_S = 120.0
SAMPLE_WAIT_S = 120.0


def run_demo_jobs(settings: Settings, store_path: Path) -> str:
    """Submit the demo jobs, wait for their answers and samples; returns the table to print."""
    with JobClient(settings) as client:
        futures: list[Future[JobResult]] = [
            client.submit_future(kind, payload, DEADLINE_S) for kind, payload in DEMO_JOBS
        ]
        with tqdm(total=len(futures), desc="jobs", unit="job") as bar:
            for future in futures:
                future.result(timeout=DEADLINE_S + client.grace_s)
                bar.update(1)
    results = [f.result() for f in futures]
    jobs = JobStore(Store(store_path))
    _wait_for_samples(jobs, results)
    return format_jobs(results, jobs)


def _wait_for_samples(jobs: JobStore, results: list[JobResult]) -> None:
    # The master samples a job after answering it, so its agreement lands a moment later.
    offloaded = {r.job_id for r in results if r.answered_by != "master"}
    deadline = time.monotonic() + SAMPLE_WAIT_S
    while time.monotonic() < deadline:
        rows = [jobs.get(job_id) for job_id in offloaded]
        if all(row is not None and row.agreement is not None for row in rows):
            return
        time.sleep(0.5)


def format_jobs(results: list[JobResult], jobs: JobStore) -> str:
    """One line per job: kind, who answered, seconds, agreement, why the master answered."""
    header = f"{'kind':26}{'answered by':13}{'seconds':>8}{'agreement':>11}  answer"
    lines = [header, "-" * 100]
    for r in results:
        row = jobs.get(r.job_id)
        agreement = "-" if row is None or row.agreement is None else f"{row.agreement:.3f}"
        answer = " ".join((r.output or r.error or "").split())[:40]
        why = f" ({r.fallback})" if r.fallback else ""
        lines.append(
            f"{r.job_kind:26}{r.answered_by:13}{r.elapsed_s:8.2f}{agreement:>11}  {answer}{why}"
        )
    lines.append(
        "agreement = cosine between the embeddings of the pupil's answer and the master's own "
        "answer to the same job"
    )
    return "\n".join(lines)
