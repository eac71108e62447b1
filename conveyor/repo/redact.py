"""Keep S3 credentials out of logs: known secret values, and the userinfo of any URL (`s3://KEY:SECRET@bucket`)."""
from __future__ import annotations

import threading

from conveyor.errors import mask_userinfo

__all__ = ["Redact", "mask_userinfo"]


class Redact:
    """Logging filter that blanks known secret values. botocore's DEBUG request dumps carry the session
    token and access key id in headers; no library option turns that off, so we redact them ourselves."""

    secrets: set[str] = set()
    _lock = threading.Lock()
    LOGGERS = ("botocore", "botocore.endpoint", "botocore.auth", "botocore.hooks", "botocore.httpsession",
               "botocore.parsers", "botocore.retryhandler", "botocore.credentials", "botocore.client",
               "botocore.utils", "botocore.regions", "boto3", "s3transfer", "urllib3", "urllib3.connectionpool")

    @classmethod
    def register(cls, *values: str | None) -> None:
        new = {v for v in values if v and len(v) >= 8}
        with cls._lock:
            if new - cls.secrets:
                cls.secrets |= new
                import logging
                f = cls()
                for name in cls.LOGGERS:
                    lg = logging.getLogger(name)
                    if not any(isinstance(x, cls) for x in lg.filters):
                        lg.addFilter(f)

    def filter(self, record) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is not ours to fix
            return True
        masked = mask_userinfo(msg)
        if masked != msg or any(v in msg for v in self.secrets):
            for v in self.secrets:
                masked = masked.replace(v, "***")
            record.msg, record.args = masked, ()
        return True
