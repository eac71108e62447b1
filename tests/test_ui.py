"""The Prefect UI in a real browser: headless Chromium loads the run pages and the Artifacts page, and the
pictures conveyor embeds (store overview, loss curve) are there as decodable PNG images.

Needs Debian's `chromium` (`apt-get install -y chromium`; `.ci/run` installs it). Screenshots go to
$CONVEYOR_SCREENSHOTS when set (for people), else to the test's temporary folder.
"""
from __future__ import annotations

import base64
import html
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conveyor.synthetic.recording import CameraSpec, RecordingSpec, RecordingWriter

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [pytest.mark.slow, pytest.mark.browser,
              pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                 reason="needs Debian's chromium for the browser check: apt-get install -y chromium")]

SPEC = RecordingSpec(fps=10, cameras=(CameraSpec("observation.images.top", codec="h264"),))
TINY_ACT = {"policy.pretrained_backbone_weights": None, "policy.dim_model": 32, "policy.dim_feedforward": 64,
            "policy.n_heads": 2, "policy.n_encoder_layers": 1, "policy.n_decoder_layers": 1,
            "policy.n_vae_encoder_layers": 1, "policy.chunk_size": 5, "policy.n_action_steps": 5}
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def browse(url: str, shot: Path, profile: Path, budget_ms: int = 20_000) -> str:
    """Load `url` in headless Chromium, let the page's scripts run for `budget_ms` of virtual time, write a
    screenshot to `shot` and return the DOM as the browser built it."""
    profile.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
                        "--window-size=1400,1400", f"--screenshot={shot}", "--dump-dom", url],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert shot.stat().st_size > 10_000, "empty screenshot"
    return r.stdout


def embedded_pngs(dom: str) -> list[bytes]:
    """The PNG images the page shows from `data:` sources, decoded (a broken one fails here)."""
    out = []
    for src in re.findall(r'<img[^>]*\ssrc="data:image/png;base64,([^"]+)"', dom):
        png = base64.b64decode(html.unescape(src), validate=True)
        assert png.startswith(b"\x89PNG\r\n\x1a\n"), "not a PNG"
        out.append(png)
    return out


def png_size(png: bytes) -> tuple[int, int]:
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


@pytest.fixture
def prefect_api(prefect_server) -> str:
    import prefect.context

    prefect.context.refresh_global_settings_context()
    return prefect_server.api_url


