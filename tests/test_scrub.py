"""Scrub and repair on real stores and real backup repositories (file:// and moto S3): silent damage is
found and named with its episodes, healed byte for byte from snapshots, lost files are reported and left,
good files are never touched; damaged media never crash validation; the nightly flow scrubs and repairs."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from backup_helpers import make_repo
from conveyor import backup as B
from conveyor.cli import main as cli
from conveyor.compact import compact
from conveyor.errors import ConveyorError
from conveyor.ingest import convert, ingest
from conveyor.repair import repair
from conveyor.scrub import format_episodes, scrub
from conveyor.store import CRASH_ENV, Store
from conveyor.synthetic.recording import CameraSpec, RecordingSpec, RecordingWriter, write_recording
from conveyor.validate import validate_deep, validate_fast

ROOT = Path(__file__).resolve().parents[1]
SPEC = RecordingSpec(cameras=(CameraSpec("observation.images.laptop", codec="av1"),
                              CameraSpec("observation.images.phone", codec="h264")))
PHONE = "observation.images.phone"


def zero_middle(path: Path, n: int = 64) -> None:
    """The issue's damage: n bytes in the middle overwritten with zeros, size unchanged."""
    b = bytearray(path.read_bytes())
    m = len(b) // 2
    b[m:m + n] = bytes(n)
    path.write_bytes(bytes(b))


def stat_of(root: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file() and ".conveyor" not in p.parts}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return write_recording(tmp_path_factory.mktemp("scrub") / "src", episodes=4, lengths=[12, 9, 15, 10], spec=SPEC)


@pytest.fixture
def store(source, tmp_path) -> Path:
    """A store with one file per episode (tiny size targets, one commit per episode): damage maps to
    single episodes."""
    dst = tmp_path / "stores" / "lab"
    for n in range(1, 5):
        ingest(source, dst, data_mb=0.001, video_mb=0.001, max_episodes=1)
    assert Store.open(dst).version.total_episodes == 4
    return dst


def test_format_episodes():
    assert format_episodes([5, 0, 1, 2, 7, 8]) == "0-2, 5, 7-8"
    assert format_episodes([]) == ""


def test_scrub_passes_a_good_store_and_names_every_kind_of_damage(store, capsys):
    assert cli(["scrub", str(store)]) == 0
    assert "every byte as committed" in capsys.readouterr().out
    r = scrub(store)
    assert r.ok and r.files == len(Store.open(store).manifest()) and r.bytes > 0

    zero_middle(store / f"videos/{PHONE}/chunk-000/file-002.mp4")
    (store / "data/chunk-000/file-001.parquet").unlink()
    zero_middle(store / "meta/episodes/chunk-000/file-003.parquet", 16)
    zero_middle(store / "meta/stats.json", 4)
    (store / "data/chunk-000/file-099.parquet").write_bytes(b"stray")
    (store / ".conveyor" / "scratch").write_bytes(b"internal: ignored")

    assert cli(["scrub", str(store)]) == 1
    out = capsys.readouterr().out
    assert f"DAMAGED videos/{PHONE}/chunk-000/file-002.mp4: episodes 2, camera {PHONE}" in out
    assert "MISSING data/chunk-000/file-001.parquet: episodes 1, rows" in out
    assert "DAMAGED meta/episodes/chunk-000/file-003.parquet: episodes 3, episode metadata" in out
    assert "DAMAGED meta/stats.json: whole store" in out
    assert "EXTRA data/chunk-000/file-099.parquet: written by no commit" in out
    assert "scratch" not in out
    assert "3 damaged, 1 missing, 1 extra" in out


