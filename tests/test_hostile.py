"""Hostile conditions, each on real files and real services: a full disk (a small tmpfs mounted by the
test) during ingest, compaction, repair, restore and materializing a dataset version for training; a
read-only store; an unreadable source file; paths with spaces and non-ASCII characters; an S3 endpoint
answering 503 SlowDown in the middle of a backup.

Every command must fail with one line naming the problem, leave the previous state intact, and succeed
once the condition is gone. The tests run as root: mounts are real; permission checks use `setpriv` to
drop the capabilities that let root ignore permission bits.
"""
from __future__ import annotations

import http.client
import os
import subprocess
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from backup_helpers import moto_port, new_bucket, tree
from conveyor import backup as B
from conveyor.datasets.format import read_version
from conveyor.datasets.publish import publish
from conveyor.datasets.resolve import resolve_dataset
from conveyor.errors import ConveyorError
from conveyor.settings import S3Settings, Settings
from conveyor.repo import open_repo
from conveyor.store import Store
from conveyor.scrub import scrub
from conveyor.synthetic.recording import RecordingSpec, RecordingWriter
from conveyor.validate import validate_fast

ROOT = Path(__file__).resolve().parents[1]
SPEC = RecordingSpec()
NO_DAC = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search",
          "--"]  # root that obeys permission bits


def conveyor(*args: str, cwd: Path | None = None, as_user: bool = False, timeout: float = 300):
    """Run the real CLI in a subprocess; returns CompletedProcess (text)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "conveyor.cli", *args]
    return subprocess.run((NO_DAC if as_user else []) + cmd, cwd=cwd or ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def one_line_error(p, *needles: str) -> str:
    """The command failed with exactly one `conveyor: error:` line and no traceback."""
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr + p.stdout, p.stderr
    errs = [line for line in p.stderr.splitlines() if line.startswith("conveyor: error:")]
    assert len(errs) == 1, p.stderr
    for n in needles:
        assert n in errs[0], errs[0]
    return errs[0]


def store_state(root: Path) -> dict[str, str]:
    """Every dataset file and conveyor's bookkeeping (HEAD, manifest, ledger, commits), by hash."""
    return tree(root, skip=(".conveyor/lock", ".conveyor/apply.lock", ".conveyor/staging", ".conveyor/snapshots"))


@contextmanager
def tmpfs(path: Path, size_mb: int):
    path.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def grow(path: Path, size_mb: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_mb}m", str(path)], check=True)


def fill(mount: Path, leave: int = 0) -> Path:
    """Take all but `leave` bytes of free space with a ballast file."""
    st = os.statvfs(mount)
    free = st.f_bavail * st.f_frsize
    ballast = mount / "ballast"
    with open(ballast, "wb") as f:
        chunk = b"\0" * (1 << 20)
        n = max(0, free - leave)
        try:
            while n > 0:
                n -= f.write(chunk[:min(n, len(chunk))])
        except OSError:
            pass
    return ballast


def record(root: Path, episodes: range, length: int = 20) -> RecordingWriter:
    w = RecordingWriter(root, SPEC)
    for ep in episodes:
        w.write_episode(ep, length)
    return w


# -- a full disk -------------------------------------------------------------------------------------


def test_disk_full_during_ingest(tmp_path):
    w = record(tmp_path / "rec", range(2))
    with tmpfs(tmp_path / "disk", 16) as disk:
        store = disk / "lab"
        assert conveyor("ingest", str(tmp_path / "rec"), str(store)).returncode == 0
        before, version = store_state(store), Store.open(store).version
        for ep in range(2, 5):
            w.write_episode(ep, 60)
        fill(disk, leave=32 * 1024)
        p = conveyor("ingest", str(tmp_path / "rec"), str(store))
        one_line_error(p, "No space left on device")
        assert store_state(store) == before and Store.open(store).version == version
        assert not any((store / ".conveyor/staging").iterdir())
        grow(disk, 64)
        p = conveyor("ingest", str(tmp_path / "rec"), str(store))
        assert p.returncode == 0, p.stderr
        assert Store.open(store).version.total_episodes == 5
        assert scrub(store).ok and validate_fast(store, against=tmp_path / "rec").ok


