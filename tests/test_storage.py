"""Object storage layer: the same cases against file:// and a real S3 server (moto on 127.0.0.1)."""
from __future__ import annotations

import hashlib
import logging
import os

import pytest

from conveyor.errors import ConveyorError
from conveyor.settings import S3Settings, TransferSettings
from conveyor.repo import CorruptObject, MissingObject, TransientStorageError, open_repo
from backup_helpers import SECRET, make_repo, new_bucket

SMALL_PARTS = TransferSettings(multipart_threshold_mb=5, multipart_chunksize_mb=5, max_concurrency=4)


@pytest.fixture(params=["file", "s3"])
def backend(request, s3_endpoint):
    return request.param


@pytest.fixture
def repo(backend, tmp_path, s3_endpoint):
    url, _, r = make_repo(backend, tmp_path, s3_endpoint, SMALL_PARTS)
    yield r
    r.close()


def test_round_trip_list_head_delete(repo, tmp_path):
    small = tmp_path / "small.bin"
    small.write_bytes(os.urandom(1000))
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(11 << 20))  # over the 5 MB threshold: multipart with per-part SHA-256
    sha_small = hashlib.sha256(small.read_bytes()).hexdigest()
    sha_big = hashlib.sha256(big.read_bytes()).hexdigest()

    repo.put_file(small, "a/small", sha_small)
    repo.put_files([(big, "a/big", sha_big)])
    repo.put_bytes("b/c.txt", b"hello")

    assert sorted(o.key for o in repo.list()) == ["a/big", "a/small", "b/c.txt"]
    assert {o.key: o.size for o in repo.list("a/")} == {"a/big": 11 << 20, "a/small": 1000}
    assert repo.head("a/big").size == 11 << 20
    assert repo.head("nope") is None and not repo.exists("nope") and repo.exists("b/c.txt")
    assert repo.get_bytes("b/c.txt") == b"hello"

    out = tmp_path / "out.bin"
    repo.get_file("a/big", out, expected_sha256=sha_big)
    assert out.read_bytes() == big.read_bytes()

    assert repo.delete(["a/small", "missing-is-fine"]) == 2
    assert sorted(o.key for o in repo.list()) == ["a/big", "b/c.txt"]


def test_checksums_are_enforced_both_ways(repo, tmp_path):
    f = tmp_path / "f.bin"
    f.write_bytes(b"x" * 5000)
    wrong = hashlib.sha256(b"something else").hexdigest()
    # upload: the bytes must hash to the declared sha256, else nothing is stored
    with pytest.raises(CorruptObject):
        repo.put_file(f, "k", wrong)
    assert not repo.exists("k")
    # download: a mismatch is caught and no file is left behind
    repo.put_file(f, "k")
    out = tmp_path / "out.bin"
    with pytest.raises(CorruptObject, match="k"):
        repo.get_file("k", out, expected_sha256=wrong)
    assert not out.exists() and not list(tmp_path.glob(".out.bin*"))
    with pytest.raises(MissingObject):
        repo.get_bytes("absent")


def test_bad_urls_and_missing_bucket(s3_endpoint):
    with pytest.raises(ConveyorError, match="unsupported storage URL"):
        open_repo("ftp://x/y")
    with pytest.raises(ConveyorError, match="needs a bucket"):
        open_repo("s3://")
    repo = open_repo("s3://no-such-bucket-conveyor/p", S3Settings(endpoint_url=s3_endpoint))
    with pytest.raises(ConveyorError, match="bucket does not exist"):
        repo.put_bytes("k", b"1")


def test_endpoint_from_standard_aws_environment(s3_endpoint, monkeypatch):
    """No endpoint in settings: botocore's AWS_ENDPOINT_URL_S3 is honoured."""
    bucket = new_bucket(s3_endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    repo = open_repo(f"s3://{bucket}/x", S3Settings())
    repo.put_bytes("k", b"via env")
    assert repo.get_bytes("k") == b"via env"


def test_unreachable_endpoint_is_transient_and_secret_free(monkeypatch, caplog):
    from conveyor.processes import free_port

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    caplog.set_level(logging.DEBUG)
    s3 = S3Settings(endpoint_url=f"http://127.0.0.1:{free_port()}", access_key_id="AKIDCONVEYORTEST",
                    secret_access_key=SECRET, session_token="tok-" + SECRET)
    repo = open_repo("s3://bucket-x/p", s3)
    with pytest.raises(TransientStorageError) as e:
        repo.put_bytes("k", b"1")
    assert "cannot reach" in str(e.value)
    assert SECRET not in str(e.value) and SECRET not in repr(s3) and SECRET not in caplog.text


URL_SECRET = "URLSECRET321"


def test_credentials_in_a_url_are_masked_everywhere_it_is_printed(tmp_path):
    """`s3://KEY:SECRET@bucket/x` given to backup, verify, prune, publish or as storage_url: every command refuses it
    in one line that shows `s3://***@bucket/x`; `config show`, the logging filter and `URL@SNAPSHOT` parsing mask it."""
    import subprocess
    import sys

    from conveyor.backup.format import split_ref
    from conveyor.ingest import convert
    from conveyor.repo.redact import Redact
    from conveyor.synthetic.recording import write_recording

    url = f"s3://AKIAX:{URL_SECRET}@bucket/x"
    convert(write_recording(tmp_path / "rec", episodes=1, lengths=4), tmp_path / "stores" / "p4")
    cfg = tmp_path / "conveyor.toml"
    cfg.write_text(f'store_root = "stores"\nstorage_url = "{url}"\n'
                   f'[prefect]\napi_url = "http://u:{URL_SECRET}@h/api"\n', encoding="utf-8")
    env = dict(os.environ, CONVEYOR_CONFIG=str(cfg))
    for args in (["backup", "p4", "--to", url], ["backup", "p4"], ["backup", "verify", url + "@latest"],
                 ["backup", "verify", f"s3://AKIAX:{URL_SECRET}@bucket"], ["backup", "prune", url],
                 ["publish", "p4", "--to", url], ["publish", "p4"]):
        p = subprocess.run([sys.executable, "-m", "conveyor.cli", *args], capture_output=True, text=True, env=env,
                           cwd=tmp_path, timeout=120)
        assert p.returncode == 1 and URL_SECRET not in p.stdout + p.stderr, (args, p.stderr)
        assert p.stderr.count("\n") == 1 and "s3://***@bucket" in p.stderr and "credentials do not belong" in p.stderr
    p = subprocess.run([sys.executable, "-m", "conveyor.cli", "config", "show"], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=60)
    assert p.returncode == 0 and URL_SECRET not in p.stdout
    assert '"storage_url": "s3://***@bucket/x"' in p.stdout and '"api_url": "http://***@h/api"' in p.stdout

    assert split_ref(url) == (url, None) and split_ref(url + "@latest") == (url, "latest")
    assert split_ref("s3://bucket@lab/2026") == ("s3://bucket", "lab/2026")
    record = logging.LogRecord("botocore", logging.DEBUG, __file__, 1, "GET %s", (url,), None)
    Redact().filter(record)
    assert record.getMessage() == "GET s3://***@bucket/x"
    with pytest.raises(ConveyorError) as e:
        open_repo(url)
    assert URL_SECRET not in str(e.value)
