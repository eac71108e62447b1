"""Published dataset versions and the worker cache: publish (incremental, no-op, shared with backups),
materialize (from S3 on another "machine", by hard links on the store's filesystem, from the cache),
LRU eviction with leases, atomicity, every bad input in one sentence, and a training run that keeps its
pinned version while the store is appended to and compacted (the issue's failure), on a real Prefect server."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from backup_helpers import new_bucket, raw_object, tree
from conveyor import backup as B
from conveyor.cli import main as cli
from conveyor.compact import compact
from conveyor.datasets import cache as C
from conveyor.datasets.format import find_version, list_versions, read_version
from conveyor.datasets.materialize import materialize
from conveyor.datasets.publish import publish
from conveyor.datasets.resolve import record_pin, resolve_dataset
from conveyor.datasets.retention import pin, prune_versions
from conveyor.errors import ConveyorError
from conveyor.ingest import convert, ingest
from conveyor.repo import open_repo
from conveyor.settings import S3Settings, Settings
from conveyor.store import CRASH_ENV, DOT, Store
from conveyor.synthetic.recording import CameraSpec, RecordingSpec, RecordingWriter

ROOT = Path(__file__).resolve().parents[1]
SPEC = RecordingSpec(fps=10, cameras=(CameraSpec("observation.images.cam", height=48, width=64, codec="h264"),))


def grow(src: Path, store: Path, episodes: range) -> None:
    w = RecordingWriter(src, SPEC)
    for ep in episodes:
        w.write_episode(ep, 8)
    if (store / DOT).is_dir():
        ingest(src, store)
    else:
        convert(src, store)


def dataset_files(store: Path) -> dict[str, str]:
    """The committed files a published version holds: the manifest minus the store's own `.conveyor/` files
    (the sorted values behind exact quantiles are committed too)."""
    return {rel: e.sha256 for rel, e in Store.open(store).manifest().items() if not rel.startswith(DOT + "/")}


def objects_in(repo) -> set[str]:
    return {o.key for p in ("blobs/", "packs/") for o in repo.list(p)}


def settings_for(tmp: Path, *, store_root: Path, storage_url: str, s3: S3Settings | None = None,
                 cache_dir: Path | None = None) -> Settings:
    return Settings(store_root=store_root, work_dir=tmp / "work", cache_dir=cache_dir or tmp / "cache",
                    storage_url=storage_url, s3=s3 or S3Settings())


@pytest.fixture
def lab(tmp_path) -> tuple[Path, Path]:
    """(source recording, store `lab` with 3 one-episode files)."""
    src, store = tmp_path / "rec", tmp_path / "stores" / "lab"
    grow(src, store, range(3))
    return src, store


# ------------------------------------------------------------------ publish


def test_publish_is_incremental_and_a_noop_when_nothing_changed(lab, tmp_path, capsys):
    src, store = lab
    repo = open_repo(f"file://{tmp_path / 'objects'}")
    first = publish(store, repo)
    assert first.published and first.files_sent == first.files_total == len(dataset_files(store))
    assert first.version == Store.open(store).version

    before = objects_in(repo)
    again = publish(store, repo)
    assert not again.published and again.files_sent == 0 and objects_in(repo) == before

    old = dataset_files(store)
    grow(src, store, range(3, 4))
    new = {rel for rel, sha in dataset_files(store).items() if old.get(rel) != sha}
    second = publish(store, repo)
    assert second.published and second.version.total_episodes == 4
    assert second.files_sent == len(new), "only the new episode's files and the rewritten metadata travel"
    assert second.bytes_sent == sum(f.size for f in read_version(repo, second.key).files if f.path in new)
    assert len(objects_in(repo) - before) <= 2, "one pack for the small files (all files here are small)"
    assert [r.commit for r in list_versions(repo, "lab")] == [first.version.commit, second.version.commit]

    cfg = tmp_path / "conveyor.toml"
    cfg.write_text(f'store_root = "{tmp_path / "stores"}"\nstorage_url = "file://{tmp_path / "objects"}"\n')
    assert cli(["--config", str(cfg), "publish", "lab"]) == 0
    assert "already published" in capsys.readouterr().out
    assert cli(["datasets", "--config", str(cfg), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["store"], r["episodes"], r["content_hash"]) for r in rows] == \
        [("lab", 3, first.version.content_hash), ("lab", 4, second.version.content_hash)]
    assert all(r["bytes"] > 0 and r["frames"] > 0 for r in rows)


def test_publish_reuses_the_backups_objects_and_gc_keeps_published_versions(lab, tmp_path):
    src, store = lab
    repo = open_repo(f"file://{tmp_path / 'objects'}")
    B.backup(store, repo)
    before = objects_in(repo)
    r = publish(store, repo)
    assert r.published and r.files_sent == 0 and objects_in(repo) == before, "nothing is stored twice"

    # a prune that expires every snapshot keeps what the published version names
    for i in B.snapshot_ids(repo):
        repo.delete([B.manifest_key(i)])
    B.prune(repo, keep_daily=1, keep_weekly=0)
    pv = read_version(repo, r.key)
    assert {f.object_key for f in pv.files} <= objects_in(repo)
    got = materialize(pv, tmp_path / "cache", repo=repo)
    assert tree(Path(got.path)) == dataset_files(store)


def test_backup_after_publish_sends_only_the_stores_bookkeeping(lab, tmp_path):
    """A file is stored once whether it was published or backed up: the first backup of a published store
    sends only the `.conveyor/` files a published version leaves out (one pack), not the dataset again."""
    src, store = lab
    repo = open_repo(f"file://{tmp_path / 'objects'}")
    publish(store, repo)
    before = objects_in(repo)
    size = sum(p.stat().st_size for p in (tmp_path / "objects").rglob("*") if p.is_file())
    r = B.backup(store, repo)
    bookkeeping = {f.path for f in B.read_manifest(repo, r.snapshot).files if f.path.startswith(DOT + "/")}
    assert r.files_sent == len(bookkeeping) and r.files_total == len(dataset_files(store)) + len(bookkeeping)
    assert len(objects_in(repo) - before) == r.objects_sent <= 1, "at most one pack of bookkeeping files"
    grown = sum(p.stat().st_size for p in (tmp_path / "objects").rglob("*") if p.is_file()) - size
    assert grown < 0.2 * size, f"the repository grew by {grown} of {size} bytes"
    B.restore(repo, r.snapshot, tmp_path / "back")      # the snapshot restores from the published objects
    assert {rel: sha for rel, sha in tree(tmp_path / "back").items() if not rel.startswith(DOT + "/")} == \
        dataset_files(store)


def test_version_retention_is_dated_keeps_newest_and_pinned(lab, tmp_path):
    from datetime import datetime, timedelta, timezone

    src, store = lab
    repo = open_repo(f"file://{tmp_path / 'objects'}")
    v1 = publish(store, repo)
    grow(src, store, range(3, 4))
    v2 = publish(store, repo)
    grow(src, store, range(4, 5))
    v3 = publish(store, repo)
    pin(repo, "lab", "run-a", v1.version)
    later = datetime.now(timezone.utc) + timedelta(days=40)
    r = prune_versions(repo, keep_days=30, now=later)
    assert r.deleted == [v2.key] and set(r.kept) == {v1.key, v3.key} and r.pinned == [v1.key]
    with pytest.raises(ConveyorError, match=f"`{v2.version.commit}` of `lab` is not published"):
        find_version(repo, "lab", str(v2.version.commit))
    assert prune_versions(repo, keep_days=30).deleted == [], "young versions stay"


# ------------------------------------------------------------------ materialize


def test_materialize_from_s3_on_a_worker_without_the_store(lab, tmp_path, s3_endpoint):
    src, store = lab
    url, s3 = f"s3://{new_bucket(s3_endpoint)}/lab-objects", S3Settings(endpoint_url=s3_endpoint)
    repo = open_repo(url, s3)
    publish(store, repo)
    worker = settings_for(tmp_path / "gpu", store_root=tmp_path / "gpu" / "stores", storage_url=url, s3=s3)
    first = resolve_dataset("lab", None, worker, run="r1", run_dir=tmp_path / "gpu" / "run1", archive_url=url,
                            log=lambda m: None)
    assert first.new_pin and not B.snapshot_ids(repo)
    record_pin(first, worker, run_dir=tmp_path / "gpu" / "run1", archive_url=url, log=lambda m: None)
    assert first.materialized.fetched_files == len(dataset_files(store)) and first.materialized.linked_store == 0
    assert tree(first.root) == dataset_files(store) and not (first.root / DOT).exists()
    assert first.root.is_relative_to(tmp_path / "gpu" / "cache") and (first.root.stat().st_mode & 0o222) == 0
    assert all((p.stat().st_mode & 0o222) == 0 for p in first.root.rglob("*")), "read-only, files and folders"
    pinned = json.loads(raw_object("s3", url, s3_endpoint, "runs/r1/dataset.json"))
    assert pinned["version"]["content_hash"] == Store.open(store).version.content_hash

    old = dataset_files(store)
    grow(src, store, range(3, 4))
    publish(store, repo)
    new = {rel for rel, sha in dataset_files(store).items() if old.get(rel) != sha}
    second = resolve_dataset("lab", None, worker, run="r2", run_dir=tmp_path / "gpu" / "run2", archive_url=url,
                             log=lambda m: None)
    m = second.materialized
    assert m.fetched_files == len(new), "the worker holding N fetches only what N+1 adds"
    assert m.fetched_bytes == sum((store / rel).stat().st_size for rel in new)
    assert m.linked_cache == len(dataset_files(store)) - len(new)
    assert tree(second.root) == dataset_files(store)

    # a retry of r1 on this worker reads r1's pin, not the newest version
    again = resolve_dataset("lab", None, worker, run="r1", run_dir=tmp_path / "elsewhere", archive_url=url,
                            log=lambda m: None)
    assert again.version == first.version and again.root == first.root and again.materialized.reused


@pytest.mark.filterwarnings("ignore:Logger 'prefect.task_runs' attempted to send logs")  # a task called alone
def test_a_credentials_block_reaches_the_training_runs_storage(lab, tmp_path, s3_endpoint, prefect_server):
    """A lab that keeps its object-storage endpoint and keys only in a prefect-aws block (`s3.aws_credentials_block`)
    publishes through it, and a GPU worker that has nothing else configured finds, pins and fetches the version
    through it too: the training tasks hand conveyor.training settings with the block applied. Settings with
    the block named but not applied are refused in one sentence, never sent to other credentials."""
    import uuid

    from prefect_aws import AwsCredentials
    from prefect_aws.client_parameters import AwsClientParameters

    from conveyor.settings import load_settings
    from conveyor.training.request import TrainRequest
    from tasks.repo import load_storage_settings
    from tasks.train import preflight_task

    src, store = lab
    block = f"lab-minio-{uuid.uuid4().hex[:8]}"
    AwsCredentials(aws_access_key_id="block-key-id-0001", aws_secret_access_key="block-secret-0002",
                   region_name="us-east-1",
                   aws_client_parameters=AwsClientParameters(endpoint_url=s3_endpoint)).save(block)
    url = f"s3://{new_bucket(s3_endpoint)}/lab-objects"

    def config(machine: str, store_root: Path) -> str:
        cfg = tmp_path / f"{machine}.toml"
        cfg.write_text(f'store_root = "{store_root}"\nwork_dir = "{tmp_path / machine / "work"}"\n'
                       f'cache_dir = "{tmp_path / machine / "cache"}"\nstorage_url = "{url}"\n'
                       f'[s3]\naws_credentials_block = "{block}"\n')
        return str(cfg)

    lab_cfg, gpu_cfg = config("lab", store.parent), config("gpu", tmp_path / "gpu" / "stores")
    assert cli(["--config", lab_cfg, "publish", "lab"]) == 0
    applied = load_storage_settings(gpu_cfg).s3
    assert applied.endpoint_url == s3_endpoint and applied.aws_credentials_block is None
    assert applied.access_key_id.get_secret_value() == "block-key-id-0001"
    assert applied.secret_access_key.get_secret_value() == "block-secret-0002"

    request = TrainRequest(store="lab", policy_type="act", device="cpu", steps=1, options=dict(TINY_ACT))
    plan = preflight_task(request, "blocked-run", gpu_cfg)
    assert plan.dataset_version == Store.open(store).version
    assert Path(plan.dataset_root).is_relative_to(tmp_path / "gpu" / "cache")
    assert tree(Path(plan.dataset_root)) == dataset_files(store)
    pinned = json.loads(raw_object("s3", url, s3_endpoint, "runs/blocked-run/dataset.json"))
    assert pinned["version"]["content_hash"] == Store.open(store).version.content_hash

    with pytest.raises(ConveyorError, match=f"aws_credentials_block `{block}` is named but was not applied"):
        resolve_dataset("lab", None, load_settings(gpu_cfg), run="r2", run_dir=tmp_path / "gpu" / "r2",
                        archive_url=url, log=lambda m: None)


def test_hardlink_materialization_on_the_stores_filesystem(lab, tmp_path):
    src, store = lab
    grow(src, store, range(3, 4))
    grow(src, store, range(4, 5))
    repo = open_repo(f"file://{tmp_path / 'objects'}")
    pv = read_version(repo, publish(store, repo).key)
    r = materialize(pv, tmp_path / "cache", repo=repo, live_store=store)
    assert r.fetched_files == 0 and r.linked_store == len(pv.files)
    for f in pv.files:
        assert (Path(r.path) / f.path).stat().st_ino == (store / f.path).stat().st_ino

    # the store is compacted: its files are replaced, the pinned version still materializes exactly
    compact(store)
    C.remove_tree(Path(r.path))
    again = materialize(pv, tmp_path / "cache", repo=repo, live_store=store)
    assert again.fetched_files > 0 and tree(Path(again.path)) == {f.path: f.sha256 for f in pv.files}


def test_lru_eviction_keeps_a_version_in_use(lab, tmp_path):
    src, store = lab
    repo = open_repo(f"file://{tmp_path / 'objects'}")
    cache = tmp_path / "cache"
    versions = []
    for n in range(3):
        if n:
            grow(src, store, range(2 + n, 3 + n))
        versions.append(read_version(repo, publish(store, repo).key))
    one = materialize(versions[0], cache, repo=repo)
    size = sum(c.size for c in C.cached_versions(cache))
    with C.lease(Path(one.path)):
        time.sleep(0.01)
        two = materialize(versions[1], cache, repo=repo)
        time.sleep(0.01)
        three = materialize(versions[2], cache, repo=repo, max_bytes=int(size * 1.5))
        assert three.evicted == [two.path], "least recently used and not in use"
        assert Path(one.path).is_dir() and Path(three.path).is_dir() and not Path(two.path).exists()
    assert C.evict(cache, 0, keep={Path(three.path)}) == [Path(one.path)], "released: now it can go"


def test_kill_during_materialize_leaves_no_readable_folder(lab, tmp_path):
    src, store = lab
    url = f"file://{tmp_path / 'objects'}"
    repo = open_repo(url)
    r = publish(store, repo)
    cache = tmp_path / "cache"
    code = (f"from conveyor.repo import open_repo\nfrom conveyor.datasets.format import read_version\n"
            f"from conveyor.datasets.materialize import materialize\nrepo = open_repo({url!r})\n"
            f"materialize(read_version(repo, {r.key!r}), {str(cache)!r}, repo=repo)\n")
    p = subprocess.run([sys.executable, "-c", code], env={**os.environ, CRASH_ENV: "materialize:built",
                                                          "PYTHONPATH": str(ROOT)}, capture_output=True)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert not (cache / "lab").exists() or not any((cache / "lab").iterdir()), "no version folder at all"
    assert any((cache / C.TMP).iterdir()), "the half-built folder is hidden in .tmp"
    got = materialize(read_version(repo, r.key), cache, repo=repo)
    assert tree(Path(got.path)) == dataset_files(store)
    assert not any((cache / C.TMP).iterdir()), "the killed build was cleaned up"


# ------------------------------------------------------------------ bad input, one sentence each


def _one_sentence(e: ConveyorError) -> str:
    assert "\n" not in str(e)
    return str(e)


def test_bad_inputs_are_refused_before_training(lab, tmp_path):
    src, store = lab
    url = f"file://{tmp_path / 'objects'}"
    repo = open_repo(url)
    r = publish(store, repo)
    worker = settings_for(tmp_path / "w", store_root=tmp_path / "w" / "stores", storage_url=url)

    def resolve(settings=worker, version=None, run="x"):
        return resolve_dataset("lab", version, settings, run=run, run_dir=tmp_path / "w" / run, archive_url=None,
                               log=lambda m: None)

    with pytest.raises(ConveyorError) as e:
        resolve(version="999")
    assert "`999` of `lab` is not published" in _one_sentence(e.value) and "conveyor datasets" in str(e.value)

    (tmp_path / "file").write_text("")
    blocked = settings_for(tmp_path / "w", store_root=tmp_path / "w" / "stores", storage_url=url,
                           cache_dir=tmp_path / "file" / "cache")
    with pytest.raises(ConveyorError, match="cache folder is not writable.*set cache_dir") as e:
        resolve(blocked, run="y")
    _one_sentence(e.value)

    no_storage = settings_for(tmp_path / "w", store_root=tmp_path / "w" / "stores", storage_url="")
    with pytest.raises(ConveyorError, match="no storage_url.*set storage_url") as e:
        resolve(no_storage, run="z")
    _one_sentence(e.value)

    pv = read_version(repo, r.key)
    blob_or_pack = pv.files[0].object_key
    data = raw_object("file", url, None, blob_or_pack)
    raw_object("file", url, None, blob_or_pack, data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ConveyorError, match="corrupt in storage; publish the store again") as e:
        resolve(run="c")
    assert blob_or_pack in _one_sentence(e.value)
    repo.delete([blob_or_pack])
    with pytest.raises(ConveyorError, match="missing from storage; publish the store again") as e:
        resolve(run="m")
    _one_sentence(e.value)
    assert not (tmp_path / "w" / "cache" / "lab").exists() or not any((tmp_path / "w" / "cache" / "lab").iterdir())


def test_object_storage_failures_refuse_the_run_in_one_sentence(lab, tmp_path, s3_endpoint):
    """The storage a worker resolves its dataset version from fails before any training starts: a bucket
    that does not exist, an endpoint that does not answer. One sentence that names the storage; nothing is
    left in the worker's cache."""
    from conveyor.processes import free_port

    def resolve(url: str, endpoint: str, run: str):
        worker = settings_for(tmp_path / "w", store_root=tmp_path / "w" / "stores", storage_url=url,
                              s3=S3Settings(endpoint_url=endpoint))
        return resolve_dataset("lab", None, worker, run=run, run_dir=tmp_path / "w" / run, archive_url=url,
                               log=lambda m: None)

    with pytest.raises(ConveyorError, match="bucket does not exist") as e:
        resolve("s3://no-such-bucket-conveyor/lab", s3_endpoint, "b")
    assert "s3://no-such-bucket-conveyor/lab" in _one_sentence(e.value)

    t0 = time.monotonic()
    with pytest.raises(ConveyorError, match="cannot reach the S3 endpoint") as e:
        resolve(f"s3://{new_bucket(s3_endpoint)}/lab", f"http://127.0.0.1:{free_port()}", "d")
    assert "/lab" in _one_sentence(e.value) and time.monotonic() - t0 < 60, "a refused connection fails fast"
    assert not (tmp_path / "w" / "cache").exists() or not any((tmp_path / "w" / "cache").rglob("*.parquet"))


