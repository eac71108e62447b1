"""The `curate` deployment and the ingest run's review sheet, against the real Prefect server fixture.

The curate form's schema takes nulls for every optional field (the train form did not: issue 22 item 4) and
the server refuses what the form must refuse; a curate run waits for the store's writer slot, commits one new
version, is renamed after what it did and shows before -> after; each ingest run carries a review sheet of its
new episodes, bounded in size.
"""
from __future__ import annotations

import base64
import io
import re
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from conveyor.curate_request import CurateRequest
from conveyor.review import ARTIFACT_MAX_BYTES
from conveyor.store import Store
from conveyor.synthetic.recording import CameraSpec, RecordingSpec, RecordingWriter

pytestmark = pytest.mark.prefect
SPEC = RecordingSpec(fps=10, cameras=(CameraSpec("observation.images.top", 48, 64, codec="h264"),))
LENGTHS = (12, 16, 10, 14, 18)
NULLS = {"episodes": None, "reason": None, "task": None, "old_task": None, "start": None, "end": None}


@pytest.fixture
def prefect_api(prefect_server) -> str:
    import prefect.context

    prefect.context.refresh_global_settings_context()
    return prefect_server.api_url


def api(url: str, method: str, path: str, body: dict | None = None) -> tuple[int, object]:
    r = httpx.request(method, url + path, json=body, timeout=30)
    return r.status_code, (r.json() if r.content else None)


def run_artifacts(url: str, run_id: str, key: str) -> list[dict]:
    status, arts = api(url, "POST", "/artifacts/filter", {"artifacts": {"key": {"any_": [key]},
                                                                        "flow_run_id": {"any_": [run_id]}}})
    assert status == 200, arts
    return arts


def pictures(text: str) -> list[Image.Image]:
    out = []
    for b64 in re.findall(r"data:image/(?:png|jpeg);base64,([A-Za-z0-9+/=]+)", text):
        img = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
        img.load()
        out.append(img)
    return out


def lab(tmp_path: Path, name: str, extra: str = "") -> Path:
    cfg = tmp_path / "conveyor.toml"
    cfg.write_text(f'store_root = "stores"\nwork_dir = "work"\n{extra}[[sources]]\nname = "{name}"\npath = "rec"\n'
                   f'task = "pick the cube"\n', encoding="utf-8")
    w = RecordingWriter(tmp_path / "rec", SPEC)
    for ep, n in enumerate(LENGTHS):
        w.write_episode(ep, n)
    return cfg