def test_disk_full_while_pyarrow_writes_names_the_store_and_the_file(tmp_path):
    """pyarrow's own message ("Error writing bytes to file. Detail: [errno 28]") names no file; conveyor's does."""
    from conveyor.synthetic.recording import CameraSpec

    spec = RecordingSpec(cameras=(CameraSpec("observation.images.top", height=96, width=128, dtype="image"),))
    w = RecordingWriter(tmp_path / "rec", spec)  # PNG frames inside the parquet: only pyarrow writes big files
    w.write_episode(0, 10)
    with tmpfs(tmp_path / "disk", 16) as disk:
        store = disk / "lab"
        assert conveyor("ingest", str(tmp_path / "rec"), str(store)).returncode == 0
        before = store_state(store)
        for ep in range(1, 4):
            w.write_episode(ep, 100)
        fill(disk, leave=800 * 1024)
        p = conveyor("ingest", str(tmp_path / "rec"), str(store))
        line = one_line_error(p, f"No space left on device while writing store {store} (append)")
        assert "/data/chunk-000/file-001.parquet:" in line and "Error writing bytes" not in line
        assert store_state(store) == before
        grow(disk, 64)
        assert conveyor("ingest", str(tmp_path / "rec"), str(store)).returncode == 0
        assert Store.open(store).version.total_episodes == 4


def test_disk_full_during_compaction(tmp_path):
    rec = tmp_path / "rec"
    w = record(rec, range(1))
    with tmpfs(tmp_path / "disk", 16) as disk:
        store = disk / "lab"
        assert conveyor("ingest", str(rec), str(store)).returncode == 0  # one file per ingest: compaction merges them
        for ep in range(1, 5):
            w.write_episode(ep, 20)
            assert conveyor("ingest", str(rec), str(store)).returncode == 0
        before, version = store_state(store), Store.open(store).version
        fill(disk, leave=16 * 1024)
        p = conveyor("compact", str(store))
        one_line_error(p, "No space left on device")
        assert store_state(store) == before and Store.open(store).version == version
        grow(disk, 64)
        p = conveyor("compact", str(store))
        assert p.returncode == 0 and "compacted" in p.stdout, p.stderr
        assert scrub(store).ok and validate_fast(store, against=rec).ok


def test_disk_full_during_repair(tmp_path):
    rec = tmp_path / "rec"
    record(rec, range(3), length=40)
    url = f"file://{tmp_path / 'objects'}"
    with tmpfs(tmp_path / "disk", 16) as disk:
        store = disk / "lab"
        assert conveyor("ingest", str(rec), str(store)).returncode == 0
        assert conveyor("backup", str(store), "--to", url).returncode == 0
        [video] = (store / "videos/observation.images.phone").rglob("*.mp4")
        data = bytearray(video.read_bytes())
        data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
        video.write_bytes(bytes(data))
        before = store_state(store)
        fill(disk, leave=4 * 1024)
        p = conveyor("repair", str(store), "--from", url)
        one_line_error(p, "No space left on device", "nothing replaced")
        assert store_state(store) == before, "the damaged file is as it was; nothing else changed"
        assert not any((store / ".conveyor/staging").iterdir())
        grow(disk, 64)
        p = conveyor("repair", str(store), "--from", url)
        assert p.returncode == 0, p.stderr
        assert scrub(store).ok


