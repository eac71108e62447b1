"""Which deployments `conveyor up` registers (prefect.yaml rewritten for this machine and these settings), and
the leftover ones it clears: the cpu flows' deployments on the pool's default queue, which no worker polls."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import yaml

from conveyor.service.worker import deployment_name, machine_queue
from conveyor.settings import Settings


def flow_of(deployment: dict) -> str:
    """A prefect.yaml deployment's flow name: its entrypoint's function (each flow is named after it)."""
    return deployment["entrypoint"].rsplit(":", 1)[1]


def deployment_spec(settings: Settings, project: Path) -> tuple[dict, list[str]]:
    """prefect.yaml with the nightly and backup schedules from settings, the cpu flows named and queued for this
    machine (`<flow> on <machine>` on its own work queue), and without deployments whose flow file does not exist
    yet (returned by name)."""
    spec = yaml.safe_load((project / "prefect.yaml").read_text(encoding="utf-8"))
    kept, skipped = [], []
    for d in spec["deployments"]:
        if not (project / d["entrypoint"].split(":")[0]).is_file():
            skipped.append(d["name"])
            continue
        cron = {"nightly": settings.schedules.nightly_cron, "backup": settings.backup.cron}
        if d["name"] in cron:
            d["schedules"] = [{"cron": cron[d["name"]], "timezone": settings.schedules.timezone}]
        queue = machine_queue(settings, d["work_pool"]["name"])
        if queue:
            d["name"] = deployment_name(flow_of(d), queue)
            d["work_pool"] = {**d["work_pool"], "work_queue_name": queue}
        kept.append(d)
    spec["deployments"] = kept
    return spec, skipped


def remove_or_name_unserved(client_factory, settings: Settings, kept: list[dict], *, own_server: bool,
                            out: Callable[[str], None]) -> None:
    """A cpu deployment of the cpu flows on the pool's default queue (an older conveyor's `<flow>/<flow>`, or
    prefect.yaml deployed by hand) is served by no `conveyor up` worker. On `up`'s own server it is a leftover:
    removed, and said so; on a shared server it is named, with how to delete it. Deployments on another
    machine's queue are that machine's, even on `up`'s server (another PC may have joined it)."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, WorkPoolFilter, WorkPoolFilterName
    from prefect.exceptions import ObjectNotFound

    flows = sorted({flow_of(d) for d in kept if machine_queue(settings, d["work_pool"]["name"])})
    machine = settings.prefect.machine
    by_flow = FlowFilter(name=FlowFilterName(any_=flows))
    with client_factory() as client:
        deps = client.read_deployments(flow_filter=by_flow,
                                       work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=["cpu"])))
        flow_names = {f.id: f.name for f in client.read_flows(flow_filter=by_flow)}
        for d in deps:
            if (d.work_queue_name or "default") != "default":
                continue
            flow = flow_names.get(d.flow_id, "?")
            name = f"{flow}/{d.name}"
            removed = False
            if own_server:
                try:
                    client.delete_deployment(d.id)
                    removed = True
                except ObjectNotFound:
                    pass
            if removed:
                out(f"deployment {name} removed: replaced by {flow}/{deployment_name(flow, machine)}")
            else:
                out(f"note: deployment {name} sends its runs to pool cpu's default queue, which no "
                    "`conveyor up` worker polls (each takes its own machine's queue); delete it with "
                    f"`prefect deployment delete {name}`")
