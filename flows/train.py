"""`train` flow (deployment `train/train` on work pool `gpu`) and `evaluate` flow.

Retries are the resume mechanism: every attempt continues from the newest complete checkpoint of the run
(local, else archived) and ends at exactly `request.steps`. The run name is fixed by the first attempt
(flow run id), so all retries and a later rerun with the same name share one run folder and archive prefix.
"""
from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from conveyor.training.request import TrainRequest
from tasks.train import evaluate_task, preflight_task, run_task


def default_run_name(request: TrainRequest, run_id: str | None) -> str:
    policy = request.policy_type if not request.policy_path else "finetune"
    store = request.store.rstrip("/").split("/")[-1] or "store"
    return f"{policy}-{store}-{(run_id or 'local')[:8]}"


@flow(name="train", retries=2, retry_delay_seconds=30, log_prints=True)
def train(request: TrainRequest, config: str | None = None) -> dict[str, Any]:
    """Train a policy on a store with lerobot-train; archive checkpoints; resume on retry.

    config: conveyor.toml on the worker (default: $CONVEYOR_CONFIG or ./conveyor.toml).
    """
    run_name = request.run_name or default_run_name(request, flow_run.get_id())
    plan = preflight_task(request, run_name, config)
    result = run_task(plan, config)
    return result.model_dump(mode="json")


@flow(name="evaluate")
def evaluate(run: str, episodes: list[int] | None = None, checkpoint: str | None = None,
             config: str | None = None) -> dict[str, Any]:
    """Per-joint MAE/MSE of a run's checkpoint (newest by default) on held-out episodes of its store."""
    return evaluate_task(run, episodes, config, checkpoint)