@pytest.mark.lerobot
def test_issue_case_validate_fails_cleanly_and_scrub_catches_it(store, tmp_path):
    """64 zero bytes in the middle of one camera's mp4: fast validate fails (sha256), deep validate FAILs
    naming episode, camera and file (no traceback), scrub names the file and its episodes."""
    video = store / f"videos/{PHONE}/chunk-000/file-001.mp4"
    zero_middle(video)
    fast = validate_fast(store)
    assert not fast.ok
    assert any(f"videos/{PHONE}/chunk-000/file-001.mp4" in c.name and "episodes 1" in c.detail
               for c in fast.failures)
    deep = validate_deep(store)
    assert not deep.ok
    decode_fails = [c for c in deep.failures if "episode 1" in c.name and "intact" not in c.name]
    assert decode_fails, deep.failures
    assert all(PHONE in c.detail and "file-001.mp4" in c.detail for c in decode_fails)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "conveyor.cli", "validate", "--deep", str(store)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "Traceback" not in p.stderr + p.stdout, p.stderr
    assert "FAIL" in p.stdout and f"camera {PHONE}" in p.stdout
    [d] = scrub(store).problems
    assert (d.path, d.problem, d.episodes, d.camera) == (f"videos/{PHONE}/chunk-000/file-001.mp4", "damaged", [1], PHONE)


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_repair_heals_from_the_newest_snapshot_and_touches_nothing_else(store, source, tmp_path, backend,
                                                                          s3_endpoint, capsys):
    url, s3, repo = make_repo(backend, tmp_path, s3_endpoint)
    B.backup(store, repo)
    version = Store.open(store).version
    committed = {rel: e.sha256 for rel, e in Store.open(store).manifest().items()}
    damaged = [f"videos/{PHONE}/chunk-000/file-002.mp4", "meta/info.json"]
    missing = "data/chunk-000/file-000.parquet"
    for rel in damaged:
        zero_middle(store / rel, 8)
    (store / missing).unlink()
    before = stat_of(store)

    r = repair(store, repo)
    assert sorted(h.path for h in r.healed) == sorted(damaged + [missing]) and not r.lost
    assert next(h for h in r.healed if h.path == missing).problem == "missing"
    assert scrub(store).ok
    after = stat_of(store)
    for rel, st in before.items():
        if rel not in damaged:
            assert after[rel] == st, f"{rel} was touched"
    assert {rel: e.sha256 for rel, e in Store.open(store).manifest().items()} == committed
    assert Store.open(store).version == version, "a repair is not a new dataset version"
    assert not any((store / ".conveyor" / "staging").iterdir())
    assert validate_fast(store, against=source).ok

    # the CLI: repair by store name from the configured storage_url, then scrub passes
    cfg = tmp_path / "conveyor.toml"
    cfg.write_text(f'store_root = "{store.parent}"\nstorage_url = "{url}"\n'
                   + (f'[s3]\nendpoint_url = "{s3_endpoint}"\n' if backend == "s3" else ""))
    zero_middle(store / damaged[0], 8)
    assert cli(["--config", str(cfg), "repair", "lab"]) == 0
    out = capsys.readouterr().out
    assert f"HEALED {damaged[0]} (episodes 2, camera {PHONE}) from {url}@lab/" in out
    assert "every byte as committed" in out.splitlines()[-1]
    assert cli(["--config", str(cfg), "scrub", "lab"]) == 0
    repo.close()


def test_a_file_no_snapshot_holds_is_lost_and_left_as_is(source, tmp_path, capsys):
    url, _, repo = make_repo("file", tmp_path, None)
    src = tmp_path / "rec"
    w = RecordingWriter(src, SPEC)
    for ep in range(2):
        w.write_episode(ep, 8)
    lab = tmp_path / "lab"
    convert(src, lab, data_mb=0.001, video_mb=0.001)
    B.backup(lab, repo)
    w.write_episode(2, 8)
    ingest(src, lab)  # after the backup: its files and the new info.json are in no snapshot
    new_video = f"videos/{PHONE}/chunk-000/file-002.mp4"
    old_video = f"videos/{PHONE}/chunk-000/file-000.mp4"
    for rel in (new_video, "meta/info.json", old_video):
        zero_middle(lab / rel, 8)
    kept = {rel: (lab / rel).read_bytes() for rel in (new_video, "meta/info.json")}

    assert cli(["repair", str(lab), "--from", url]) == 1
    cap = capsys.readouterr()
    assert f"HEALED {old_video} (episodes 0, camera {PHONE})" in cap.out
    assert f"{lab / new_video}: LOST, episodes 2, camera {PHONE}; left as is" in cap.err
    assert f"{lab / 'meta/info.json'}: LOST, whole store; left as is" in cap.err
    for rel, data in kept.items():
        assert (lab / rel).read_bytes() == data, "a lost file is never replaced by another version"
    assert sorted(d.path for d in scrub(lab).problems) == sorted(kept)


def test_repair_is_crash_safe(store, tmp_path):
    url, _, repo = make_repo("file", tmp_path, None)
    B.backup(store, repo)
    rel = f"videos/{PHONE}/chunk-000/file-003.mp4"
    zero_middle(store / rel)
    bad = (store / rel).read_bytes()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for point in ("repair:staged", "repair:renamed"):
        p = subprocess.run([sys.executable, "-m", "conveyor.cli", "repair", str(store), "--from", url],
                           env={**env, CRASH_ENV: point}, capture_output=True, timeout=120)
        assert p.returncode == -9
        s = Store.open(store)  # recovery drops the staging folder
        assert not any((s.dot / "staging").iterdir())
        if point == "repair:staged":
            assert (store / rel).read_bytes() == bad, "killed before the rename: the file is as it was"
        else:
            assert scrub(store).ok, "killed after the rename: the file is healed"
    assert cli(["repair", str(store), "--from", url]) == 0


