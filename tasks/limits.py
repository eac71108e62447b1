"""The names of the Prefect global concurrency limits conveyor uses: `conveyor up` creates them
(conveyor/service/supervisor.py), the tasks that write a store take a slot (ingest, curate, scrub/repair)."""
from __future__ import annotations


def store_limit(store_name: str) -> str:
    """The global concurrency limit (1 slot) that serialises the writers of one store across all workers."""
    return f"store-{store_name}"