def test_disk_full_during_restore(tmp_path):
    rec = tmp_path / "rec"
    record(rec, range(3), length=40)
    store = tmp_path / "lab"
    assert conveyor("ingest", str(rec), str(store)).returncode == 0
    url = f"file://{tmp_path / 'objects'}"
    assert conveyor("backup", str(store), "--to", url).returncode == 0
    with tmpfs(tmp_path / "disk", 16) as disk:
        dst = disk / "back"
        fill(disk, leave=64 * 1024)
        p = conveyor("restore", f"{url}@lab", str(dst))
        one_line_error(p, "No space left on device")
        partial = [p for p in dst.rglob("*") if p.is_file()] if dst.exists() else []
        assert not [p for p in partial if p.name.endswith((".part", ".tmp"))], "no temp files left behind"
        assert not (dst / ".conveyor/HEAD").exists() and not (dst / "meta/info.json").exists(), \
            "a half-restored store must not look complete"
        grow(disk, 64)
        p = conveyor("restore", f"{url}@lab", str(dst), "--force")
        assert p.returncode == 0, p.stderr
        assert scrub(dst).ok and Store.open(dst).version == Store.open(store).version


def test_disk_full_while_materializing_a_version_for_training(tmp_path):
    """A GPU worker without the store fetches the pinned version into its cache (what `conveyor train` does
    before lerobot-train starts); its cache disk fills mid-fetch."""
    rec = tmp_path / "rec"
    record(rec, range(3), length=40)
    store = tmp_path / "stores" / "lab"
    assert conveyor("ingest", str(rec), str(store)).returncode == 0
    url = f"file://{tmp_path / 'objects'}"
    repo = open_repo(url)
    pv = read_version(repo, publish(store, repo).key)
    repo_before = tree(tmp_path / "objects")
    with tmpfs(tmp_path / "disk", 16) as disk:
        cache = disk / "cache"
        worker = Settings(store_root=tmp_path / "gpu" / "stores", work_dir=tmp_path / "gpu" / "work",
                          cache_dir=cache, storage_url=url)

        def resolve():
            return resolve_dataset("lab", None, worker, run="r1", run_dir=tmp_path / "gpu" / "run",
                                   archive_url=None, log=lambda m: None)

        fill(disk, leave=16 * 1024)
        assert pv.total_bytes > 64 * 1024, "the version cannot fit in what is left"
        with pytest.raises(ConveyorError) as e:
            resolve()
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"{cache}: ") and "No space left on device" in msg, msg
        assert not list(cache.rglob("info.json")), "no version folder lerobot could open"
        assert not (cache / "lab").exists() or not any((cache / "lab").iterdir()), "no folder, manifest or lease"
        assert not any((cache / ".tmp").iterdir()), "the half-built folder was removed"
        assert tree(tmp_path / "objects") == repo_before, "the repository is untouched"
        grow(disk, 64)
        got = resolve()
        assert got.materialized.fetched_files == len(pv.files) and got.materialized.linked_store == 0
        assert got.root.is_relative_to(cache) and tree(got.root) == {f.path: f.sha256 for f in pv.files}
    assert tree(tmp_path / "objects") == repo_before


# -- permissions and read-only stores ------------------------------------------------------------------


@contextmanager
def read_only_bind(path: Path):
    p = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot bind-mount here ({p.stderr.strip()})")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_read_only_store(tmp_path):
    rec = tmp_path / "rec"
    w = record(rec, range(2))
    store = tmp_path / "lab"
    assert conveyor("ingest", str(rec), str(store)).returncode == 0
    w.write_episode(2, 20)
    before = store_state(store)
    with read_only_bind(store):
        p = conveyor("ingest", str(rec), str(store))
        one_line_error(p, "Read-only file system")
        p = conveyor("compact", str(store))
        assert p.returncode in (0, 1) and "Traceback" not in p.stderr
        assert conveyor("scrub", str(store)).returncode == 0, "a reader can scrub a read-only store"
        assert conveyor("validate", str(store)).returncode == 0
    assert store_state(store) == before
    # permission bits instead of a mount: a store folder the (non-root) writer may not write
    subprocess.run(["chmod", "-R", "a-w", str(store)], check=True)
    try:
        p = conveyor("ingest", str(rec), str(store), as_user=True)
        one_line_error(p, "Permission denied")
        assert conveyor("scrub", str(store), as_user=True).returncode == 0
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(store)], check=True)
    assert store_state(store) == before
    assert conveyor("ingest", str(rec), str(store)).returncode == 0
    assert Store.open(store).version.total_episodes == 3


