"""botocore/s3transfer exceptions -> one clean, secret-free ConveyorError (transient ones marked so)."""
from __future__ import annotations

from contextlib import contextmanager

from conveyor.errors import ConveyorError
from conveyor.repo.errors import CorruptObject, MissingObject, TransientStorageError

_TRANSIENT_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "Throttling",
                    "ThrottlingException", "RequestTimeTooSkewed", "500", "502", "503", "504"}
_CREDENTIAL_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                     "InvalidToken", "403"}


def translate(exc: BaseException, where: str) -> ConveyorError:
    """botocore/s3transfer exception -> ConveyorError with the S3 error code only (no request dump)."""
    from botocore import exceptions as bx
    from s3transfer.exceptions import RetriesExceededError

    if isinstance(exc, ConveyorError):
        return exc
    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchKey", "404", "NotFound"):
            return MissingObject(where, "no such object")
        if code == "NoSuchBucket":
            return ConveyorError(where, "bucket does not exist (create it first)")
        if code in ("BadDigest", "XAmzContentSHA256Mismatch", "InvalidDigest"):
            return CorruptObject(where, f"the server rejected the upload's checksum ({code}); "
                                        "the local file changed while it was read")
        if code in _CREDENTIAL_CODES:
            return ConveyorError(where, f"access denied ({code}): check the S3 credentials and bucket policy")
        if code in _TRANSIENT_CODES or (isinstance(status, int) and status >= 500):
            return TransientStorageError(where, f"S3 error {code or status}, retries exhausted")
        return ConveyorError(where, f"S3 error {code or status}: {err.get('Message', '')}".rstrip(": "))
    if isinstance(exc, bx.NoCredentialsError):
        return ConveyorError(where, "no S3 credentials found: set s3.access_key_id/secret_access_key, "
                                    "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, s3.profile or s3.aws_credentials_block")
    if isinstance(exc, (bx.ConnectionError, bx.HTTPClientError, RetriesExceededError, ConnectionError,
                        TimeoutError)):
        return TransientStorageError(where, f"cannot reach the S3 endpoint ({type(exc).__name__}), retries exhausted")
    if isinstance(exc, bx.BotoCoreError):
        return ConveyorError(where, f"S3 client error ({type(exc).__name__})")
    if isinstance(exc, OSError):
        return ConveyorError(where, f"local I/O error: {exc.strerror or exc}")
    return ConveyorError(where, f"{type(exc).__name__}: {exc}")


@contextmanager
def s3_errors(where: str):
    try:
        yield
    except ConveyorError:
        raise
    except Exception as e:  # noqa: BLE001 - translated into a clean, secret-free error
        raise translate(e, where) from None
