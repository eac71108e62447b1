"""Retry policy shared by conveyor's tasks: transient I/O errors retry with backoff, bad input never does."""
from __future__ import annotations

from typing import Any

from conveyor.errors import ConveyorError, StoreLocked
from conveyor.repo import TransientStorageError


def _exception(state: Any) -> BaseException | None:
    data = getattr(state, "data", None)
    if isinstance(data, BaseException):
        return data
    try:
        state.result()
    except BaseException as e:  # noqa: BLE001 - we only classify it
        return e
    return None


def is_transient(exc: BaseException | None) -> bool:
    """OSError (EIO, NFS timeout, connection reset, disk briefly full), unreachable or overloaded object
    storage and a busy store lock are worth retrying; any other ConveyorError (bad credentials, missing
    bucket, bad source) means the input is bad, and retrying cannot fix it."""
    if isinstance(exc, (StoreLocked, TransientStorageError)):
        return True
    if isinstance(exc, ConveyorError):
        return False
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                        FileExistsError)):
        return False  # the same call fails the same way again: a setup problem, not a hiccup
    return isinstance(exc, (OSError, TimeoutError))


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """`retry_condition_fn` for @task."""
    return is_transient(_exception(state))


RETRY = dict(retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=retry_transient)