def test_source_file_without_read_permission(tmp_path):
    rec = tmp_path / "rec"
    record(rec, range(3))
    [bad] = rec.glob("data/*/episode_000001.parquet")
    os.chmod(bad, 0)
    src_before = {p: p.stat().st_mtime_ns for p in rec.rglob("*") if p.is_file()}
    store = tmp_path / "lab"
    p = conveyor("ingest", str(rec), str(store), as_user=True)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    errs = [line for line in p.stderr.splitlines() if line.startswith("conveyor: error:")]
    assert len(errs) == 1 and str(bad) in errs[0] and "Permission denied" in errs[0], p.stderr
    assert [r.source_episode_index for r in Store.open(store).ledger()] == [0, 2], "the rest landed"
    assert {p: p.stat().st_mtime_ns for p in rec.rglob("*") if p.is_file()} == src_before, "source untouched"
    os.chmod(bad, 0o644)
    assert conveyor("ingest", str(rec), str(store)).returncode == 0
    assert [r.source_episode_index for r in Store.open(store).ledger()] == [0, 2, 1]


# -- names -----------------------------------------------------------------------------------------------


def test_paths_with_spaces_and_non_ascii(tmp_path):
    base = tmp_path / "录制 数据" / "koch grasp"
    rec = base / "源 recording"
    record(rec, range(3))
    store = base / "stores" / "lab ü 一"
    url = f"file://{base / 'backup 备份'}"
    assert conveyor("convert", str(rec), str(store)).returncode == 0
    assert conveyor("validate", str(store), "--against", str(rec)).returncode == 0
    assert conveyor("scrub", str(store)).returncode == 0
    assert conveyor("backup", str(store), "--to", url, "--name", "lab").returncode == 0
    [video] = (store / "videos/observation.images.laptop").rglob("*.mp4")
    video.write_bytes(video.read_bytes()[:-10] + bytes(10))
    p = conveyor("scrub", str(store))
    assert p.returncode == 1 and "DAMAGED videos/observation.images.laptop" in p.stdout
    p = conveyor("repair", str(store), "--from", url)
    assert p.returncode == 0 and "HEALED" in p.stdout, p.stderr
    dst = base / "恢复 restored"
    assert conveyor("restore", f"{url}@lab", str(dst)).returncode == 0
    assert tree(dst, skip=(".conveyor/lock", ".conveyor/apply.lock")) == \
        tree(store, skip=(".conveyor/lock", ".conveyor/apply.lock"))
    assert conveyor("validate", str(dst), "--against", str(rec)).returncode == 0


