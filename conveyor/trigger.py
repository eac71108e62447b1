"""When a store's new data should launch training, with what parameters, under which idempotency key.

Pure functions (no Prefect): `tasks/ingest.py` calls `run_deployment` with their results. The key is
derived from the dataset version's content hash, so a retried or repeated ingest of the same data maps
to the same training run instead of launching a second one.
"""
from __future__ import annotations

import re
from typing import Any

from conveyor.version import DatasetVersion
from conveyor.settings import TrainTriggerSettings


def training_due(policy: TrainTriggerSettings, before: int, after: int, *, nightly: bool = False) -> bool:
    """every_n: the store's episode count crossed a multiple of N; nightly: only the nightly run, on new data.

    Stateless on purpose: "crossed a multiple" needs no memory of earlier trainings and gives the same
    answer when a run is retried.
    """
    if after <= before:
        return nightly and policy.policy == "nightly" and after > 0
    if policy.policy == "every_n":
        return after // policy.every_n > before // policy.every_n
    if policy.policy == "nightly":
        return nightly
    return False


def idempotency_key(store_name: str, version: DatasetVersion) -> str:
    """Same store + same committed content -> same key -> Prefect creates no second training run."""
    return f"conveyor-train:{store_name}:{version.content_hash or version.commit_id}"


_FIELD = re.compile(r"\{(store|store_path|commit|commit_id|content_hash|total_episodes|total_frames)\}")


def render_parameters(template: Any, *, store: str, store_path: str, version: DatasetVersion) -> Any:
    """Fill `{store}`, `{store_path}`, `{commit}`, `{commit_id}`, `{content_hash}`, `{total_episodes}`,
    `{total_frames}` in the string values of `training.parameters` (nested dicts and lists too).

    The training flow's parameter names belong to the training issue, so the mapping lives in settings;
    a value that is exactly one placeholder keeps its type (e.g. an int for `{total_episodes}`).
    """
    values: dict[str, Any] = {"store": store, "store_path": store_path, "commit": version.commit,
                              "commit_id": version.commit_id, "content_hash": version.content_hash,
                              "total_episodes": version.total_episodes, "total_frames": version.total_frames}
    if isinstance(template, dict):
        return {k: render_parameters(v, store=store, store_path=store_path, version=version)
                for k, v in template.items()}
    if isinstance(template, list):
        return [render_parameters(v, store=store, store_path=store_path, version=version) for v in template]
    if isinstance(template, str):
        m = _FIELD.fullmatch(template)
        if m:
            return values[m.group(1)]
        return _FIELD.sub(lambda m: str(values[m.group(1)]), template)
    return template