def test_scrub_while_the_store_grows_and_compacts_reports_nothing(tmp_path):
    """Ingest and compaction replace and remove files while scrubs run: never a false alarm."""
    src = tmp_path / "rec"
    w = RecordingWriter(src, RecordingSpec())
    w.write_episode(0, 6)
    lab = tmp_path / "lab"
    convert(src, lab, data_mb=0.001, video_mb=0.001)
    stop, errors = threading.Event(), []

    def writer():
        try:
            for ep in range(1, 9):
                w.write_episode(ep, 6)
                ingest(src, lab)
                if ep % 3 == 0:
                    compact(lab)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            stop.set()

    t = threading.Thread(target=writer)
    t.start()
    scrubs = 0
    while not stop.is_set() or scrubs == 0:
        r = scrub(lab)
        assert r.ok, [d.line() for d in r.problems]
        scrubs += 1
    t.join()
    assert not errors and scrubs >= 2
    assert scrub(lab).ok and Store.open(lab).version.total_episodes == 9


# -- nightly ----------------------------------------------------------------------------------------


def _nightly_config(tmp_path: Path, url: str, extra: str = "") -> Path:
    cfg = tmp_path / "conveyor.toml"
    cfg.write_text(f'store_root = "stores"\nwork_dir = "work"\nstorage_url = "{url}"\n'
                   f'[[sources]]\nname = "lab"\npath = "rec"\n{extra}', encoding="utf-8")
    return cfg


@pytest.mark.lerobot
@pytest.mark.slow
def test_nightly_scrubs_repairs_and_fails_loudly_on_lost_files(prefect_server, tmp_path):
    from conveyor.repo import open_repo
    from conveyor.service.supervisor import api
    import prefect.context
    from flows.nightly import nightly

    prefect.context.refresh_global_settings_context()
    w = RecordingWriter(tmp_path / "rec", SPEC)
    for ep in range(2):
        w.write_episode(ep, 8)
    url = f"file://{tmp_path / 'objects'}"
    cfg = _nightly_config(tmp_path, url)
    store = tmp_path / "stores" / "lab"
    nightly(config=str(cfg), deep=False)
    with open_repo(url) as repo:
        B.backup(store, repo)
    [video] = (store / "videos" / PHONE).rglob("*.mp4")
    zero_middle(video)

    rows = nightly(config=str(cfg), deep=True)  # repair unset: on, since the repository holds a snapshot
    assert rows["lab"]["scrub"]["damaged"] == rows["lab"]["scrub"]["repaired"] == 1
    assert rows["lab"]["deep"] == "ok" and scrub(store).ok

    w.write_episode(2, 8)
    nightly(config=str(cfg), deep=False)  # ingest + compaction: files no snapshot holds yet
    # the committed video (the files compaction replaced stay on disk for readers until vacuum)
    [video] = [store / rel for rel in Store.open(store).manifest() if rel.startswith(f"videos/{PHONE}/")]
    zero_middle(video)
    state = nightly(config=str(cfg), deep=False, return_state=True)
    assert state.is_failed()
    msg = str(state.result(raise_on_failure=False))
    assert "\n" not in msg and "scrub: 1 file(s) lost" in msg and "episodes 0-2" in msg, msg
    assert video.relative_to(store).as_posix() in msg

    status, arts = api(prefect_server.api_url, "POST", "/artifacts/filter",
                       {"artifacts": {"key": {"any_": ["scrub-lab"]}}, "sort": "CREATED_DESC", "limit": 1})
    assert status == 200
    md = arts[0]["data"]
    assert f"| `{video.relative_to(store).as_posix()}` | damaged | episodes 0-2, camera {PHONE} | **LOST**" in md


@pytest.mark.lerobot
@pytest.mark.parametrize("rel,damage", [
    ("data/chunk-000/file-001.parquet", "zero"),
    ("data/chunk-000/file-001.parquet", "truncate"),
    ("meta/episodes/chunk-000/file-002.parquet", "zero"),
    ("meta/info.json", "zero"),
    ("meta/stats.json", "truncate"),
    ("meta/tasks.parquet", "truncate"),
    (f"videos/{PHONE}/chunk-000/file-000.mp4", "truncate"),
    (f"videos/{PHONE}/chunk-000/file-003.mp4", "delete"),
])
def test_validation_never_raises_on_a_damaged_file(store, rel, damage):
    p = store / rel
    if damage == "zero":
        zero_middle(p, 64)
    elif damage == "truncate":
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    else:
        p.unlink()
    for check in (validate_fast, validate_deep):
        r = check(store)
        assert not r.ok, f"{check.__name__} passed a store with {rel} damaged ({damage})"
        assert any(rel in c.name or rel in c.detail for c in r.failures), [c for c in r.failures]
    assert [d.path for d in scrub(store).problems] == [rel]


