"""Snapshots, restore, verify, retention, crash safety and the `backup` flow — on file:// and on a real S3
server (moto on 127.0.0.1) through the same cases."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from backup_helpers import (SECRET, TcpProxy, make_repo, moto_port, new_bucket, random_folder, raw_object, tree)
from conveyor import backup as B
from conveyor.cli import main as cli
from conveyor.errors import ConveyorError
from conveyor.ingest import convert, ingest
from conveyor.settings import S3Settings
from conveyor.repo import CorruptObject, open_repo
from conveyor.store import Store
from conveyor.synthetic.recording import RecordingSpec, RecordingWriter, write_recording

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["file", "s3"])
def backend(request):
    return request.param


@pytest.fixture
def repo(backend, tmp_path, s3_endpoint):
    url, s3, r = make_repo(backend, tmp_path, s3_endpoint)
    yield url, s3, r
    r.close()


@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> Path:
    """A small real v2.1 recording (5 episodes, 2 cameras: 5 parquet + 10 mp4 + meta)."""
    return write_recording(tmp_path_factory.mktemp("rec") / "rec", episodes=5, lengths=6)


def _store_files(store: Path) -> dict[str, str]:
    with Store.open(store).snapshot() as snap:
        return {rel: e.sha256 for rel, e in snap.files.items()}


def test_incremental_store_backup_sends_only_new_files(repo, tmp_path):
    url, _, objects = repo
    src = tmp_path / "src"
    w = RecordingWriter(src, RecordingSpec())
    for ep in range(3):
        w.write_episode(ep, 6)
    lab = tmp_path / "stores" / "lab"
    convert(src, lab, data_mb=0.001, video_mb=0.001)  # tiny file limits: every episode adds new files

    first = B.backup(lab, objects)
    before = _store_files(lab)
    assert first.kind == "store" and first.version == Store.open(lab).version
    assert first.files_sent == first.files_total == len(before) and first.files_skipped == 0

    for ep in (3, 4):
        w.write_episode(ep, 6)
    ingest(src, lab, data_mb=0.001, video_mb=0.001)
    after = _store_files(lab)
    new = {rel for rel, sha in after.items() if before.get(rel) != sha}
    assert 0 < len(new) < len(after)

    second = B.backup(lab, objects)
    assert second.version.total_episodes == 5
    assert second.files_sent == len(new), "only new or changed files travel"
    assert second.files_skipped == len(after) - len(new)
    m = B.read_manifest(objects, second.snapshot)
    assert {f.path: f.sha256 for f in m.files} == after

    third = B.backup(lab, objects)
    assert third.files_sent == 0 and third.files_total == len(after)


def test_no_change_backup_counts(repo, tmp_path, recording):
    """The local index supplies the hashes: nothing is hashed, sent or listed per file."""
    url, _, objects = repo
    src = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(recording), str(src)], check=True)
    old = time.time_ns() - 10**10
    for p in src.rglob("*"):
        os.utime(p, ns=(old, old))
    first = B.backup(src, objects, index_dir=tmp_path / "idx")
    assert first.objects_sent <= 2, "small files are packed, not one object each"
    index = json.loads(next((tmp_path / "idx").glob("*.json")).read_text())
    assert len(index["files"]) == first.files_total
    r = B.backup(src, objects, index_dir=tmp_path / "idx", now=datetime.now(timezone.utc) + timedelta(seconds=1))
    assert (r.files_sent, r.files_skipped, r.objects_sent) == (0, first.files_total, 0)


def test_restore_is_byte_identical(repo, tmp_path, recording):
    url, _, objects = repo
    big = random_folder(tmp_path / "mixed", small=20, big=2)  # blobs and packs
    for name, folder in (("rec", recording), ("mixed", big)):
        r = B.backup(folder, objects, name=name)
        dst = tmp_path / f"restored-{name}"
        B.restore(objects, name, dst)
        assert tree(dst) == tree(folder), f"{name}: every file hashes the same"
        for p in folder.rglob("*"):
            if p.is_file():
                assert (dst / p.relative_to(folder)).stat().st_mtime_ns == p.stat().st_mtime_ns
        with pytest.raises(ConveyorError, match="not empty"):
            B.restore(objects, r.snapshot, dst)
        B.restore(objects, r.snapshot, dst, force=True)
        assert tree(dst) == tree(folder)


def test_restored_store_is_the_same_store(repo, tmp_path, recording):
    url, _, objects = repo
    lab = tmp_path / "lab"
    convert(recording, lab)
    B.backup(lab, objects)
    dst = tmp_path / "back"
    B.restore(objects, "lab", dst)
    assert tree(dst) == {rel: sha for rel, sha in tree(lab).items() if rel in _store_files(lab)}
    assert Store.open(dst).version == Store.open(lab).version


def test_verify_full_catches_a_corrupted_object(repo, tmp_path, backend, s3_endpoint, capsys):
    url, s3, objects = repo
    folder = random_folder(tmp_path / "f", small=10, big=2)
    snap = B.backup(folder, objects, name="f").snapshot
    assert B.verify(objects, snap, full=True).ok
    m = B.read_manifest(objects, snap)
    blob = next(f.object_key for f in m.files if not f.pack)
    pack = next(f.object_key for f in m.files if f.pack)
    for key in (blob, pack):
        data = bytearray(raw_object(backend, url, s3_endpoint, key))
        data[len(data) // 2] ^= 0xFF  # same size, one byte flipped: only re-reading finds it
        raw_object(backend, url, s3_endpoint, key, bytes(data))

    assert B.verify(objects, snap, sample=0).ok, "sizes are right: a presence check cannot see it"
    full = B.verify(objects, snap, full=True)
    assert not full.ok
    assert any(blob in f for f in full.failures) and any(pack in f for f in full.failures)

    cfg = tmp_path / "conveyor.toml"
    cfg.write_text(f'[s3]\nendpoint_url = "{s3_endpoint}"\n')
    assert cli(["--config", str(cfg), "backup", "verify", f"{url}@{snap}", "--full"]) == 1
    err = capsys.readouterr().err
    assert blob in err and pack in err
    with pytest.raises(CorruptObject):
        B.restore(objects, snap, tmp_path / "r")


def test_retention_deletes_exactly_the_unreferenced_objects(repo, tmp_path):
    url, _, objects = repo
    folder = tmp_path / "f"
    base = datetime(2025, 3, 3, 3, 30, tzinfo=timezone.utc)  # a Monday
    ids = []
    for day in range(12):  # one snapshot a day, each adding a unique file; one file replaced each time
        random_folder(folder, small=2, big=0, seed=day)  # rewrites small_000/001 with new content
        (folder / f"day{day}.bin").write_bytes(os.urandom(2 << 20) if day % 3 == 0 else os.urandom(100))
        ids.append(B.backup(folder, objects, name="f", now=base + timedelta(days=day)).snapshot)
        if day == 5:
            ids.append(B.backup(folder, objects, name="f", now=base + timedelta(days=day, hours=1)).snapshot)
    keep = B.select_retained(B.snapshot_ids(objects), keep_daily=3, keep_weekly=2)
    # daily: days 11, 10, 9; weekly: ISO week 11's newest (day 11, Fri 14 Mar) and week 10's (day 6, Sun 9 Mar)
    assert keep == {ids[-1], ids[-2], ids[-3], ids[7]} and ids[7].endswith("20250309T033000.000Z")
    referenced = set().union(*(B.read_manifest(objects, i).object_keys() for i in keep))
    before = {o.key for p in ("blobs/", "packs/") for o in objects.list(p)}
    assert referenced < before

    r = B.prune(objects, keep_daily=3, keep_weekly=2)
    after = {o.key for p in ("blobs/", "packs/") for o in objects.list(p)}
    assert after == referenced
    assert r.deleted_objects == len(before - referenced)
    assert set(B.snapshot_ids(objects)) == keep
    for i in keep:
        assert B.verify(objects, i, full=True).ok
    oldest = min(keep, key=lambda i: i.split("/")[1])
    B.restore(objects, oldest, tmp_path / "old")


def test_prune_skips_gc_while_a_backup_holds_a_lock(repo, tmp_path):
    url, _, objects = repo
    folder = random_folder(tmp_path / "f", small=3, big=0)
    B.backup(folder, objects, name="f")
    (folder / "x").write_bytes(b"changed content")
    B.backup(folder, objects, name="f", now=datetime.now(timezone.utc) + timedelta(days=1))
    objects.put_bytes("locks/g-live.json", json.dumps({"host": "elsewhere", "pid": 1,
                                                     "time": datetime.now(timezone.utc).isoformat()}).encode())
    r = B.prune(objects, keep_daily=1, keep_weekly=0)
    assert len(r.deleted_snapshots) == 1 and r.gc_skipped and r.deleted_objects == 0


def _run_cli(*args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "conveyor.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_sigkill_mid_upload_leaves_no_broken_snapshot(tmp_path, s3_endpoint):
    """S3 only: the upload is slowed by a proxy so the kill lands mid-transfer."""
    bucket = new_bucket(s3_endpoint)
    folder = random_folder(tmp_path / "f", small=40, big=6, big_mb=1.2)
    proxy = TcpProxy(moto_port(s3_endpoint), delay_per_chunk=0.01)
    cfg = tmp_path / "conveyor.toml"
    cfg.write_text(f'work_dir = "{tmp_path / "work"}"\n[s3]\nendpoint_url = "{proxy.endpoint}"\n'
                   '[transfer]\nmax_concurrency = 2\n')
    url = f"s3://{bucket}/b"
    direct = open_repo(url, S3Settings(endpoint_url=s3_endpoint))
    p = _run_cli("--config", str(cfg), "backup", str(folder), "--to", url)
    deadline = time.monotonic() + 60
    while not any(True for _ in direct.list("blobs/")):
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert B.snapshot_ids(direct) == [], "killed before its manifest: no snapshot at all"

    proxy.delay = 0
    p = _run_cli("--config", str(cfg), "backup", str(folder), "--to", url)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    (snap,) = B.snapshot_ids(direct)
    assert B.verify(direct, snap, full=True).ok
    B.restore(direct, snap, tmp_path / "r")
    assert tree(tmp_path / "r") == tree(folder)
    r = B.prune(direct, 7, 4)  # the killed run's lock is stale (its pid is gone): GC runs
    assert r.gc_skipped is None
    proxy.down()


def test_cli_backup_snapshots_restore(tmp_path, s3_endpoint, recording, capsys):
    bucket = new_bucket(s3_endpoint)
    cfg = tmp_path / "conveyor.toml"
    cfg.write_text(f'store_root = "{tmp_path / "stores"}"\nwork_dir = "{tmp_path / "work"}"\n'
                   f'storage_url = "s3://{bucket}/nightly"\n'
                   f'[[sources]]\nname = "lab"\npath = "{recording}"\n'
                   f'[s3]\nendpoint_url = "{s3_endpoint}"\naccess_key_id = "AKIDCONVEYORCLI"\n'
                   f'secret_access_key = "{SECRET}"\n')
    convert(recording, tmp_path / "stores" / "lab")
    c = ["--config", str(cfg)]
    assert cli([*c, "backup", "lab"]) == 0          # the store named lab
    assert cli([*c, "backup", str(recording)]) == 0  # the source folder -> target lab.source
    assert cli([*c, "snapshots"]) == 0
    out = capsys.readouterr().out
    assert "lab.source/" in out and "lab/" in out and SECRET not in out
    assert cli([*c, "restore", f"s3://{bucket}/nightly@lab.source", str(tmp_path / "r")]) == 0
    assert tree(tmp_path / "r") == tree(recording)
    assert cli([*c, "restore", f"s3://{bucket}/nightly@lab.source", str(tmp_path / "r")]) == 1
    assert cli([*c, "restore", f"s3://{bucket}/nightly", str(tmp_path / "r2")]) == 1  # two targets: ambiguous
    assert cli([*c, "backup", "verify", "--full"]) == 0
    assert cli([*c, "backup", "prune", "--keep-daily", "1"]) == 0
    cap = capsys.readouterr()
    assert "several targets" in cap.err and SECRET not in cap.out + cap.err
    with pytest.raises(SystemExit) as e:
        cli([*c, "backup", "lab", "--full"])
    assert e.value.code == 2


# --------------------------------------------------------------------------------------------------
# the Prefect flow


def _flow_config(tmp_path, url_endpoint, storage_url, sources) -> Path:
    cfg = tmp_path / "conveyor.toml"
    lines = [f'store_root = "{tmp_path / "stores"}"', f'work_dir = "{tmp_path / "work"}"',
             f'storage_url = "{storage_url}"']
    for name, path in sources:
        lines += ["[[sources]]", f'name = "{name}"', f'path = "{path}"']
    lines += ["[s3]", f'endpoint_url = "{url_endpoint}"', 'access_key_id = "AKIDCONVEYORFLOW"',
              f'secret_access_key = "{SECRET}"', "[backup]", "verify_sample = 4"]
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def _task_runs(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as c:
        runs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        logs = c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        arts = c.read_artifacts()
    return runs, "\n".join(l.message for l in logs), arts


def test_flow_retries_then_fails_cleanly_when_s3_drops(prefect_server, tmp_path, s3_endpoint, monkeypatch):
    from flows.backup import backup as backup_flow

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    bucket = new_bucket(s3_endpoint)
    folder = random_folder(tmp_path / "rec", small=30, big=4, big_mb=1.5)
    proxy = TcpProxy(moto_port(s3_endpoint), fail_after=2_500_000)  # dies part-way through the upload
    cfg = _flow_config(tmp_path, proxy.endpoint, f"s3://{bucket}/b", [("rec", folder)])
    state = backup_flow(config=str(cfg), retry_delay_seconds=[0.2, 0.2], return_state=True)
    assert state.is_failed()
    runs, logs, _ = _task_runs(state.state_details.flow_run_id)
    (bt,) = [r for r in runs if r.name.startswith("backup-target")]
    assert bt.run_count == 3, "two retries on the transient error, then failed"
    direct = open_repo(f"s3://{bucket}/b", S3Settings(endpoint_url=s3_endpoint))
    assert B.snapshot_ids(direct) == [], "no manifest written"
    assert SECRET not in logs and "AKIDCONVEYORFLOW" not in logs

    proxy.fail_after = None
    proxy.up()
    state = backup_flow(config=str(cfg), retry_delay_seconds=[0.2], return_state=True)
    assert state.is_completed()
    (snap,) = B.snapshot_ids(direct)
    assert B.verify(direct, snap, full=True).ok
    proxy.down()


def test_flow_one_failing_target_does_not_stop_the_others(prefect_server, tmp_path, recording):
    from flows.backup import backup as backup_flow

    convert(recording, tmp_path / "stores" / "lab")
    repo_url = f"file://{tmp_path / 'objects'}"
    cfg = _flow_config(tmp_path, "http://127.0.0.1:9", repo_url,
                       [("lab", recording), ("gone", tmp_path / "no-such-folder")])
    state = backup_flow(config=str(cfg), retry_delay_seconds=[0.1], return_state=True)
    assert state.is_failed() and "gone.source" in str(state.message)
    objects = open_repo(repo_url)
    assert sorted(i.split("/")[0] for i in B.snapshot_ids(objects)) == ["lab", "lab.source"]
    runs, logs, arts = _task_runs(state.state_details.flow_run_id)
    failed = [r for r in runs if r.name.startswith("backup-target") and r.state.is_failed()]
    assert len(failed) == 1 and failed[0].run_count == 1, "a bad source is not retried"
    table = next(a for a in arts if a.key == "backup" and a.flow_run_id == state.state_details.flow_run_id)
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert {r["target"]: r["status"] for r in rows} == {"lab": "ok", "lab.source": "ok", "gone.source": "FAILED"}
    assert SECRET not in logs and SECRET not in json.dumps(rows)


@pytest.mark.slow  # 7 s (file://) and 12-20 s (S3 through a slowed proxy) on a busy machine
def test_prune_removes_what_a_killed_backup_left(backend, tmp_path, s3_endpoint):
    """kill -9 mid-upload leaves `locks/<writer>.json` and a temporary object (file://: `.tmp/<id>.<pid>.<host>`;
    S3: an unfinished multipart upload). prune removes the lock at once (same host, pid gone) and the temporary
    objects: file:// ones at once (they name their writer), multipart uploads once older than TMP_STALE_S."""
    # file://: big files, so each one's temporary copy lives long enough to be seen; S3: a slowed proxy
    folder = random_folder(tmp_path / "f", small=5, **(dict(big=5, big_mb=24) if backend == "file" else
                                                       dict(big=8, big_mb=6)))
    cfg = tmp_path / "conveyor.toml"
    proxy = None
    if backend == "file":
        url = f"file://{tmp_path / 'repo'}"
        direct = open_repo(url)
        cfg.write_text(f'work_dir = "{tmp_path / "work"}"\n')

        def leftovers():
            t = tmp_path / "repo" / ".tmp"
            return sorted(p.name for p in t.iterdir()) if t.is_dir() else []
    else:
        bucket = new_bucket(s3_endpoint)
        url = f"s3://{bucket}/b"
        direct = open_repo(url, S3Settings(endpoint_url=s3_endpoint))
        proxy = TcpProxy(moto_port(s3_endpoint), delay_per_chunk=0.01)
        cfg.write_text(f'work_dir = "{tmp_path / "work"}"\n[s3]\nendpoint_url = "{proxy.endpoint}"\n'
                       '[transfer]\nmultipart_threshold_mb = 5\nmultipart_chunksize_mb = 5\nmax_concurrency = 2\n')

        def leftovers():
            return [u["Key"] for u in direct.client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]
    p = _run_cli("--config", str(cfg), "backup", str(folder), "--to", url)
    deadline = time.monotonic() + 90
    while True:  # freeze the writer the moment a temporary object exists, then kill it
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, "no temporary object seen"
        if leftovers() and list(direct.list("locks/")):
            p.send_signal(signal.SIGSTOP)
            if leftovers():
                break
            p.send_signal(signal.SIGCONT)
        time.sleep(0.002)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert len(list(direct.list("locks/"))) == 1 and leftovers()

    r = B.prune(direct, 7, 4)
    assert r.locks_removed == 1 and list(direct.list("locks/")) == [] and r.gc_skipped is None
    # file://: removed at once (the name says whose it is); S3: by age, and moto reports every multipart upload
    # as initiated in 2010, so it goes at once here too (the age rule is tested on file:// below)
    assert r.incomplete_cleaned >= 1 and leftovers() == []
    p = _run_cli("--config", str(cfg), "backup", str(folder), "--to", url)
    assert p.wait(timeout=300) == 0, p.communicate()
    (snap,) = B.snapshot_ids(direct)
    assert B.verify(direct, snap, full=True).ok
    direct.close()
    if proxy:
        proxy.down()


