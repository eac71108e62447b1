"""`train` flow (deployment `train/train` on work pool `gpu`) and `evaluate` flow.

Retries are the resume mechanism: every attempt continues from the newest complete checkpoint of the run
(local, else archived) and ends at exactly `request.steps`, on the dataset version the first attempt pinned
(`runs/<run>/dataset.json`, materialized in the worker's cache; see `conveyor.datasets.resolve`). The run name is fixed by the first attempt
(flow run id), so all retries and a later rerun with the same name share one run folder and archive prefix.
"""
from __future__ import annotations

from typing import Any

from prefect import flow, get_client
from prefect.runtime import flow_run

from conveyor.errors import ConveyorError
from conveyor.training.request import TrainRequest, default_run_name
from tasks.datasets import release_pin_task
from tasks.retry import is_transient
from tasks.train import evaluate_task, preflight_task, run_task
from tasks.views import rename_this_run


# config defaults to "" (not None): the form then shows a text input, not "Property is type None"; null is
# still accepted (anyOf string/null)
@flow(name="train", retries=2, retry_delay_seconds=30, log_prints=True)
def train(request: TrainRequest, config: str | None = "") -> dict[str, Any]:
    """Train a policy on a store with lerobot-train; archive checkpoints; resume on retry.

    Args:
        request: what to train, on which data, and where the checkpoints go.
        config: conveyor.toml on the training machine (empty: $CONVEYOR_CONFIG, else ./conveyor.toml).
    """
    run_name = request.run_name or default_run_name(request, (flow_run.get_id() or "local")[:8])
    what = f"{request.policy_type if not request.policy_path else 'finetune'} on {request.store}"
    try:
        plan = preflight_task(request, run_name, config)
    except ConveyorError as e:
        if not is_transient(e):  # unreachable storage or a busy lock may pass on retry; a refusal will not
            _refusal_is_final()
            rename_this_run(f"{what}, {request.steps} steps: refused")
        raise
    version = f" c{plan.dataset_version.commit}" if plan.dataset_version else ""
    rename_this_run(f"{plan.policy_type} on {plan.repo_id.split('/', 1)[-1]}{version}, {request.steps} steps")
    result = run_task(plan, config)
    release_pin_task(plan.run_name, plan.output_dir, plan.archive_url, config)
    return result.model_dump(mode="json")


def _refusal_is_final() -> None:
    """A preflight refusal will not pass on retry: drop this run's remaining retries before failing.

    Prefect 3 flows have no retry condition and the server's retry rule reads the run's policy, so
    the policy itself is updated.
    """
    run_id = flow_run.get_id()
    if not run_id:
        return
    with get_client(sync_client=True) as client:
        policy = client.read_flow_run(run_id).empirical_policy
        client.update_flow_run(run_id, empirical_policy=policy.model_copy(update={"retries": 0}))


@flow(name="evaluate")
def evaluate(run: str, episodes: list[int] | None = None, checkpoint: str | None = None,
             config: str | None = None) -> dict[str, Any]:
    """Per-joint MAE/MSE of a run's checkpoint (newest by default) on held-out episodes of its store."""
    return evaluate_task(run, episodes, config, checkpoint)