def test_a_backup_refuses_to_spread_damage(store, tmp_path):
    """A damaged committed file fails the backup, naming it; no snapshot without it appears."""
    url, _, repo = make_repo("file", tmp_path, None)
    zero_middle(store / "meta/stats.json", 4)
    with pytest.raises(ConveyorError, match="stats.json: does not hash to the sha256 its commit recorded"):
        B.backup(store, repo)
    assert B.snapshot_ids(repo) == []


# -- one line per damaged file (issue 21 item 5) -------------------------------------------------------------

@pytest.fixture
def one_file_store(source, tmp_path) -> Path:
    """Every episode in one data file: damage to it concerns all of them."""
    convert(source, tmp_path / "one")
    return tmp_path / "one"


def _failure_lines(report) -> list[str]:
    lines = [f"{c.name}: {c.detail}" for c in report.failures]
    assert len(lines) == len(set(lines)), lines  # nothing said twice
    return lines


def test_a_damaged_data_file_is_one_line_naming_its_episodes(one_file_store):
    zero_middle(one_file_store / "data/chunk-000/file-000.parquet")
    lines = _failure_lines(validate_fast(one_file_store))
    about = [ln for ln in lines if "readable" in ln]
    assert len(about) == 1 and about[0].startswith("file data/chunk-000/file-000.parquet readable: episodes 0-3: "), \
        lines
    assert not [ln for ln in lines if ln.startswith("episode ")], lines  # no line per episode


@pytest.mark.lerobot
def test_deep_validation_of_a_damaged_data_file_has_no_traceback_and_no_repeats(one_file_store):
    zero_middle(one_file_store / "data/chunk-000/file-000.parquet")
    lines = _failure_lines(validate_deep(one_file_store))
    assert len([ln for ln in lines if "readable" in ln]) == 1, lines
    assert not [ln for ln in lines if "Traceback" in ln or 'File "' in ln or "\n" in ln], lines


def test_a_dead_childs_output_is_its_exception_line():
    from conveyor.lerobot_check import last_error_line

    out = ('Traceback (most recent call last):\n  File "pyarrow/error.pxi", line 155, in check\n'
           '    raise convert_status(status)\n          ^^^^^^^^\nOSError: Unexpected end of stream\n')
    assert last_error_line(out) == "OSError: Unexpected end of stream"
    assert last_error_line("Killed\n") == "Killed" and last_error_line("") == "no output"


def test_the_verdict_reads_every_healed_file_again(store):
    """scrub -> repair -> verdict (conveyor.repair.scrub_then_repair, for the CLI and the nightly flow): a repair
    that reports a file healed while its bytes are still wrong does not pass."""
    from conveyor.repair import Healed, RepairReport, scrub_then_repair

    rel = "data/chunk-000/file-001.parquet"
    zero_middle(store / rel)

    def claims_to_heal(found):  # a repair step whose report says more than it did
        return RepairReport(store=str(store), repository="file:///nowhere",
                            healed=[Healed(path=d.path, snapshot="x", episodes=d.episodes) for d in found.damaged])

    v = scrub_then_repair(store, scrub_with=lambda: scrub(store), repair_with=claims_to_heal)
    assert v.rechecked == 1 and [d.path for d in v.left] == [rel] and not v.ok
    assert v.line() == f"scrub: 1 file(s) lost: {rel}; affects episodes 1"
    off = scrub_then_repair(store, scrub_with=lambda: scrub(store), repair_with=lambda found: None)
    assert off.line() == f"scrub: 1 file(s) damaged (repair off or no backup): {rel}; affects episodes 1"


def test_the_report_counts_the_frames_it_compared(source, one_file_store):
    """ValidationReport carries the counts the validation artifact shows (no parsing of check names)."""
    r = validate_fast(one_file_store, against=source)
    assert r.ok, r.failures
    assert r.frames_compared == (12 + 9 + 15 + 10) * 2  # every frame's timestamp, both cameras
    assert r.pixel_identical == 4 * 2 * 3  # 3 sampled frames per episode and camera, equal to the source's