def test_info_json_being_rewritten_by_the_recorder_is_waited_out(tmp_path):
    """lerobot's recorder rewrites info.json in place after each episode (truncate, then write): an ingest that
    opens the source in that window waits for the whole file instead of failing; a file that stays torn is
    still an error naming it."""
    from conveyor.ingest import ingest

    rec, store = tmp_path / "rec", tmp_path / "store"
    record(rec, range(2))
    info = rec / "meta/info.json"
    whole = info.read_bytes()
    info.write_bytes(whole[: len(whole) // 3])  # caught mid-write
    writer = threading.Timer(0.3, info.write_bytes, args=(whole,))
    writer.start()
    try:
        report = ingest(rec, store)
    finally:
        writer.join()
    assert [m.source_episode_index for m in report.added] == [0, 1]
    info.write_bytes(b"")  # the recorder died mid-write: stays torn
    with pytest.raises(ConveyorError) as e:
        ingest(rec, store)
    assert str(info) in str(e.value) and "not valid JSON" in str(e.value)
    info.write_bytes(whole)
    assert not ingest(rec, store).added


# -- an overloaded S3 endpoint ----------------------------------------------------------------------------


class SlowDownProxy:
    """HTTP proxy in front of moto on 127.0.0.1: forwards `pass_first` requests, then answers the next
    `failures` requests with 503 SlowDown (S3's throttling reply), then forwards everything again."""

    def __init__(self, upstream_port: int, pass_first: int, failures: int):
        self.upstream, self.pass_first, self.failures = upstream_port, pass_first, failures
        self.seen = self.refused = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    raw = b""
                    while True:
                        line = self.rfile.readline()
                        raw += line
                        n = int(line.split(b";")[0].strip(), 16)
                        if n == 0:
                            while True:  # trailers, then the blank line
                                t = self.rfile.readline()
                                raw += t
                                if t in (b"\r\n", b"\n", b""):
                                    return raw
                        raw += self.rfile.read(n + 2)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _any(self):
                body = self._body()
                with proxy.lock:
                    proxy.seen += 1
                    refuse = proxy.pass_first < proxy.seen <= proxy.pass_first + proxy.failures
                    proxy.refused += refuse
                if refuse:
                    msg = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                           b"<Message>Please reduce your request rate.</Message></Error>")
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(msg) if self.command != "HEAD" else 0))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(msg)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream, timeout=60)
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for k, v in self.headers.items():
                    conn.putheader(k, v)
                conn.endheaders(body or None)
                r = conn.getresponse()
                data = r.read()
                self.send_response(r.status, r.reason)
                for k, v in r.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                length = r.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.slow
def test_s3_slowdown_mid_backup_is_retried_and_nothing_half_written_looks_complete(prefect_server, tmp_path,
                                                                                   s3_endpoint, monkeypatch):
    import prefect.context
    from flows.backup import backup as backup_flow

    prefect.context.refresh_global_settings_context()
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # botocore gives up fast: the flow's retries must carry it
    rec = tmp_path / "rec"
    record(rec, range(4))
    store = tmp_path / "stores" / "lab"
    assert conveyor("ingest", str(rec), str(store)).returncode == 0
    bucket = new_bucket(s3_endpoint)
    url = f"s3://{bucket}/b"
    direct = open_repo(url, S3Settings(endpoint_url=s3_endpoint))

    def config(endpoint: str) -> Path:
        cfg = tmp_path / "conveyor.toml"
        cfg.write_text(f'store_root = "{tmp_path / "stores"}"\nwork_dir = "{tmp_path / "work"}"\n'
                       f'storage_url = "{url}"\n[s3]\nendpoint_url = "{endpoint}"\n'
                       '[backup]\nverify_sample = 4\ninclude_sources = false\n[transfer]\nmax_concurrency = 2\n')
        return cfg

    # an endpoint that stays overloaded: every attempt fails, and no snapshot appears
    proxy = SlowDownProxy(moto_port(s3_endpoint), pass_first=3, failures=10**9)
    state = backup_flow(config=str(config(proxy.endpoint)), retry_delay_seconds=[0.1, 0.1], return_state=True)
    assert state.is_failed() and "SlowDown" in str(state.message)
    assert proxy.refused > 3
    assert B.snapshot_ids(direct) == [], "a failed backup leaves no snapshot manifest"
    proxy.close()

    # overloaded for a while in the middle: retried, then complete
    proxy = SlowDownProxy(moto_port(s3_endpoint), pass_first=4, failures=5)
    state = backup_flow(config=str(config(proxy.endpoint)), retry_delay_seconds=[0.2, 0.2, 0.2], return_state=True)
    assert state.is_completed(), state.message
    assert proxy.refused == 5
    (snap,) = B.snapshot_ids(direct)
    assert B.verify(direct, snap, full=True).ok
    B.restore(direct, snap, tmp_path / "back")
    assert scrub(tmp_path / "back").ok and Store.open(tmp_path / "back").version == Store.open(store).version
    proxy.close()
