"""`conveyor review`: the HTML review sheet of a real store (synthetic recording, ingested in two commits).

The sheet has one card per episode asked, its thumbnails decode as images and show the episode's own frames,
its size is bounded, and a bad episode number is one line and exit 1 with nothing written.
"""
from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conveyor.cli import main
from conveyor.ingest import ingest
from conveyor.review import ARTIFACT_MAX_BYTES, html_sheet, markdown_sheet, review
from conveyor.synthetic.recording import CameraSpec, RecordingSpec, RecordingWriter, frame_pixels

TOP = CameraSpec("observation.images.top", 48, 64, codec="h264")
WRIST = CameraSpec("observation.images.wrist", 48, 64, dtype="image")
SPEC = RecordingSpec(fps=10, cameras=(TOP, WRIST))
LENGTHS = (12, 16, 9, 14)
TASKS = ("pick the cube", "pick the cube", "place the cube", "放下方块")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("review")
    w = RecordingWriter(tmp / "rec", SPEC)
    for ep in range(3):
        w.write_episode(ep, LENGTHS[ep], TASKS[ep])
    ingest(tmp / "rec", tmp / "koch")
    w.write_episode(3, LENGTHS[3], TASKS[3])
    ingest(tmp / "rec", tmp / "koch")
    return tmp / "koch"


def data_images(text: str) -> list[tuple[str, Image.Image]]:
    """Every `data:image/...;base64,` picture in a page, decoded (a broken one fails here)."""
    out = []
    for mime, b64 in re.findall(r"data:(image/(?:png|jpeg));base64,([A-Za-z0-9+/=]+)", text):
        img = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
        img.load()
        assert img.format == {"image/png": "PNG", "image/jpeg": "JPEG"}[mime]
        out.append((mime, img))
    return out


def cards(page: str) -> list[str]:
    return re.split(r"(?=<section class=card )", page)[1:]


