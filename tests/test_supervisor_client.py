"""`conveyor up`'s control plane through Prefect's own client (conveyor/service/supervisor.py): the per-store
concurrency limit and the rescue automation, created idempotently on a real Prefect server."""
from __future__ import annotations

from urllib.parse import quote

from conveyor.service.supervisor import RESCUE, Supervisor, api
from conveyor.settings import Settings
from tasks.limits import store_limit


def test_limits_and_the_rescue_automation_go_through_prefects_client(prefect_server, tmp_path):
    url = prefect_server.api_url
    said: list[str] = []
    sup = Supervisor(Settings(sources=[{"name": "数据集", "path": str(tmp_path)}]), api_url=url, out=said.append)
    for _ in range(2):  # every `conveyor up` does it again: no error, no second copy
        sup._create_limits()
    status, limit = api(url, "GET", f"/v2/concurrency_limits/{quote(store_limit('数据集'))}")  # urllib: ASCII only
    assert status == 200 and limit["limit"] == 1, limit

    if api(url, "GET", "/deployments/name/train/train")[0] == 404:  # (another test may have registered it)
        sup._create_rescue()
        assert said == [], "no train deployment yet: no automation"
    api(url, "POST", "/work_pools/", {"name": "gpu", "type": "process"})  # 409 when it exists
    status, flow = api(url, "POST", "/flows/", {"name": "train"})
    status, dep = api(url, "POST", "/deployments/", {"name": "train", "flow_id": flow["id"], "work_pool_name": "gpu"})
    # (an existing train/train is updated in place: the same id)
    assert status in (200, 201), dep
    for _ in range(2):
        sup._create_rescue()
    status, found = api(url, "POST", "/automations/filter", {"automations": {"name": {"any_": [RESCUE]}}})
    assert status == 200 and len(found) == 1, found
    trigger = found[0]["trigger"]
    assert trigger["match_related"]["prefect.resource.id"] == f"prefect.deployment.{dep['id']}"
    assert found[0]["actions"][0]["type"] == "change-flow-run-state" and said[-1].startswith(f"automation: {RESCUE}")