def test_prune_removes_expired_locks_and_keeps_live_ones(repo):
    """A lock from another host cannot be checked for its pid: it is live until LOCK_STALE_S (6 h) old."""
    from conveyor.backup.retention import LOCK_STALE_S

    _, _, objects = repo
    now = datetime.now(timezone.utc)
    for name, t in (("old", now - timedelta(seconds=LOCK_STALE_S + 1)), ("young", now - timedelta(minutes=5))):
        objects.put_bytes(f"locks/{name}.json", json.dumps({"host": "elsewhere", "pid": 1,
                                                            "time": t.isoformat()}).encode())
    r = B.prune(objects, 7, 4, now=now)
    assert r.locks_removed == 1 and [o.key for o in objects.list("locks/")] == ["locks/young.json"]
    assert r.gc_skipped and "locks/young.json" in r.gc_skipped


def test_prune_removes_temporary_objects_past_the_limit(tmp_path):
    """A temporary object whose writer cannot be checked (another host) goes once older than TMP_STALE_S."""
    from conveyor.backup.retention import TMP_STALE_S

    objects = open_repo(f"file://{tmp_path / 'repo'}")
    objects.put_bytes("x", b"1")
    leftover = tmp_path / "repo" / ".tmp" / "0123abcd.4242.elsewhere"
    leftover.write_bytes(b"half an upload")
    assert B.prune(objects, 7, 4).incomplete_cleaned == 0 and leftover.exists()
    later = datetime.now(timezone.utc) + timedelta(seconds=TMP_STALE_S + 1)
    assert B.prune(objects, 7, 4, now=later).incomplete_cleaned == 1 and not leftover.exists()
