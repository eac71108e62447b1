"""``s3://bucket/prefix``: boto3 against AWS S3 or any S3-compatible server (MinIO, Ceph RGW, R2, moto).

Endpoint, region, addressing style and credentials come from `S3Settings`, else from boto3's own chain,
or from a ready ``boto3.Session`` (the Prefect layer builds one from an ``AwsCredentials`` block).
"""
from __future__ import annotations

import base64
import os
import threading
from datetime import datetime, timezone
from pathlib import Path

from conveyor.errors import ConveyorError
from conveyor.fileio import sha256_bytes, sha256_file
from conveyor.repo.base import CHUNK, TMP_STALE_S, ObjectInfo, Repo, check_key, run_all
from conveyor.repo.errors import CorruptObject, MissingObject
from conveyor.repo.progress import TransferProgress
from conveyor.repo.redact import Redact
from conveyor.repo.s3_errors import s3_errors
from conveyor.settings import S3Settings, TransferSettings


class S3Repo(Repo):
    def __init__(self, bucket: str, prefix: str, s3: S3Settings | None = None,
                 transfer: TransferSettings | None = None):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        s3 = s3 or S3Settings()
        self.transfer = transfer or TransferSettings()
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")

        def secret(v):
            return v.get_secret_value() if v is not None else None

        session = boto3.Session(aws_access_key_id=secret(s3.access_key_id),
                                aws_secret_access_key=secret(s3.secret_access_key),
                                aws_session_token=secret(s3.session_token),
                                profile_name=s3.profile, region_name=s3.region)
        try:
            creds = session.get_credentials()
            if creds is not None:
                Redact.register(creds.access_key, creds.secret_key, creds.token)
        except Exception:  # noqa: BLE001 - resolving credentials early is only for redaction
            pass
        conc = self.transfer.max_concurrency
        config = Config(s3={"addressing_style": s3.addressing_style},
                        retries={"mode": "standard"},  # attempts from AWS_MAX_ATTEMPTS / profile, default 3
                        max_pool_connections=max(10, conc + 4), connect_timeout=10, read_timeout=120)
        with s3_errors(self.url):
            # endpoint None lets botocore use AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / profile endpoint_url
            self.client = session.client("s3", endpoint_url=s3.endpoint_url or None,
                                         region_name=s3.region or session.region_name or "us-east-1",
                                         config=config)
        mb = 1 << 20
        self.tconfig = TransferConfig(multipart_threshold=self.transfer.multipart_threshold_mb * mb,
                                      multipart_chunksize=self.transfer.multipart_chunksize_mb * mb,
                                      max_concurrency=conc, preferred_transfer_client="classic")
        self._tm = None
        self._tm_lock = threading.Lock()

    # keys
    def _k(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _where(self, key: str) -> str:
        return f"{self.url}/{key}"

    @property
    def manager(self):
        """One shared transfer manager: all batch transfers share its thread pool and connection pool."""
        with self._tm_lock:
            if self._tm is None:
                from boto3.s3.transfer import create_transfer_manager
                self._tm = create_transfer_manager(self.client, self.tconfig)
            return self._tm

    def close(self):
        if self._tm is not None:
            self._tm.shutdown()
            self._tm = None

    def _upload_args(self, size: int, sha256: str | None) -> dict:
        if not sha256:
            return {"ChecksumAlgorithm": "SHA256"}
        args = {"Metadata": {"sha256": sha256}}
        if size < self.tconfig.multipart_threshold:
            # whole-object checksum: the server recomputes it and rejects different bytes
            args["ChecksumSHA256"] = base64.b64encode(bytes.fromhex(sha256)).decode()
        else:
            args["ChecksumAlgorithm"] = "SHA256"  # per-part; S3 has no full-object SHA-256 for multipart
        return args

    # single objects
    def put_file(self, local, key, sha256=None):
        return self.put_files([(Path(local), key, sha256)])[0]

    def put_files(self, items, progress=None, concurrency=0, return_exceptions=False):
        """Below the multipart threshold: one PutObject per file from memory, its bytes checked against
        `sha256` before sending and the whole-object ChecksumSHA256 sent along. Above: the transfer manager
        (parallel parts with SHA-256 part checksums), then the file is re-hashed and the object deleted if
        the bytes no longer match (the file changed while it was read)."""
        items = list(items)
        subs = [TransferProgress(progress).sub] if progress else None
        threshold = self.tconfig.multipart_threshold
        small = [(i, it) for i, it in enumerate(items) if os.path.getsize(it[0]) < threshold]
        large = [(i, it) for i, it in enumerate(items) if os.path.getsize(it[0]) >= threshold]
        results: list = [None] * len(items)

        def put_small(item):
            local, key, sha = item
            data = Path(local).read_bytes()
            digest = sha256_bytes(data)
            if sha and digest != sha:
                raise CorruptObject(self._where(key), f"{local} hashes to {digest}, expected {sha}")
            info = self.put_bytes(key, data, digest)
            if progress:
                progress(len(data))
            return info

        def put_large(i: int, item, fut):
            local, key, sha = item
            try:
                with s3_errors(self._where(key)):
                    fut.result()
                    if sha and sha256_file(local) != sha:
                        self.delete([key])
                        raise CorruptObject(self._where(key), f"{local} changed while it was uploaded")
                results[i] = ObjectInfo(key, os.path.getsize(local), sha)
            except ConveyorError as e:
                results[i] = e

        futures = []
        for i, (local, key, sha) in large:
            size = os.path.getsize(local)
            with s3_errors(self._where(key)):
                futures.append((i, (local, key, sha), self.manager.upload(
                    str(local), self.bucket, self._k(key), extra_args=self._upload_args(size, sha),
                    subscribers=subs)))
        small_results = run_all(put_small, [it for _, it in small], max(1, self.transfer.max_concurrency),
                                 return_exceptions=True)
        for (i, _), r in zip(small, small_results):
            results[i] = r
        run_all(lambda f: put_large(*f), futures, 4)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors and not return_exceptions:
            raise errors[0]
        return results

    def _settle(self, futures, return_exceptions: bool = False) -> list:
        out, first = [], None
        for key, size, sha, fut in futures:
            try:
                with s3_errors(self._where(key)):
                    fut.result()
                out.append(ObjectInfo(key, size, sha))
            except ConveyorError as e:
                out.append(e)
                first = first or e
        if first and not return_exceptions:
            raise first
        return out

    def put_bytes(self, key, data, sha256=None):
        sha256 = sha256 or sha256_bytes(data)
        with s3_errors(self._where(key)):
            self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data, Metadata={"sha256": sha256},
                                   ChecksumSHA256=base64.b64encode(bytes.fromhex(sha256)).decode())
        return ObjectInfo(key, len(data), sha256)

    def get_bytes(self, key, expected_sha256=None):
        data = b"".join(self.read_chunks(key))
        if expected_sha256 and sha256_bytes(data) != expected_sha256:
            raise CorruptObject(self._where(key), f"content hashes to {sha256_bytes(data)}, expected {expected_sha256}")
        return data

    def read_chunks(self, key):
        with s3_errors(self._where(key)):
            body = self.client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"]
            try:
                while buf := body.read(CHUNK):
                    yield buf
            finally:
                body.close()

    def head(self, key):
        from botocore.exceptions import ClientError
        try:
            with s3_errors(self._where(key)):
                try:
                    r = self.client.head_object(Bucket=self.bucket, Key=self._k(key), ChecksumMode="ENABLED")
                except ClientError as e:
                    if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                        return None
                    raise
        except MissingObject:
            return None
        return ObjectInfo(key, r["ContentLength"], r.get("Metadata", {}).get("sha256"), r.get("LastModified"))

    def list(self, prefix=""):
        full = (self.prefix + "/" if self.prefix else "") + prefix
        cut = len(self.prefix) + 1 if self.prefix else 0
        with s3_errors(self.url + "/" + prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                for o in page.get("Contents", []):
                    yield ObjectInfo(o["Key"][cut:], o["Size"], None, o.get("LastModified"))

    def delete(self, keys):
        keys = list(keys)
        for i in range(0, len(keys), 1000):  # DeleteObjects takes up to 1000 keys per request
            batch = keys[i:i + 1000]
            with s3_errors(self.url):
                r = self.client.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": self._k(k)} for k in batch], "Quiet": True})
            errors = r.get("Errors") or []
            if errors:
                e = errors[0]
                raise ConveyorError(f"{self.url}/{e.get('Key', '')}", f"delete failed: {e.get('Code')}")
        return len(keys)

    def cleanup_incomplete(self, older_than_s=TMP_STALE_S, now=None):
        """Multipart uploads carry no writer's pid: only their age tells a killed one from a running one."""
        cutoff = (now or datetime.now(timezone.utc)).timestamp() - older_than_s
        n = 0
        with s3_errors(self.url):
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=self.prefix + "/" if self.prefix else "")
            for page in pages:
                for u in page.get("Uploads", []):
                    if u["Initiated"].timestamp() < cutoff:
                        self.client.abort_multipart_upload(Bucket=self.bucket, Key=u["Key"], UploadId=u["UploadId"])
                        n += 1
        return n