def test_ingest_flow_publishes_each_commit(prefect_server, tmp_path):
    from flows.ingest import ingest as ingest_flow

    src = tmp_path / "rec"
    w = RecordingWriter(src, SPEC)
    w.write_episode(0, 8)
    cfg = tmp_path / "conveyor.toml"
    cfg.write_text(f'store_root = "stores"\nwork_dir = "work"\nstorage_url = "file://objects"\n'
                   f'[[sources]]\nname = "lab"\npath = "{src}"\n')
    first = ingest_flow(source="lab", config=str(cfg), deep=False)
    w.write_episode(1, 8)
    second = ingest_flow(source="lab", config=str(cfg), deep=False)
    assert ingest_flow(source="lab", config=str(cfg), deep=False)["added"] == []
    repo = open_repo(f"file://{tmp_path / 'objects'}")
    got = [(v.commit, v.hash_prefix) for v in list_versions(repo, "lab")]
    assert got == [(r["version"]["commit"], r["version"]["content_hash"][:16]) for r in (first, second)]


def test_cli_train_on_a_worker_without_the_store_or_storage_is_refused(prefect_server, tmp_path, capsys):
    cfg = tmp_path / "conveyor.toml"
    cfg.write_text('store_root = "stores"\nwork_dir = "work"\nstorage_url = ""\n')
    rc = cli(["--config", str(cfg), "train", "--store", "ghost", "--device", "cpu", "--policy-type", "act"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("conveyor: error:")]
    assert rc == 1 and len(err) == 1 and "set storage_url to where it is published" in err[0], err
    assert not (tmp_path / "data").exists() and not any((tmp_path / "work").rglob("lerobot")), "nothing started"


# ------------------------------------------------------------------ a training run keeps its version


TINY_ACT = {"policy.pretrained_backbone_weights": None, "policy.dim_model": 32, "policy.dim_feedforward": 64,
            "policy.n_heads": 2, "policy.n_encoder_layers": 1, "policy.n_decoder_layers": 1,
            "policy.n_vae_encoder_layers": 1, "policy.chunk_size": 5, "policy.n_action_steps": 5}


@pytest.mark.lerobot
@pytest.mark.slow
def test_pinned_run_survives_compaction_and_appends(prefect_server, tmp_path):
    """The issue's failure: a run on a store of one-episode commits; compaction merges the files (and more
    episodes land) while lerobot-train runs. The run finishes, and a resume later trains on the same version."""
    from conveyor.training.request import TrainRequest
    from flows.train import train

    src, store = tmp_path / "rec", tmp_path / "stores" / "lab"
    grow(src, store, range(1))
    for ep in range(1, 6):
        grow(src, store, range(ep, ep + 1))
    files_before = len(dataset_files(store))
    pinned = Store.open(store).version
    cfg = tmp_path / "conveyor.toml"
    cfg.write_text(f'store_root = "{tmp_path / "stores"}"\nwork_dir = "{tmp_path / "work"}"\n'
                   f'cache_dir = "{tmp_path / "cache"}"\nstorage_url = "file://{tmp_path / "objects"}"\n')
    req = dict(store="lab", policy_type="act", device="cpu", batch_size=2, num_workers=0, log_freq=1,
               save_freq=4, run_name="act-pinned", options=dict(TINY_ACT))
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(train(request=TrainRequest(steps=12, **req), config=str(cfg))))
    t.start()
    metrics = tmp_path / "work" / "runs" / "act-pinned" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().strip()):
        assert t.is_alive() and time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    grow(src, store, range(6, 8))                      # appends during the run
    rep = compact(store)                               # and the nightly compaction
    assert rep.files_after < files_before
    t.join(timeout=300)
    assert out["final_step"] == 12 and out["started_from"] == 0, out

    run_json = json.loads((tmp_path / "objects" / "runs/act-pinned/run.json").read_text())
    assert run_json["dataset"]["version"] == pinned.to_dict(), "lineage names the data it was trained on"
    assert run_json["dataset"]["root"].startswith(str(tmp_path / "cache"))
    ckpt = json.loads((tmp_path / "objects" / "runs/act-pinned/checkpoints/000012/manifest.json").read_text())
    assert ckpt["dataset"]["version"]["content_hash"] == pinned.content_hash
    assert not list((tmp_path / "objects" / "datasets/lab/pins").glob("*.json")), "finished: pin released"

    # a resume after the store moved on (and its old files are gone) trains on the same pinned version
    assert Store.open(store).version.commit > pinned.commit
    more = train(request=TrainRequest(steps=14, **req), config=str(cfg))
    assert more["started_from"] == 12 and more["final_step"] == 14
    run_json = json.loads((tmp_path / "objects" / "runs/act-pinned/run.json").read_text())
    assert run_json["dataset"]["version"] == pinned.to_dict()
