"""One error type for every bad input: it names the file and the problem, and the CLI prints it as one line."""
from __future__ import annotations

import os
import re

_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]+@")


def mask_userinfo(text: str) -> str:
    """Every `scheme://user:secret@host` in `text` becomes `scheme://***@host`: a URL typed with credentials
    in it must not be echoed into an error, a log line or an artifact."""
    return _USERINFO.sub(r"\1***@", text) if "@" in text else text


class ConveyorError(Exception):
    """A problem with a specific file or folder; `str()` is `<path>: <problem>` (URL credentials masked)."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = mask_userinfo(str(path))
        self.problem = mask_userinfo(problem)
        super().__init__(f"{self.path}: {problem}")


class BadEpisode(ConveyorError):
    """One source episode cannot be converted; the rest of the batch can still land (quarantine)."""

    def __init__(self, path, problem: str, episode_index: int):
        self.episode_index = episode_index
        super().__init__(path, problem)


class StoreLocked(ConveyorError):
    """Another writer holds the store's lock."""