def test_form_schema_takes_nulls_and_refuses_what_it_must(prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from flows.curate import curate

    with get_client(sync_client=True) as c:
        try:
            c.create_work_pool(WorkPoolCreate(name="cpu", type="process"))
        except Exception:  # noqa: BLE001 -- already there from another test
            pass
    curate.to_deployment(name="curate-form", work_pool_name="cpu").apply()
    status, dep = api(prefect_api, "GET", "/deployments/name/curate/curate-form")
    assert status == 200, dep
    schema = dep["parameter_openapi_schema"]
    assert schema["required"] == ["request"]
    form = schema["definitions"]["CurateRequest"]["properties"]
    assert set(form) == set(CurateRequest.model_fields)
    assert form["action"]["enum"] == ["drop", "undrop", "trim", "retask", "rename"]
    assert form["action"]["default"] == "drop"
    for name, field in CurateRequest.model_fields.items():
        assert form[name].get("description", "").startswith(field.description), name
    # optional fields are plain text inputs (no str/None toggle in the form) that still take null (below)
    for name in NULLS:
        assert form[name]["type"] == "string" and "anyOf" not in form[name] and "default" not in form[name], name

    def create(request: dict, config=None) -> tuple[int, object]:
        return api(prefect_api, "POST", f"/deployments/{dep['id']}/create_flow_run",
                   {"parameters": {"request": request, "config": config}})

    # every optional field null (a cleared input, an API caller), config null too: accepted by the server
    for request in ({"store": "koch", "action": "drop", **NULLS, "episodes": "3 7 12-15", "reason": "bumped"},
                    {"store": "koch", "action": "trim", **NULLS, "episodes": "4", "start": "1.5s", "end": "40"},
                    {"store": "koch", "action": "rename", **NULLS, "old_task": "pick", "task": "pick the cube"}):
        status, run = create(request)
        assert status == 201, (request, run)
        assert CurateRequest.model_validate(run["parameters"]["request"])  # and the flow's own model takes it
    status, run = create({"store": "koch", **NULLS})  # the form as it opens: the schema takes it, the model
    assert status == 201, run                            # then says what the default action needs (below)
    # the server's parameter check is real: an unknown action or a missing store is refused before any run
    for request in ({"store": "koch", "action": "explode", **NULLS}, {"action": "drop", **NULLS}):
        status, body = create(request)
        assert status == 409 and "Validation failed" in str(body), (request, status, body)
    # what the schema cannot say, the model does, in one sentence naming the field
    for request, words in (({"store": "koch", "action": "drop", "episodes": "1"}, "drop needs Reason"),
                           ({"store": "koch", "action": "trim", "episodes": "1 2", "start": "0", "end": "4"},
                            "trim takes one episode"),
                           ({"store": "koch", "action": "retask", "episodes": "1-x", "task": "t"},
                            "not an episode or range: '1-x'")):
        with pytest.raises(ValueError, match=re.escape(words)):
            CurateRequest.model_validate(request)


def test_ingest_run_carries_a_bounded_review_sheet_of_its_new_episodes(prefect_api, tmp_path):
    from flows.ingest import ingest

    name = "review-src"
    cfg = lab(tmp_path, name)
    res = ingest(source=name, config=str(cfg), deep=False)
    assert res["added"] == [0, 1, 2, 3, 4]
    [art] = run_artifacts(prefect_api, res["run_id"], "review-review-src")
    md = art["data"]
    assert len(md.encode()) < ARTIFACT_MAX_BYTES
    rows = re.findall(r"^### Episode (\d+) · (\d+) frames", md, flags=re.M)
    assert [(int(e), int(n)) for e, n in rows] == list(enumerate(LENGTHS))
    pics = pictures(md)
    assert len(pics) == 5 * 2  # per episode: 3 frames of the one camera in one picture, and the plot
    assert pics[0].size == (3 * 64 + 2 * 2, 48) and pics[0].format == "JPEG" and pics[1].format == "PNG"
    assert "review 5 new episode(s), 0-4" in art["description"]
    assert [p.size for p in pictures(art["description"])] == [pics[0].size]


def test_curate_run_waits_for_the_store_slot_commits_and_shows_what_changed(prefect_api, tmp_path):
    from prefect.concurrency.sync import concurrency

    from conveyor import ingest as core
    from flows.curate import curate

    name = "curate-src"
    cfg = lab(tmp_path, name, f'storage_url = "file://{tmp_path / "objects"}"\n')
    store = tmp_path / "stores" / name
    core.ingest(tmp_path / "rec", store)
    before = Store.open(store).version
    status, _ = api(prefect_api, "POST", "/v2/concurrency_limits/", {"name": f"store-{name}", "limit": 1})
    assert status in (200, 201)

    result: dict = {}
    held = threading.Event()
    release = threading.Event()

    def writer():  # another writer of the store (an ingest, a compaction) holds the slot
        with concurrency(f"store-{name}", occupy=1):
            held.set()
            release.wait(60)

    t = threading.Thread(target=writer)
    t.start()
    assert held.wait(60)
    runner = threading.Thread(target=lambda: result.update(curate(
        request={"store": name, "action": "drop", **NULLS, "episodes": "1 3", "reason": "operator bumped the arm"},
        config=str(cfg))))
    runner.start()
    time.sleep(4)
    assert Store.open(store).version == before, "curated while another writer held the store's slot"
    release.set()
    runner.join(120)
    t.join(10)
    assert result, "the curate run did not finish"

    after = Store.open(store).version
    assert (after.commit, after.total_episodes, after.total_frames) == (
        before.commit + 1, 3, sum(LENGTHS) - LENGTHS[1] - LENGTHS[3])
    status, run = api(prefect_api, "GET", f"/flow_runs/{result['run_id']}")
    assert run["name"] == f"{name} drop 2 ep -> c{after.commit}"
    [art] = run_artifacts(prefect_api, result["run_id"], "curate-curate-src")
    md = art["data"]
    assert "| episodes | 5 | 3 |" in md
    assert f"| frames | {sum(LENGTHS)} | {after.total_frames} |" in md
    assert f"| minutes | {sum(LENGTHS) / 10 / 60:.2f} | {after.total_frames / 10 / 60:.2f} |" in md
    assert f"| version | `{before.short}` | `{after.short}` |" in md
    assert f"Dataset version `{after.commit}`" in md and "operator bumped the arm" in md
    assert art["description"].startswith(f"{name}: drop 2 episode(s): 5 -> 3 episodes")
    [version] = run_artifacts(prefect_api, result["run_id"], "version-curate-src")
    assert f"| commit | {after.commit} |" in version["data"]
    # published, so the train form's Dataset version `N` finds it on any machine
    from conveyor.datasets.format import find_version
    from conveyor.repo import open_repo

    assert find_version(open_repo(f"file://{tmp_path / 'objects'}"), name, str(after.commit)).version == after

    # the form as a person fills it: retask with seconds-free text fields, the rest cleared; a new version again
    res = curate(request={"store": name, "action": "retask", **NULLS, "episodes": "0-1", "task": "place the cube"},
                 config=str(cfg))
    assert res["version"]["commit"] == after.commit + 1 and res["episodes_after"] == 3
    status, run = api(prefect_api, "GET", f"/flow_runs/{res['run_id']}")
    assert run["name"] == f"{name} retask 2 ep -> c{after.commit + 1}"

    # a request the model refuses fails the run in one sentence and writes nothing
    state = curate(request={"store": name, "action": "drop", **NULLS, "episodes": "0"}, config=str(cfg),
                   return_state=True)
    assert state.is_failed() and "drop needs Reason" in state.message
    assert Store.open(store).version.commit == after.commit + 1
