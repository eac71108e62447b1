"""The `rescue lost runs` automation `conveyor up` keeps on the server: a `train` run whose heartbeats stop goes
back to Scheduled, so any worker of its pool resumes it from its newest archived checkpoint."""
from __future__ import annotations

from collections.abc import Callable

from conveyor.service.worker import HEARTBEAT_SECONDS

RESCUE = "conveyor: rescue lost train runs"
RESCUE_AFTER_S = 75  # no heartbeat (every HEARTBEAT_SECONDS) for this long: the run's machine is gone


def replace_rescue(client_factory, out: Callable[[str], None]) -> None:
    """A Prefect automation: a `train` run whose heartbeats stop (its machine died, its worker was
    killed) goes back to Scheduled as AwaitingRetry, so any worker of the pool takes it up again and
    resumes from the run's newest archived checkpoint. Replaced on every start (the deployment id may
    have changed)."""
    from prefect.events.schemas.automations import AutomationCore
    from prefect.exceptions import ObjectNotFound

    with client_factory() as client:
        try:
            dep = client.read_deployment_by_name("train/train")
        except ObjectNotFound:
            return
        for a in client.read_automations_by_name(RESCUE):
            client.delete_automation(a.id)
        client.create_automation(AutomationCore.model_validate(rescue_body(dep.id)))
    out(f"automation: {RESCUE} (no heartbeat for {RESCUE_AFTER_S} s; heartbeat every {HEARTBEAT_SECONDS} s)")


def rescue_body(deployment_id) -> dict:
    """The automation as Prefect's AutomationCore takes it."""
    ended = ["Completed", "Failed", "Cancelled", "Crashed", "Cancelling", "Scheduled", "Paused"]
    body = {"name": RESCUE, "enabled": True,
            "description": f"A train run without a heartbeat for {RESCUE_AFTER_S} s lost its machine: "
                           "schedule it again (it resumes from its newest archived checkpoint).",
            "trigger": {"type": "event", "posture": "Proactive",
                        "match": {"prefect.resource.id": "prefect.flow-run.*"},
                        "match_related": {"prefect.resource.id": f"prefect.deployment.{deployment_id}",
                                          "prefect.resource.role": "deployment"},
                        "after": ["prefect.flow-run.heartbeat"],
                        "expect": ["prefect.flow-run.heartbeat", *(f"prefect.flow-run.{s}" for s in ended)],
                        "for_each": ["prefect.resource.id"], "threshold": 1, "within": RESCUE_AFTER_S},
            "actions": [{"type": "change-flow-run-state", "state": "SCHEDULED", "name": "AwaitingRetry",
                         "message": f"no heartbeat for {RESCUE_AFTER_S} s: its machine or worker is gone; "
                                    "rescheduled", "force": True}]}
    return body