def test_run_pages_show_the_store_and_loss_pictures(prefect_api, tmp_path):
    from flows.ingest import ingest
    from flows.train import train
    from conveyor.training.request import TrainRequest

    shots = Path(os.environ.get("CONVEYOR_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    ui = prefect_api.removesuffix("/api")
    cfg = tmp_path / "conveyor.toml"
    cfg.write_text('store_root = "stores"\nwork_dir = "work"\n[[sources]]\nname = "koch_grasp"\npath = "rec"\n'
                   'task = "pick the cube"\n', encoding="utf-8")
    w = RecordingWriter(tmp_path / "rec", SPEC)
    for ep, n in enumerate((12, 16, 20)):
        w.write_episode(ep, n)
    ingest(source="koch_grasp", config=str(cfg), deep=False)
    for ep, n in ((3, 14), (4, 18)):
        w.write_episode(ep, n)
    landed = ingest(source="koch_grasp", config=str(cfg), deep=True)
    trained = train.with_options(retries=0)(
        request=TrainRequest(store="koch_grasp", policy_type="act", device="cpu", batch_size=2, num_workers=0,
                             log_freq=1, steps=5, save_freq=5, archive=False, run_name="act-ui",
                             options=dict(TINY_ACT)),
        config=str(cfg), return_state=True)
    assert trained.is_completed(), trained.message
    import httpx

    [train_run] = httpx.post(f"{prefect_api}/flow_runs/filter", json={"flows": {"name": {"any_": ["train"]}},
                             "sort": "EXPECTED_START_TIME_DESC", "limit": 1}).json()

    # the ingest run: its name says what landed; the store picture is on the page
    dom = browse(f"{ui}/v2/runs/flow-run/{landed['run_id']}?tab=Artifacts", shots / "ingest-run.png",
                 tmp_path / "profile-ingest")
    assert "koch_grasp +2 ep -&gt; c2" in dom or "koch_grasp +2 ep -> c2" in dom
    pictures = embedded_pngs(dom)
    assert pictures and min(png_size(p)[0] for p in pictures) >= 400, "store picture missing on the ingest run"
    assert "validation-koch-grasp" in dom and "fast pass, deep pass" in dom

    # the train run: the loss curve is on the page, as image bytes (no file:// link)
    dom = browse(f"{ui}/v2/runs/flow-run/{train_run['id']}?tab=Artifacts", shots / "train-run.png",
                 tmp_path / "profile-train")
    assert [p for p in embedded_pngs(dom) if png_size(p) == (700, 350)], "loss curve missing on the train run"
    assert "train-config-act-ui" in dom and "file://" not in dom

    # the Artifacts page answers "what is in my dataset now"
    dom = browse(f"{ui}/v2/artifacts", shots / "artifacts.png", tmp_path / "profile-artifacts")
    assert "store-koch-grasp" in dom and embedded_pngs(dom)


# -- issue 18: the review sheet and the curate run ---------------------------------------------------------

DECODED = """<script>addEventListener("load", () => {
  const imgs = [...document.images];
  document.body.dataset.images = imgs.length;
  document.body.dataset.decoded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
});</script>"""


def data_images(dom: str) -> list[tuple[str, bytes]]:
    """The `data:image/png|jpeg` pictures of a page, checked to be what they say they are."""
    out = []
    for mime, src in re.findall(r'<img[^>]*\ssrc="data:image/(png|jpeg);base64,([^"]+)"', dom):
        data = base64.b64decode(html.unescape(src), validate=True)
        assert data.startswith(b"\x89PNG\r\n\x1a\n" if mime == "png" else b"\xff\xd8\xff"), mime
        out.append((mime, data))
    return out


def test_review_sheet_opens_in_the_browser_with_every_picture_decoded(tmp_path):
    """`conveyor review` on a real store; Chromium loads the file and decodes every embedded picture (a probe
    added to a copy of the page counts the images the browser decoded)."""
    from conveyor.cli import main
    from conveyor.ingest import ingest

    shots = Path(os.environ.get("CONVEYOR_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    spec = RecordingSpec(fps=15, cameras=(CameraSpec("observation.images.top", 96, 128, codec="h264"),
                                          CameraSpec("observation.images.wrist", 96, 128)))
    w = RecordingWriter(tmp_path / "rec", spec)
    for ep, n in enumerate((30, 40, 25, 45, 35)):
        w.write_episode(ep, n, "pick the cube" if ep != 2 else "place the cube")
    ingest(tmp_path / "rec", tmp_path / "koch_grasp")
    sheet = tmp_path / "review.html"
    assert main(["review", str(tmp_path / "koch_grasp"), "0-4", "-o", str(sheet)]) == 0
    page = sheet.read_text(encoding="utf-8")
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", DECODED + "</body>"), encoding="utf-8")
    dom = browse(probe.as_uri(), shots / "review-sheet.png", tmp_path / "profile-review")
    images = int(re.search(r'data-images="(\d+)"', dom).group(1))
    assert images == 5 * (2 * 4 + 1)  # per episode: 4 frames of 2 cameras and the plot
    assert re.search(r'data-decoded="(\d+)"', dom).group(1) == str(images), "a picture did not decode"
    assert len(data_images(dom)) == images
    assert [int(x) for x in re.findall(r"data-episode=\"?(\d+)", dom)] == [0, 1, 2, 3, 4]


def test_curate_run_page_shows_what_changed_and_the_new_version(prefect_api, tmp_path):
    import httpx

    from flows.curate import curate
    from flows.ingest import ingest

    shots = Path(os.environ.get("CONVEYOR_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    ui = prefect_api.removesuffix("/api")
    cfg = tmp_path / "conveyor.toml"
    cfg.write_text('store_root = "stores"\nwork_dir = "work"\n[[sources]]\nname = "koch_grasp"\npath = "rec"\n'
                   'task = "pick the cube"\n', encoding="utf-8")
    w = RecordingWriter(tmp_path / "rec", SPEC)
    for ep, n in enumerate((12, 16, 20, 14, 18)):
        w.write_episode(ep, n)
    landed = ingest(source="koch_grasp", config=str(cfg), deep=False)

    def artifact(key: str, run_id: str) -> dict:
        [a] = httpx.post(f"{prefect_api}/artifacts/filter", json={"artifacts": {
            "key": {"any_": [key]}, "flow_run_id": {"any_": [run_id]}}}).json()
        return a

    # the ingest run's review sheet: one row per new episode, thumbnails and plots as embedded images
    review = artifact("review-koch-grasp", landed["run_id"])
    dom = browse(f"{ui}/v2/artifacts/artifact/{review['id']}", shots / "ingest-review.png",
                 tmp_path / "profile-review-artifact")
    pics = data_images(dom)
    assert [m for m, _ in pics].count("jpeg") >= 5 and [m for m, _ in pics].count("png") >= 5
    assert "conveyor drop koch_grasp N --reason TEXT" in dom

    done = curate(request={"store": "koch_grasp", "action": "drop", "episodes": "1 3", "reason": "bumped the arm",
                           "task": None, "old_task": None, "start": None, "end": None}, config=str(cfg))
    c = done["version"]["commit"]
    dom = browse(f"{ui}/v2/runs/flow-run/{done['run_id']}?tab=Artifacts", shots / "curate-run.png",
                 tmp_path / "profile-curate")
    assert f"koch_grasp drop 2 ep -&gt; c{c}" in dom or f"koch_grasp drop 2 ep -> c{c}" in dom
    assert "curate-koch-grasp" in dom and "5 -&gt; 3 episodes" in dom.replace("-> ", "-&gt; ")
    changed = artifact("curate-koch-grasp", done["run_id"])
    dom = browse(f"{ui}/v2/artifacts/artifact/{changed['id']}", shots / "curate-artifact.png",
                 tmp_path / "profile-curate-artifact")
    text = re.sub(r"<[^>]+>", " ", dom)
    assert re.search(r"episodes\s+5\s+3", text) and re.search(r"frames\s+80\s+50", text), text[:3000]
    assert f"c{c}-" in text and "bumped the arm" in text and "Dataset version" in text

    # the deployment's form: the curation fields are plain text inputs (no str/None toggle per field)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name="cpu", type="process"))
        except Exception:  # noqa: BLE001 -- already there from another test
            pass
    dep = curate.to_deployment(name="curate-ui", work_pool_name="cpu").apply()
    dom = browse(f"{ui}/v2/deployments/deployment/{dep}/run", shots / "curate-form.png", tmp_path / "profile-form")
    text = re.sub(r"<[^>]+>", " ", dom)
    assert all(f in text for f in ("Episodes", "Reason", "Old task", "Start", "End", "retask"))
    assert text.count('Property is type "None"') + text.count("Property is type &quot;None&quot;") <= 1  # config
