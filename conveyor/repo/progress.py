"""Byte-count progress out of boto3's transfer manager."""
from __future__ import annotations

from conveyor.repo.base import BytesProgress


class TransferProgress:
    """s3transfer subscriber forwarding byte counts."""

    def __init__(self, cb: BytesProgress):
        from s3transfer.subscribers import BaseSubscriber

        class Sub(BaseSubscriber):
            def on_progress(self, future, bytes_transferred, **kwargs):
                cb(bytes_transferred)

        self.sub = Sub()