def test_sheet_has_one_card_per_episode_with_decodable_pictures(store, tmp_path, capsys):
    out = tmp_path / "sheet.html"
    assert main(["review", str(store), "3", "0-1", "-o", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    page = out.read_text(encoding="utf-8")
    assert "<script" not in page and "src=\"http" not in page and "file://" not in page  # self-contained
    got = cards(page)
    assert [int(re.search(r"data-episode=(\d+)", c).group(1)) for c in got] == [0, 1, 3]  # sorted, unique
    for c, ep in zip(got, (0, 1, 3)):
        assert f"<span class=ep title=\"store episode\">{ep}</span>" in c
        assert f"{LENGTHS[ep]} frames" in c and TASKS[ep] in c
        assert f"came in c{1 if ep < 3 else 2} " in c  # the commit it came in, from the ledger
        pics = data_images(c)
        # 4 frames of each camera (first, evenly spaced, last) + the state/action plot
        assert [m for m, _ in pics] == ["image/jpeg"] * 8 + ["image/png"]
        assert all(img.size == (64, 48) for _, img in pics[:8])
        assert pics[8][1].size[0] >= 300
        picks = [str(i) for i in np.round(np.linspace(0, LENGTHS[ep] - 1, 4)).astype(int)]
        assert re.findall(r"frame (\d+)</figcaption>", c) == picks * 2


def test_thumbnails_are_the_episodes_own_frames(store):
    """The first and last thumbnail of each camera look like the recorded frame (lossy: close, not equal) and
    clearly unlike another episode's."""
    sheet = review(store, [1, 2])
    for card in sheet.cards:
        for cam, spec in (("top", TOP), ("wrist", WRIST)):
            for frame, pic in (card.thumbs[cam][0], card.thumbs[cam][-1]):
                got = np.asarray(Image.open(io.BytesIO(pic.data)).convert("RGB"), dtype=np.int16)
                mine = frame_pixels(SPEC, spec, card.episode_index, frame).astype(np.int16)
                other = frame_pixels(SPEC, spec, 3 - card.episode_index, frame).astype(np.int16)
                near, far = np.abs(got - mine).mean(), np.abs(got - other).mean()
                assert near < 12 and far > 3 * near, (card.episode_index, cam, frame, near, far)


def test_size_is_bounded_and_the_rest_named(store, tmp_path):
    full = review(store, [0, 1, 2, 3])
    per_card = max(c.picture_bytes for c in full.cards)
    capped = review(store, [0, 1, 2, 3], max_episodes=2)
    assert [c.episode_index for c in capped.cards] == [0, 1] and capped.left_out == [2, 3]
    assert "2 of 4 episodes shown" in capped.note() and "conveyor review koch 2-3" in capped.note()
    budget = int(per_card * 1.5)  # room for one card only
    small = review(store, [0, 1, 2, 3], max_bytes=budget)
    assert len(small.cards) == 1 and sum(c.picture_bytes for c in small.cards) <= budget
    out = tmp_path / "capped.html"
    from conveyor.review import html_sheet

    out.write_text(html_sheet(capped), encoding="utf-8")
    page = out.read_text(encoding="utf-8")
    assert len(cards(page)) == 2 and "conveyor review koch 2-3" in page
    # the artifact form: a markdown table, one row per episode, pictures inline, under its byte bound
    md = markdown_sheet(review(store, [2, 3], max_bytes=ARTIFACT_MAX_BYTES))
    assert len(md.encode()) < ARTIFACT_MAX_BYTES
    assert re.findall(r"^### Episode (\d+) · (\d+) frames", md, flags=re.M) == [("2", "9"), ("3", "14")]
    pics = data_images(md)  # per episode: one contact sheet (a row of 4 frames per camera) and the plot
    assert [(m, img.size) for m, img in pics[:2]] == [("image/jpeg", (4 * 64 + 3 * 2, 2 * 48 + 2)),
                                                      ("image/png", pics[1][1].size)] and len(pics) == 4
    assert "place the cube" in md and "放下方块" in md


def test_bad_episode_is_one_line_exit_1_and_nothing_written(store, tmp_path, capsys):
    out = tmp_path / "bad.html"
    assert main(["review", str(store), "1", "9", "-o", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(store) in err and "episode 9 is not in the store (it has episodes 0-3)" in err
    assert not out.exists()
    assert main(["review", str(store), "1-x"]) == 2  # a malformed list is a usage error


def test_a_curated_store_reviews_its_current_episodes(store, tmp_path):
    """After a drop and a trim, cards follow the store's current numbering: the ledger's source episode, the
    trimmed span (its first thumbnail is the first kept source frame), and the dropped episode is gone."""
    import shutil

    from conveyor import curate

    curated = tmp_path / "koch"
    shutil.copytree(store, curated)
    curate.drop(curated, [1], "bumped")
    curate.trim(curated, 1, 2, 7)  # store episode 1 is now source episode 2: keep its frames 2..6
    sheet = review(curated, [0, 1, 2])
    assert [(c.episode_index, c.source_episode_index, c.length) for c in sheet.cards] == [(0, 0, 12), (1, 2, 5),
                                                                                        (2, 3, 14)]
    trimmed = sheet.cards[1]
    assert trimmed.source_start == 2 and [i for i, _ in trimmed.thumbs["top"]] == [0, 1, 3, 4]
    for cam, spec in (("top", TOP), ("wrist", WRIST)):
        got = np.asarray(Image.open(io.BytesIO(trimmed.thumbs[cam][0][1].data)).convert("RGB"), dtype=np.int16)
        kept = frame_pixels(SPEC, spec, 2, 2).astype(np.int16)
        cut = frame_pixels(SPEC, spec, 2, 0).astype(np.int16)
        near, far = np.abs(got - kept).mean(), np.abs(got - cut).mean()
        assert near < 12 and far > 2 * near, (cam, near, far)
    page = html_sheet(sheet)
    assert "trimmed: source frames 2-6" in page and len(cards(page)) == 3
    assert "trimmed: source frames 2-6" in markdown_sheet(sheet)
    with pytest.raises(Exception, match="episode 3 is not in the store"):
        review(curated, [3])
